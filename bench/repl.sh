#!/usr/bin/env bash
# bench/repl.sh — replication benchmark: a primary and a replica vdrepl
# daemon on loopback (mutual TLS, certificates from `vdrepl pki`), one
# Markdown table of
#
#   1. apply rate: sequential 1M and random 4k writes vs how fast the replica
#      has them applied (`replication sync`), compression off, random data:
#      a burst of a fixed size, and a sustained load (fio time_based, status
#      sampled for the lag)
#   2. bytes on the wire per byte the guest wrote, hot-spot writes (80% of the
#      writes on 20% of the blocks), coalescing and compression on and off
#   3. TLS 1.3 vs plain HTTP for 8 MiB chunk PUTs (go test ./bench/tlscost)
#   4. resync of a 4 GiB image with 1% of its blocks changed vs the initial copy
#   5. lag under a steady rate-limited load, every 30s, vs the 2-cycle target
#
# See bench/README.md for the knobs; REPL_QUICK=1 is a ~1 minute smoke test.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

ALL_PARTS="apply hotspot tls resync lag"

# ------------------------------------------------------------------- knobs --
REPL_QUICK=${REPL_QUICK:-0}
if [[ $REPL_QUICK == 1 ]]; then
	REPL_SEQ_SIZE=${REPL_SEQ_SIZE:-128M}
	REPL_RAND_SIZE=${REPL_RAND_SIZE:-32M}
	REPL_HOT_REGION=${REPL_HOT_REGION:-32M}
	REPL_HOT_WRITTEN=${REPL_HOT_WRITTEN:-96M}
	REPL_RESYNC_SIZE=${REPL_RESYNC_SIZE:-256M}
	REPL_LAG_SECONDS=${REPL_LAG_SECONDS:-20}
	REPL_SUSTAIN_SECONDS=${REPL_SUSTAIN_SECONDS:-15}
	REPL_SUSTAIN_DISK=${REPL_SUSTAIN_DISK:-256M}
	REPL_LAG_FREQUENCY=${REPL_LAG_FREQUENCY:-5s}
	REPL_LAG_DISK=${REPL_LAG_DISK:-256M}
	REPL_TLS_BENCHTIME=${REPL_TLS_BENCHTIME:-200ms}
	REPL_TLS_COUNT=${REPL_TLS_COUNT:-1}
	REPL_TLS_ROUNDS=${REPL_TLS_ROUNDS:-2}
fi
REPL_SEQ_SIZE=${REPL_SEQ_SIZE:-1G}
REPL_RAND_SIZE=${REPL_RAND_SIZE:-256M}
REPL_APPLY_FREQUENCY=${REPL_APPLY_FREQUENCY:-5s}
REPL_APPLY_MODES=${REPL_APPLY_MODES:-burst sustained}
REPL_SUSTAIN_SECONDS=${REPL_SUSTAIN_SECONDS:-60}
REPL_SUSTAIN_DISK=${REPL_SUSTAIN_DISK:-2G}
REPL_HOT_REGION=${REPL_HOT_REGION:-256M}
REPL_HOT_WRITTEN=${REPL_HOT_WRITTEN:-768M}
REPL_HOT_FREQUENCY=${REPL_HOT_FREQUENCY:-30s}
REPL_RESYNC_SIZE=${REPL_RESYNC_SIZE:-4G}
REPL_RESYNC_PERCENT=${REPL_RESYNC_PERCENT:-1}
REPL_LAG_SECONDS=${REPL_LAG_SECONDS:-150}
REPL_LAG_FREQUENCY=${REPL_LAG_FREQUENCY:-30s}
REPL_LAG_RATE=${REPL_LAG_RATE:-20m}
REPL_LAG_DISK=${REPL_LAG_DISK:-2G}
REPL_LAG_SAMPLE=${REPL_LAG_SAMPLE:-2}
REPL_TLS_BENCHTIME=${REPL_TLS_BENCHTIME:-2s}
REPL_TLS_COUNT=${REPL_TLS_COUNT:-5}
REPL_TLS_ROUNDS=${REPL_TLS_ROUNDS:-6}
REPL_PARTS=${REPL_PARTS:-$ALL_PARTS}
REPL_DIR=${REPL_DIR:-/var/tmp/vdrepl-repl-bench}
REPL_JOURNAL_CAP=${REPL_JOURNAL_CAP:-8G}
REPL_VERIFY=${REPL_VERIFY:-1}
REPL_SERVE_ARGS=${REPL_SERVE_ARGS:-}
REPL_KEEP=${REPL_KEEP:-0}
REPL_PERF=${REPL_PERF:-0}
REPL_SAVE=${REPL_SAVE:-0}
BENCH_OUT=${BENCH_OUT:-$BENCH/out}
# shellcheck disable=SC2034 # lib.sh's drop_caches reads it
BENCH_DROP_CACHES=${REPL_DROP_CACHES:-1}
VDREPL=${VDREPL:-}

usage() {
	sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
	echo
	awk '/^#/ {on = /^### Knobs of repl.sh/} on' "$BENCH/README.md"
}
case ${1:-} in
-h | --help) usage; exit 0 ;;
"") ;;
*) die "no arguments expected (knobs are environment variables; see --help)" ;;
esac

for p in $REPL_PARTS; do
	selected "$p" "$ALL_PARTS" || die "REPL_PARTS: unknown part '$p' (have: $ALL_PARTS)"
done
bytes_of() { # KNOB VALUE: bytes, a whole number of MiB
	local b
	b=$(numfmt --from=iec "$2" 2>/dev/null) || die "$1: cannot parse '$2'"
	((b >= 1048576 && b % 1048576 == 0)) || die "$1 must be a whole number of MiB"
	echo "$b"
}
SEQ_BYTES=$(bytes_of REPL_SEQ_SIZE "$REPL_SEQ_SIZE")
RAND_BYTES=$(bytes_of REPL_RAND_SIZE "$REPL_RAND_SIZE")
HOT_REGION_BYTES=$(bytes_of REPL_HOT_REGION "$REPL_HOT_REGION")
HOT_WRITTEN_BYTES=$(bytes_of REPL_HOT_WRITTEN "$REPL_HOT_WRITTEN")
RESYNC_BYTES=$(bytes_of REPL_RESYNC_SIZE "$REPL_RESYNC_SIZE")
LAG_DISK_BYTES=$(bytes_of REPL_LAG_DISK "$REPL_LAG_DISK")
SUSTAIN_DISK_BYTES=$(bytes_of REPL_SUSTAIN_DISK "$REPL_SUSTAIN_DISK")
[[ $REPL_SUSTAIN_SECONDS =~ ^[0-9]+$ ]] || die "REPL_SUSTAIN_SECONDS must be whole seconds"
for m in $REPL_APPLY_MODES; do
	selected "$m" "burst sustained" || die "REPL_APPLY_MODES: unknown mode '$m' (have: burst sustained)"
done
[[ $REPL_LAG_SECONDS =~ ^[0-9]+$ ]] || die "REPL_LAG_SECONDS must be whole seconds"
[[ $REPL_RESYNC_PERCENT =~ ^[0-9]+([.][0-9]+)?$ ]] || die "REPL_RESYNC_PERCENT must be a number"

for tool in fio nbdcopy nbdinfo python3 numfmt cmp; do
	command -v "$tool" >/dev/null || die "$tool not found (make deps)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
if selected tls "$REPL_PARTS"; then
	command -v go >/dev/null || die "go not found: part tls runs go test ./bench/tlscost"
fi

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN=$BENCH_OUT/repl-$STAMP
RESULT=$BENCH_OUT/results-repl-$STAMP.md
mkdir -p "$RUN"
FAILURES=0

# Images, journals, spools and the replica's storage go to REPL_DIR: it has
# to be the disk being measured (tmpfs would measure memory).
mkdir -p "$REPL_DIR"
WORK=$(mktemp -d "$REPL_DIR/run.XXXXXX")
fstype=$(stat -f -c %T "$WORK")
[[ $fstype != tmpfs && $fstype != ramfs ]] || log "WARNING: $WORK is on $fstype: this measures memory, not a disk"
need=$((2 * (SEQ_BYTES + RAND_BYTES + 2 * SUSTAIN_DISK_BYTES + 2 * HOT_REGION_BYTES + RESYNC_BYTES + LAG_DISK_BYTES) + (2 << 30)))
avail=$(($(stat -f -c '%a * %S' "$WORK")))
((avail > need)) || log "WARNING: only $((avail >> 20)) MiB free under $REPL_DIR; this run may need $((need >> 20)) MiB"

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	cleanup_all
	if [[ $REPL_KEEP == 1 ]]; then
		log "kept $WORK"
	else
		rm -rf --one-file-system "$WORK"
		rmdir "$REPL_DIR" 2>/dev/null || true
	fi
	exit "$rc"
}
# A signal can arrive inside a command whose output goes to a log file: the
# trap puts the script's own stdout and stderr back first.
exec 3>&1 4>&2
trap on_exit EXIT
trap 'exec 1>&3 2>&4; log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- vdrepl ----
if [[ -z $VDREPL ]]; then
	VDREPL=$BENCH_OUT/vdrepl
	log "building ./cmd/vdrepl into $VDREPL"
	(cd "$ROOT" && go build -o "$VDREPL" ./cmd/vdrepl) >"$RUN/build.log" 2>&1 ||
		{ cat "$RUN/build.log" >&2; die "vdrepl did not build"; }
fi
VDREPL=$(realpath "$VDREPL")
[[ -x $VDREPL ]] || die "VDREPL=$VDREPL is not executable"

PRIM=$WORK/primary   # primary daemon's state
REPL=$WORK/replica   # replica daemon's state
STORE=$WORK/replicas # where the replica keeps the primary's VMs
PKI=$WORK/pki
IMAGES=$WORK/images # the primary's disk images
mkdir -p "$PRIM" "$REPL" "$IMAGES"
p() { "$VDREPL" --state "$PRIM" "$@"; }
r() { "$VDREPL" --state "$REPL" "$@"; }
tls_flags() { echo --tls-cert "$PKI/$1.crt" --tls-key "$PKI/$1.key" --tls-ca "$PKI/ca.crt"; }
export_uri() { echo "nbd+unix:///$1/disk0?socket=$PRIM/nbd.sock"; }

start_daemons() {
	"$VDREPL" pki init --dir "$PKI" >"$RUN/pki.log" 2>&1 || { cat "$RUN/pki.log" >&2; return 1; }
	"$VDREPL" pki issue --dir "$PKI" --name primary.bench >>"$RUN/pki.log" 2>&1 || return 1
	"$VDREPL" pki issue --dir "$PKI" --name replica.bench --san 127.0.0.1 >>"$RUN/pki.log" 2>&1 || return 1
	# shellcheck disable=SC2046,SC2086 # tls_flags and REPL_SERVE_ARGS are word lists
	spawn "vdrepl serve (replica)" "$RUN/replica.log" "$VDREPL" --state "$REPL" serve \
		--nbd "unix:$REPL/nbd.sock" $(tls_flags replica.bench) --replica-listen 127.0.0.1:0 $REPL_SERVE_ARGS
	REPL_PID=$SPAWNED
	# shellcheck disable=SC2046,SC2086
	spawn "vdrepl serve (primary)" "$RUN/primary.log" "$VDREPL" --state "$PRIM" serve \
		--nbd "unix:$PRIM/nbd.sock" --journal-cap "$REPL_JOURNAL_CAP" $(tls_flags primary.bench) $REPL_SERVE_ARGS
	PRIM_PID=$SPAWNED
	wait_until 60 "$REPL_PID" "replica daemon" r vm list || return 1
	wait_until 60 "$PRIM_PID" "primary daemon" p vm list || return 1
	REPLICA_ADDR=$(r status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["replica_listen"])')
	[[ -n $REPLICA_ADDR ]] || { log "the replica reports no listen address"; return 1; }
	r replica allow add --primary primary.bench --storage "$STORE" >>"$RUN/cli.log" 2>&1 || return 1
	log "replica listens on $REPLICA_ADDR (mutual TLS)"
}

daemons_alive() {
	alive "$PRIM_PID" || { log "the primary daemon died; see $RUN/primary.log"; return 1; }
	alive "$REPL_PID" || { log "the replica daemon died; see $RUN/replica.log"; return 1; }
}

stop_daemons() {
	local rc
	record_rss "$PRIM_PID" "$RUN/rss-primary-kb"
	record_rss "$REPL_PID" "$RUN/rss-replica-kb"
	for pid in "$PRIM_PID" "$REPL_PID"; do
		rc=0
		stop_pid "$pid" 60 || rc=$?
		[[ $rc == 0 ]] || { echo "a daemon (pid $pid) exited with status $rc at the end" >>"$RUN/notes"; FAILURES=$((FAILURES + 1)); }
	done
}

# --------------------------------------------------------------- helpers ----
kv() { echo "$2=$3" >>"$RUN/$1.kv"; } # PART KEY VALUE
note() { echo "$2" >>"$RUN/$1.notes"; } # PART TEXT
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; } # START END

# waiting CMD...: run CMD in the background and wait for it, so that SIGTERM
# or Ctrl-C stops the run at once (bash runs traps only after a foreground
# command exits; `wait` is interrupted). The cleanup stops CMD if we die.
waiting() {
	local pid rc=0
	"$@" &
	pid=$!
	BG_PIDS+=("$pid")
	BG_NAMES+=("$1")
	wait "$pid" || rc=$?
	forget_pid "$pid"
	return "$rc"
}

# status VM FILE: the primary's `replication status VM --json`.
status() { p replication status "$1" --json >"$2"; }
read_bytes() { awk '/^read_bytes:/ {print $2}' "/proc/$1/io"; } # PID: bytes it read from storage
# get FILE KEY...: fields of a status file (see repl_report.py --get).
get() { python3 "$BENCH/repl_report.py" --get "$@"; }

# add_vm VM SIZE|"" [IMAGE]: register a VM with one disk "disk0".
add_vm() {
	local vm=$1 size=$2 img=${3:-$IMAGES/$1.img}
	p vm add "$vm" --disk "disk0=$img${size:+:$size}" >>"$RUN/cli.log" 2>&1 ||
		{ tail -3 "$RUN/cli.log" >&2; return 1; }
	wait_until 30 "$PRIM_PID" "export $vm/disk0" nbdinfo --size "$(export_uri "$vm")"
}

# enable VM FREQUENCY COMPRESSION: replicate VM and wait for the initial copy.
enable() {
	p replication enable "$1" --replica "$REPLICA_ADDR" --frequency "$2" --compression="$3" \
		>>"$RUN/cli.log" 2>&1 || { tail -3 "$RUN/cli.log" >&2; return 1; }
	sync_vm "$1"
}

# sync_vm VM: close a cycle and wait until the replica applied it.
sync_vm() {
	waiting p replication sync "$1" >>"$RUN/cli.log" 2>&1 || { tail -3 "$RUN/cli.log" >&2; return 1; }
}

# run_fio PART NAME URI ARGS...: one fio job on an export, JSON in RUN/PART-NAME.json.
run_fio() {
	local part=$1 name=$2 uri=$3 out=$RUN/$1-$2
	shift 3
	log "  fio $name: $*"
	if ! waiting fio --name="$name" --ioengine=nbd --uri="$uri" --numjobs=1 "$@" \
		--output-format=json --output="$out.json" >"$out.log" 2>&1 ||
		! python3 "$BENCH/report.py" --check "$out.json" 2>>"$out.log"; then
		log "  fio $name FAILED; see $out.log"
		return 1
	fi
}

# verify PART VM: the replica's image equals the primary's export, byte for byte.
verify() {
	local part=$1 vm=$2
	[[ $REPL_VERIFY == 1 ]] || { kv "$part" "$vm.identical" skipped; return 0; }
	if waiting cmp -s <(nbdcopy "$(export_uri "$vm")" -) "$STORE/$vm/disk0.img"; then
		kv "$part" "$vm.identical" yes
	else
		kv "$part" "$vm.identical" NO
		note "$part" "$vm: the replica image differs from the primary's export after sync"
		log "  $vm: the replica image DIFFERS from the primary"
		FAILURES=$((FAILURES + 1))
	fi
}

# perf_start NAME / perf_stop: with REPL_PERF=1, `perf record -g` of both
# daemons around a measurement, into RUN/perf-NAME-{primary,replica}.data
# (read them with `perf report -i FILE --no-children`).
PERF_PIDS=()
perf_start() {
	local who pid
	PERF_PIDS=()
	for who in primary replica; do
		pid=$PRIM_PID
		[[ $who == replica ]] && pid=$REPL_PID
		perf record -F 499 -g -p "$pid" -o "$RUN/perf-$1-$who.data" >"$RUN/perf-$1-$who.log" 2>&1 &
		PERF_PIDS+=("$!")
	done
}
perf_stop() {
	local pid
	for pid in "${PERF_PIDS[@]}"; do
		kill -INT "$pid" 2>/dev/null || true
		wait "$pid" || true
	done
	PERF_PIDS=()
}

# ----------------------------------------------------------------- parts ----
# apply_job KIND: the fio job options of part 1's sequential or random load.
apply_job() {
	if [[ $1 == seq ]]; then
		echo --rw=write --bs=1M --iodepth=4
	else
		echo --rw=randwrite --bs=4k --iodepth=16
	fi
}

# 1. Applied MB/s: the time from the first write to `replication sync`
# done, for all the bytes written; compression off, incompressible data.
# A burst writes a fixed size once; a sustained load writes for
# REPL_SUSTAIN_SECONDS (fio time_based, over and over a disk of
# REPL_SUSTAIN_DISK) while the status is sampled for the lag.
part_apply() {
	if selected burst "$REPL_APPLY_MODES"; then
		apply_burst || return 1
	fi
	if selected sustained "$REPL_APPLY_MODES"; then
		apply_sustained || return 1
	fi
}

apply_burst() {
	local kind vm size t0 t1 t2
	local -a job
	for kind in seq rand; do
		vm=apply-$kind
		size=$SEQ_BYTES
		[[ $kind == rand ]] && size=$RAND_BYTES
		read -ra job <<<"$(apply_job "$kind") --size=$size"
		log "-- $vm: $((size >> 20)) MiB, every $REPL_APPLY_FREQUENCY, compression off"
		add_vm "$vm" "$size" || return 1
		enable "$vm" "$REPL_APPLY_FREQUENCY" false || return 1
		status "$vm" "$RUN/apply-$kind-before.json"
		[[ $REPL_PERF == 1 ]] && perf_start "apply-$kind"
		t0=$(now)
		run_fio apply "$kind" "$(export_uri "$vm")" "${job[@]}" --refill_buffers --randrepeat=0 || return 1
		t1=$(now)
		sync_vm "$vm" || return 1
		t2=$(now)
		[[ $REPL_PERF == 1 ]] && perf_stop
		status "$vm" "$RUN/apply-$kind-after.json"
		kv apply "$kind.size" "$size"
		kv apply "$kind.write_s" "$(secs "$t0" "$t1")"
		kv apply "$kind.sync_s" "$(secs "$t1" "$t2")"
		kv apply "$kind.total_s" "$(secs "$t0" "$t2")"
		log "  written in $(secs "$t0" "$t1") s, applied $(secs "$t1" "$t2") s later"
		verify apply "$vm"
	done
}

# apply_sustained: the same two loads for REPL_SUSTAIN_SECONDS each, cycles
# every REPL_APPLY_FREQUENCY; the sampler runs from the first write until
# `replication sync` is done, so the lag of the drain is in the samples.
apply_sustained() {
	local kind vm t0 t1 t2 spid
	local -a job
	for kind in seq rand; do
		vm=sustain-$kind
		read -ra job <<<"$(apply_job "$kind") --size=$SUSTAIN_DISK_BYTES"
		log "-- $vm: $REPL_SUSTAIN_SECONDS s on a $((SUSTAIN_DISK_BYTES >> 20)) MiB disk, every $REPL_APPLY_FREQUENCY, compression off"
		add_vm "$vm" "$SUSTAIN_DISK_BYTES" || return 1
		enable "$vm" "$REPL_APPLY_FREQUENCY" false || return 1
		status "$vm" "$RUN/sustain-$kind-before.json"
		[[ $REPL_PERF == 1 ]] && perf_start "sustain-$kind"
		sampler "$vm" "$RUN/sustain-$kind-samples.txt" &
		spid=$!
		BG_PIDS+=("$spid")
		BG_NAMES+=("status sampler")
		t0=$(now)
		run_fio sustain "$kind" "$(export_uri "$vm")" "${job[@]}" --time_based --runtime="$REPL_SUSTAIN_SECONDS" \
			--refill_buffers --randrepeat=0 || { stop_pid "$spid" 5 || true; return 1; }
		t1=$(now)
		kv sustain "$kind.disk" "$SUSTAIN_DISK_BYTES"
		kv sustain "$kind.seconds" "$REPL_SUSTAIN_SECONDS"
		kv sustain "$kind.t0" "$t0"
		kv sustain "$kind.write_s" "$(secs "$t0" "$t1")"
		if ! sync_vm "$vm"; then
			stop_pid "$spid" 5 || true
			[[ $REPL_PERF == 1 ]] && perf_stop
			status "$vm" "$RUN/sustain-$kind-after.json"
			# Falling so far behind that the journal passes its cap is a
			# result (the replica did not keep up), not a failure.
			[[ $(get "$RUN/sustain-$kind-after.json" state) == resync-required ]] || return 1
			kv sustain "$kind.overflow" 1
			rm -f "$RUN/sustain-$kind-samples.txt.tmp"
			log "  the journal passed its cap: resync required; $vm is left so"
			continue
		fi
		t2=$(now)
		stop_pid "$spid" 5 || true
		rm -f "$RUN/sustain-$kind-samples.txt.tmp"
		[[ $REPL_PERF == 1 ]] && perf_stop
		status "$vm" "$RUN/sustain-$kind-after.json"
		kv sustain "$kind.sync_s" "$(secs "$t1" "$t2")"
		kv sustain "$kind.total_s" "$(secs "$t0" "$t2")"
		log "  written for $(secs "$t0" "$t1") s, applied $(secs "$t1" "$t2") s later"
		verify sustain "$vm"
	done
}

# 2. Wire bytes per guest byte, hot-spot writes: the same offsets (same fio
# seed) with compression on and off; coalescing is always on (it is the
# cycle), "without coalescing" is what the guest wrote.
part_hotspot() {
	local comp vm
	for comp in true false; do
		vm=hot-$([[ $comp == true ]] && echo zstd || echo raw)
		log "-- $vm: $((HOT_WRITTEN_BYTES >> 20)) MiB of 4k writes on $((HOT_REGION_BYTES >> 20)) MiB, 80% on 20%, every $REPL_HOT_FREQUENCY, compression $comp"
		add_vm "$vm" "$HOT_REGION_BYTES" || return 1
		enable "$vm" "$REPL_HOT_FREQUENCY" "$comp" || return 1
		status "$vm" "$RUN/hotspot-$comp-before.json"
		run_fio hotspot "$comp" "$(export_uri "$vm")" --rw=randwrite --bs=4k --iodepth=16 \
			--size="$HOT_REGION_BYTES" --io_size="$HOT_WRITTEN_BYTES" --norandommap \
			--random_distribution=zoned:80/20:20/80 --randseed=20261123 \
			--refill_buffers --buffer_compress_percentage=50 \
			--write_iolog="$RUN/hotspot-$comp.iolog" || return 1
		sync_vm "$vm" || return 1
		status "$vm" "$RUN/hotspot-$comp-after.json"
		verify hotspot "$vm"
	done
}

# 3. TLS vs plain HTTP: the Go benchmark in bench/tlscost.
part_tls() {
	# Replication itself over TLS and over plain HTTP (the real shipper,
	# journal and replica in one process; 1 GiB per round, alternating
	# which goes first): the figure the goal is about.
	local rargs=(test -run '^$' -bench Replicate/raw -benchtime "${REPL_TLS_ROUNDS}x" -v -timeout 30m ./bench/tlscost)
	log "-- go ${rargs[*]}"
	kv tls replicate_command "go ${rargs[*]}"
	waiting go -C "$ROOT" "${rargs[@]}" >"$RUN/tls-replicate.txt" 2>&1 || { tail -20 "$RUN/tls-replicate.txt" >&2; return 1; }
	grep 'tls costs .* medians' "$RUN/tls-replicate.txt" | sed 's/^ */  /' >&2
	# The transport alone: 8 MiB PUTs and AES-GCM, an upper bound.
	local args=(test -run TestHandshake -v -bench 'Put|AESGCM' -benchtime "$REPL_TLS_BENCHTIME" -count "$REPL_TLS_COUNT" ./bench/tlscost)
	log "-- go ${args[*]}"
	kv tls command "go ${args[*]}"
	waiting go -C "$ROOT" "${args[@]}" >"$RUN/tls.txt" 2>&1 || { tail -20 "$RUN/tls.txt" >&2; return 1; }
	grep '^BenchmarkPut' "$RUN/tls.txt" | sed 's/^/  /' >&2
}

# 4. Resync after 1% of the blocks changed, against the initial copy of
# the same image. Replication is paused while the blocks change, so the
# journal's cycles would not carry them anyway: `replication resync` drops
# them and compares checksums.
part_resync() {
	local vm=resync img=$IMAGES/resync.img t0 t1 t2 t3 nios
	log "-- $vm: writing a $((RESYNC_BYTES >> 20)) MiB image of random data"
	waiting fio --name=fill --ioengine=psync --filename="$img" --rw=write --bs=1M --size="$RESYNC_BYTES" \
		--refill_buffers --randrepeat=0 --end_fsync=1 >"$RUN/resync-fill.log" 2>&1 ||
		{ log "  writing the image failed; see $RUN/resync-fill.log"; return 1; }
	add_vm "$vm" "" "$img" || return 1
	drop_caches
	log "  initial copy (compression on, the default)"
	t0=$(now)
	enable "$vm" 30s true || return 1
	t1=$(now)
	status "$vm" "$RUN/resync-initial.json"
	kv resync size "$RESYNC_BYTES"
	kv resync initial_s "$(secs "$t0" "$t1")"
	log "  initial copy: $(secs "$t0" "$t1") s"

	p replication pause "$vm" >>"$RUN/cli.log" 2>&1 || return 1
	nios=$(awk -v b="$RESYNC_BYTES" -v p="$REPL_RESYNC_PERCENT" 'BEGIN {printf "%d", b / 4096 * p / 100}')
	# No norandommap: fio's random map makes every write hit another block.
	run_fio resync change "$(export_uri "$vm")" --rw=randwrite --bs=4k --iodepth=16 \
		--size="$RESYNC_BYTES" --number_ios="$nios" --refill_buffers --randrepeat=0 || return 1
	kv resync changed_blocks "$nios"
	drop_caches
	status "$vm" "$RUN/resync-before.json"
	log "  resync of $nios changed 4k blocks"
	local pr0 rr0
	pr0=$(read_bytes "$PRIM_PID") rr0=$(read_bytes "$REPL_PID")
	t2=$(now)
	p replication resync "$vm" >>"$RUN/cli.log" 2>&1 || return 1
	p replication resume "$vm" >>"$RUN/cli.log" 2>&1 || return 1
	sync_vm "$vm" || return 1
	t3=$(now)
	# What each daemon read from storage during the resync (page cache
	# dropped before): the block trees should keep it near the changed
	# bytes, not the disk.
	kv resync primary_read_bytes $(($(read_bytes "$PRIM_PID") - pr0))
	kv resync replica_read_bytes $(($(read_bytes "$REPL_PID") - rr0))
	status "$vm" "$RUN/resync-after.json"
	kv resync resync_s "$(secs "$t2" "$t3")"
	log "  resync: $(secs "$t2" "$t3") s"
	verify resync "$vm"
	# The scrub: every block of both images read and compared, unpaced.
	drop_caches
	if p verify "$vm" --rate unlimited --json >"$RUN/resync-verify.json" 2>>"$RUN/cli.log"; then
		kv resync verify_ok 1
	else
		kv resync verify_ok 0
	fi
	log "  verify: $(get "$RUN/resync-verify.json" duration_seconds) s"
}

# sampler VM FILE: every REPL_LAG_SAMPLE seconds, one line of the primary's
# status: time, lag, state, health, last applied cycle, pending bytes, wire
# bytes of the cycles shipped so far.
sampler() {
	local vm=$1 out=$2 tmp=$2.tmp
	while :; do
		if p replication status "$vm" --json >"$tmp" 2>/dev/null; then
			echo "$EPOCHREALTIME $(get "$tmp" metrics.lag_seconds state health last_applied_cycle metrics.pending_bytes metrics.cycle_wire_bytes_total)" >>"$out"
		fi
		sleep "$REPL_LAG_SAMPLE"
	done
}

# 5. Lag under a steady load: rate-limited random writes for
# REPL_LAG_SECONDS, status sampled all along.
part_lag() {
	local vm=lag spid
	log "-- $vm: $REPL_LAG_SECONDS s of 64k random writes at $REPL_LAG_RATE/s, every $REPL_LAG_FREQUENCY"
	add_vm "$vm" "$LAG_DISK_BYTES" || return 1
	enable "$vm" "$REPL_LAG_FREQUENCY" true || return 1
	status "$vm" "$RUN/lag-before.json"
	sampler "$vm" "$RUN/lag-samples.txt" &
	spid=$!
	BG_PIDS+=("$spid")
	BG_NAMES+=("status sampler")
	run_fio lag load "$(export_uri "$vm")" --rw=randwrite --bs=64k --iodepth=4 --size="$LAG_DISK_BYTES" \
		--time_based --runtime="$REPL_LAG_SECONDS" --rate="$REPL_LAG_RATE" --norandommap \
		--refill_buffers --buffer_compress_percentage=50 || { stop_pid "$spid" 5 || true; return 1; }
	stop_pid "$spid" 5 || true
	rm -f "$RUN/lag-samples.txt.tmp"
	status "$vm" "$RUN/lag-after.json"
	kv lag frequency "$REPL_LAG_FREQUENCY"
	kv lag seconds "$REPL_LAG_SECONDS"
	kv lag rate "$REPL_LAG_RATE"
	sync_vm "$vm" || return 1
	verify lag "$vm"
}

# ------------------------------------------------------------------- meta ---
knobs_used() {
	local v out=""
	for v in REPL_QUICK REPL_PARTS REPL_SEQ_SIZE REPL_RAND_SIZE REPL_APPLY_FREQUENCY REPL_APPLY_MODES \
		REPL_SUSTAIN_SECONDS REPL_SUSTAIN_DISK REPL_HOT_REGION \
		REPL_HOT_WRITTEN REPL_HOT_FREQUENCY REPL_RESYNC_SIZE REPL_RESYNC_PERCENT REPL_LAG_SECONDS \
		REPL_LAG_FREQUENCY REPL_LAG_RATE REPL_LAG_DISK REPL_LAG_SAMPLE REPL_TLS_BENCHTIME REPL_TLS_COUNT \
		REPL_DIR REPL_JOURNAL_CAP REPL_VERIFY REPL_DROP_CACHES REPL_SERVE_ARGS VDREPL; do
		if printenv "$v" >/dev/null; then out+="$v='${!v}' "; fi
	done
	echo "${out}bench/repl.sh"
}

version() {
	if [[ -n ${REPL_VERSION:-} ]]; then
		echo "$REPL_VERSION"
	else
		(cd "$ROOT" && git describe --always --dirty 2>/dev/null) || echo unknown
	fi
}

{
	echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "host=$(hostname)"
	echo "cpu=$(nproc) x $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
	echo "ram=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
	echo "kernel=$(uname -sr)"
	echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
	echo "disk=$(disk_of "$WORK")"
	echo "command=${REPL_COMMAND:-$(knobs_used)}"
	echo "vdrepl=$(version)"
	echo "fio=$(fio --version)"
	echo "go=$(go version 2>/dev/null | cut -d' ' -f3)"
	echo "parts=$REPL_PARTS"
	echo "apply_frequency=$REPL_APPLY_FREQUENCY"
	echo "apply_modes=$REPL_APPLY_MODES"
	echo "hot_frequency=$REPL_HOT_FREQUENCY"
	echo "journal_cap=$REPL_JOURNAL_CAP"
	echo "serve_args=$REPL_SERVE_ARGS"
	echo "resync_percent=$REPL_RESYNC_PERCENT"
	echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RUN/meta"

# -------------------------------------------------------------------- run ---
log "run $STAMP: parts $REPL_PARTS; work dir $WORK ($(disk_of "$WORK")), results in $RUN"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" -v n="$(nproc)" 'BEGIN {exit !(l > n / 2)}'; then
	log "WARNING: load average $load1 on $(nproc) CPUs: other work will skew the numbers"
fi
start_daemons || die "the daemons did not start; see $RUN/*.log"
for part in $ALL_PARTS; do
	selected "$part" "$REPL_PARTS" || continue
	log "== $part"
	start=$(now)
	if ! "part_$part"; then
		log "part $part failed"
		echo "failed" >>"$RUN/$part.failed"
		note "$part" "the part failed; its logs are in ${RUN#"$ROOT"/}"
		FAILURES=$((FAILURES + 1))
		daemons_alive || break
	fi
	log "   $part took $(secs "$start" "$(now)") s"
	record_rss "$PRIM_PID" "$RUN/rss-primary-$part-kb" 2>/dev/null || true
	echo "$part $(cut -d' ' -f1 /proc/loadavg)" >>"$RUN/load"
done
stop_daemons
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN/meta"
python3 "$BENCH/repl_report.py" "$RUN" >"$RESULT"
echo
cat "$RESULT"
echo
log "table written to $RESULT (fio JSON, status samples and daemon logs in $RUN)"
if [[ $REPL_SAVE == 1 ]]; then
	cp "$RESULT" "$BENCH/RESULTS-replication.md"
	log "copied to bench/RESULTS-replication.md"
fi
if ((FAILURES > 0)); then
	log "$FAILURES failure(s): see the notes under the table"
	exit 1
fi
