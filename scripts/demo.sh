#!/usr/bin/env bash
# The vdrepl demo: a primary and a replica daemon on this machine (loopback,
# mutual TLS with certificates from `vdrepl pki`), a demo VM whose disk a
# guest-like writer changes, replication to the replica, and the replica's
# image compared with the primary's, a recovery point recovered through a
# test failover, and an unplanned failover. Everything lives under $DEMO_DIR
# (default /tmp/vdrepl-demo) and is stopped at the end; set DEMO_KEEP=1 to
# leave both daemons running.
set -euo pipefail
bin=$(realpath "${1:-bin/vdrepl}")
dir=${DEMO_DIR:-/tmp/vdrepl-demo}
prim=$dir/primary
repl=$dir/replica
pki=$dir/pki
sock=$prim/nbd.sock
port=${DEMO_PORT:-18443}
rm -rf "$dir" && mkdir -p "$prim" "$repl"
p() { "$bin" --state "$prim" "$@"; }
r() { "$bin" --state "$repl" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
uri="nbd+unix:///demo/disk0?socket=$sock"

say "certificates: a CA and one certificate per host (vdrepl pki)"
"$bin" pki init --dir "$pki" >/dev/null
"$bin" pki issue --dir "$pki" --name primary.demo --san 127.0.0.1 >/dev/null
"$bin" pki issue --dir "$pki" --name replica.demo --san 127.0.0.1 >/dev/null
"$bin" pki show "$pki/replica.demo.crt"
tls() { echo --tls-cert "$pki/$1.crt" --tls-key "$pki/$1.key" --tls-ca "$pki/ca.crt"; }

pids=()
cleanup() {
  if [ -z "${DEMO_KEEP:-}" ]; then
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT
# shellcheck disable=SC2046
"$bin" --state "$repl" serve --nbd "unix:$repl/nbd.sock" $(tls replica.demo) \
  --replica-listen "127.0.0.1:$port" >"$dir/replica.log" 2>&1 &
pids+=($!)
# shellcheck disable=SC2046
"$bin" --state "$prim" serve --nbd "unix:$sock" $(tls primary.demo) >"$dir/primary.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do p vm list >/dev/null 2>&1 && r vm list >/dev/null 2>&1 && break; sleep 0.05; done

say "replica host: allow the primary to replicate into $dir/replicas"
r replica allow add --primary primary.demo --storage "$dir/replicas"
r replica allow list

say "primary host: register VM 'demo' with a new 256 MiB disk"
p vm add demo --disk "disk0=$dir/demo-disk0.img:256M"
nbdinfo "$uri" | sed -n '1,6p'

say "a guest writes 32 MiB and flushes"
qemu-io -f raw "$uri" -c 'write -P 0xa5 0 16M' -c 'write -P 0x5a 64M 16M' -c flush | sed -n 's/^wrote/  wrote/p'

say "enable replication every 30s, 2 recovery points; the initial copy sends only the 32 MiB written (holes go as ranges)"
p replication enable demo --replica "127.0.0.1:$port" --frequency 30s --recovery-points 2 --recovery-point-interval 1s
p replication sync demo
nbdcopy "$uri" "$dir/primary-then.img"
sleep 1.1 # the next cycle is a new recovery point one interval later

say "the guest rewrites one 4 KiB block 1000 times and writes 8 MiB more: the cycle ships the block once"
cmds=(); for i in $(seq 1 1000); do cmds+=(-c "write -P $((i % 250)) 4096 4k"); done
qemu-io -f raw "$uri" "${cmds[@]}" >/dev/null
qemu-io -f raw "$uri" -c 'write -P 0x3c 128M 8M' -c flush >/dev/null
p replication sync demo
p replication status demo

say "the replica's view"
r replication status demo

say "compare: the replica image equals the primary disk byte for byte"
nbdcopy "$uri" "$dir/primary-now.img"
if cmp "$dir/primary-now.img" "$dir/replicas/demo/disk0.img"; then
  echo "  identical: $(du -h --apparent-size "$dir/replicas/demo/disk0.img" | cut -f1) image, $(du -h "$dir/replicas/demo/disk0.img" | cut -f1) allocated"
else
  echo "  the replica differs!" >&2
  exit 1
fi

say "recovery points on the replica; a test failover serves the older one as demo-test/disk0 while replication goes on"
r replication points demo
oldest=$(r replication points demo --json | sed -n 's/.*"ID": *"\([0-9]*\)".*/\1/p' | head -1)
r failover test demo --point "$oldest"
nbdcopy "nbd+unix:///demo-test/disk0?socket=$repl/nbd.sock" "$dir/test.img"
if cmp -s "$dir/test.img" "$dir/primary-then.img"; then
  echo "  point $oldest equals the primary disk as it was then, byte for byte"
else
  echo "  point $oldest differs from the primary disk as it was then!" >&2
  exit 1
fi
r failover stop-test demo

say "the primary is lost: unplanned failover on the replica; demo/disk0 is served there read-write"
kill -TERM "${pids[1]}" && wait "${pids[1]}" 2>/dev/null || true
r failover unplanned demo
nbdinfo "nbd+unix:///demo/disk0?socket=$repl/nbd.sock" | sed -n '1,3p'
r vm list
rm -f "$dir/primary-now.img" "$dir/primary-then.img" "$dir/test.img"

say "logs: $dir/primary.log, $dir/replica.log"
if [ -n "${DEMO_KEEP:-}" ]; then echo "daemons left running (pids ${pids[*]}): $bin --state $prim replication status"; fi
