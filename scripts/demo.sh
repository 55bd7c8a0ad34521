#!/usr/bin/env bash
# The vdrepl demo: a daemon on this machine with a demo VM, a guest-like
# writer, cycles closing, and the journal at work. Everything lives under
# $DEMO_DIR (default /tmp/vdrepl-demo) and is stopped at the end; set
# DEMO_KEEP=1 to leave the daemon running.
set -euo pipefail
bin=$(realpath "${1:-bin/vdrepl}")
dir=${DEMO_DIR:-/tmp/vdrepl-demo}
state=$dir/primary
sock=$state/nbd.sock
rm -rf "$dir" && mkdir -p "$state"
v() { "$bin" --state "$state" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

"$bin" --state "$state" serve --nbd "unix:$sock" >"$dir/primary.log" 2>&1 &
pid=$!
cleanup() {
  if [ -z "${DEMO_KEEP:-}" ]; then kill -TERM $pid 2>/dev/null && wait $pid 2>/dev/null || true; fi
}
trap cleanup EXIT
for _ in $(seq 1 200); do v vm list >/dev/null 2>&1 && break; sleep 0.05; done

say "register VM 'demo' with a new 256 MiB disk"
v vm add demo --disk "disk0=$dir/demo-disk0.img:256M"
v vm list

say "the NBD export, as a guest (qemu -drive file=nbd+unix:///demo/disk0?socket=$sock) sees it"
nbdinfo "nbd+unix:///demo/disk0?socket=$sock" | sed -n '1,12p'

say "a guest writes 32 MiB and flushes; the journal records every write"
qemu-io -f raw "nbd+unix:///demo/disk0?socket=$sock" \
  -c 'write -P 0xa5 0 16M' -c 'write -P 0x5a 64M 16M' -c flush | sed -n 's/^wrote/  wrote/p'
v vm seal demo
say "it rewrites one 4 KiB block 1000 times: the next cycle ships it once"
cmds=(); for i in $(seq 1 1000); do cmds+=(-c "write -P $((i % 250)) 4096 4k"); done
qemu-io -f raw "nbd+unix:///demo/disk0?socket=$sock" "${cmds[@]}" >/dev/null
v vm seal demo
v status

say "read back through NBD"
qemu-io -f raw "nbd+unix:///demo/disk0?socket=$sock" -c 'read -P 0xa5 0 4k' -c 'read -P 0x5a 64M 16M' | sed -n 's/^read/  read/p'

say "logs: $dir/primary.log; state: $state"
if [ -n "${DEMO_KEEP:-}" ]; then echo "daemon left running (pid $pid): $bin --state $state status"; fi
