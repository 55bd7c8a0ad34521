#!/usr/bin/env bash
# bench/fio.sh — fio on the same image through eight paths, one Markdown table.
#
#   exports (fio's nbd engine):  qemu-nbd --cache=none --aio=native,
#                                nbdkit file plugin (page cache, flush = fdatasync),
#                                vdrepl's NBD export
#   files (libaio, direct=1):    the raw image itself, nbdfuse over qemu-nbd,
#                                vdrepl's FUSE mount
#   the TLS row (4k QD16, 1M):   vdrepl's export over TCP, plain and NBD TLS
#   the tree row (4k QD16, 1M):  vdrepl's export without block trees
#                                (serve --no-block-tree), against vdrepl-nbd
#
# Ratios: vdrepl-nbd to qemu-nbd and to nbdkit, vdrepl-fuse to nbdfuse,
# vdrepl over nbds:// to plain nbd:// (the cost of TLS), vdrepl-nbd to
# vdrepl without block trees (the cost of the checksums, issue 12).
# BENCH_ROUNDS rounds (default 3), each every target in turn; the table shows
# medians. See bench/README.md for the knobs; BENCH_QUICK=1 is a ~3 minute
# smoke test (one round).
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

ALL_TARGETS="raw qemu-nbd nbdkit vdrepl-nbd vdrepl-notree nbdfuse vdrepl-fuse vdrepl-tcp vdrepl-nbds"
# The TLS row: the jobs the TCP targets run.
TLS_JOBS="randwrite-4k-qd16 write-1m-seq"

# ------------------------------------------------------------------- knobs --
BENCH_QUICK=${BENCH_QUICK:-0}
if [[ $BENCH_QUICK == 1 ]]; then
	BENCH_SIZE=${BENCH_SIZE:-256M}
	BENCH_RUNTIME=${BENCH_RUNTIME:-5}
	BENCH_RAMP=${BENCH_RAMP:-1}
	BENCH_ROUNDS=${BENCH_ROUNDS:-1}
fi
BENCH_SIZE=${BENCH_SIZE:-2G}
BENCH_RUNTIME=${BENCH_RUNTIME:-20}
BENCH_RAMP=${BENCH_RAMP:-5}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp/vdrepl-bench}
BENCH_TARGETS=${BENCH_TARGETS:-$ALL_TARGETS}
BENCH_JOBS=${BENCH_JOBS:-}
BENCH_TRANSPORT=${BENCH_TRANSPORT:-unix}
BENCH_PORT=${BENCH_PORT:-10910}
BENCH_SEQ_QD=${BENCH_SEQ_QD:-4}
BENCH_FSYNC_QD=${BENCH_FSYNC_QD:-1}
BENCH_DROP_CACHES=${BENCH_DROP_CACHES:-1}
BENCH_KEEP=${BENCH_KEEP:-0}
BENCH_SAVE=${BENCH_SAVE:-0}
BENCH_OUT=${BENCH_OUT:-$BENCH/out}
VDREPL_SERVE_ARGS=${VDREPL_SERVE_ARGS:-}
VDREPL=${VDREPL:-}

usage() {
	sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
	echo
	sed -n '/^## Knobs/,/^## /p' "$BENCH/README.md" | sed '$d'
}
case ${1:-} in
-h | --help) usage; exit 0 ;;
"") ;;
*) die "no arguments expected (knobs are environment variables; see --help)" ;;
esac

for t in $BENCH_TARGETS; do
	selected "$t" "$ALL_TARGETS" || die "BENCH_TARGETS: unknown target '$t' (have: $ALL_TARGETS)"
done
[[ $BENCH_TRANSPORT == unix || $BENCH_TRANSPORT == tcp ]] || die "BENCH_TRANSPORT must be unix or tcp"
[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a whole number, at least 1"
SIZE_BYTES=$(numfmt --from=iec "$BENCH_SIZE") || die "BENCH_SIZE: cannot parse '$BENCH_SIZE'"
((SIZE_BYTES >= 64 * 1048576 && SIZE_BYTES % 1048576 == 0)) || die "BENCH_SIZE must be a whole number of MiB, at least 64M"
SIZE=$BENCH_SIZE
RUNTIME=$BENCH_RUNTIME RAMP=$BENCH_RAMP SEQ_QD=$BENCH_SEQ_QD FSYNC_QD=$BENCH_FSYNC_QD

for tool in fio nbdinfo python3 numfmt; do
	command -v "$tool" >/dev/null || die "$tool not found (make deps)"
done
need_tool() { command -v "$1" >/dev/null || die "$1 not found; needed by target $2 (make deps)"; }
selected qemu-nbd "$BENCH_TARGETS" && need_tool qemu-nbd qemu-nbd
selected nbdkit "$BENCH_TARGETS" && need_tool nbdkit nbdkit
if selected nbdfuse "$BENCH_TARGETS"; then need_tool nbdfuse nbdfuse; need_tool qemu-nbd nbdfuse; fi
if selected nbdfuse "$BENCH_TARGETS" || selected vdrepl-fuse "$BENCH_TARGETS"; then
	need_tool fusermount3 FUSE
	[[ -e /dev/fuse ]] || die "/dev/fuse missing: FUSE targets cannot run"
fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN=$BENCH_OUT/run-$STAMP
RESULT=$BENCH_OUT/results-$STAMP.md
mkdir -p "$RUN"
FAILURES=0

# The work directory holds images, journals, sockets and mount points. It has
# to be on the disk being measured: tmpfs would measure memory.
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
fstype=$(stat -f -c %T "$WORK")
[[ $fstype != tmpfs && $fstype != ramfs ]] || log "WARNING: $WORK is on $fstype: this measures memory, not a disk"
avail=$(($(stat -f -c '%a * %S' "$WORK")))
((avail > 4 * SIZE_BYTES)) || log "WARNING: only $((avail >> 20)) MiB free under $BENCH_DIR; want 4x the image size"

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	cleanup_all
	if [[ $BENCH_KEEP == 1 ]]; then
		log "kept $WORK"
	else
		rm -rf --one-file-system "$WORK"
		[[ -z $TLS_HOME ]] || rm -rf "$TLS_HOME"
		rmdir "$BENCH_DIR" 2>/dev/null || true
	fi
	exit "$rc"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- vdrepl ----
VDREPL_NOTE=""
need_vdrepl() {
	local t
	for t in vdrepl-nbd vdrepl-fuse vdrepl-tcp vdrepl-nbds; do selected "$t" "$BENCH_TARGETS" && return 0; done
	return 1
}
if need_vdrepl; then
	if [[ -z $VDREPL ]]; then
		VDREPL=$BENCH_OUT/vdrepl
		log "building ./cmd/vdrepl into $VDREPL"
		if ! (cd "$ROOT" && go build -o "$VDREPL" ./cmd/vdrepl) >"$RUN/build.log" 2>&1; then
			cat "$RUN/build.log" >&2
			VDREPL_NOTE="vdrepl did not build (see $RUN/build.log): its columns are empty"
			log "$VDREPL_NOTE"
			VDREPL=""
			FAILURES=$((FAILURES + 1))
		fi
	fi
	if [[ -n $VDREPL ]]; then
		VDREPL=$(realpath "$VDREPL")
		[[ -x $VDREPL ]] || die "VDREPL=$VDREPL is not executable"
	fi
fi

# ------------------------------------------------------------ transports ----
# listen_args KIND TARGET SOCKET PORT -> the server's listen flags, one per line.
port_of() { # stable port per target
	case $1 in
	qemu-nbd) echo $((BENCH_PORT)) ;; nbdkit) echo $((BENCH_PORT + 1)) ;;
	vdrepl-nbd) echo $((BENCH_PORT + 2)) ;; nbdfuse) echo $((BENCH_PORT + 3)) ;;
	vdrepl-fuse) echo $((BENCH_PORT + 4)) ;;
	vdrepl-tcp) echo $((BENCH_PORT + 5)) ;; vdrepl-nbds) echo $((BENCH_PORT + 6)) ;;
	vdrepl-notree) echo $((BENCH_PORT + 7)) ;;
	esac
}
# uri TARGET SOCKET EXPORT
uri() {
	if [[ $BENCH_TRANSPORT == unix ]]; then
		echo "nbd+unix:///$3?socket=$2"
	else
		echo "nbd://127.0.0.1:$(port_of "$1")/$3"
	fi
}

start_qemu_nbd() { # TARGET DIR IMG -> QEMU_PID, QEMU_URI
	local t=$1 dir=$2 img=$3 sock=$2/qemu-nbd.sock
	local -a listen=(--socket="$sock")
	[[ $BENCH_TRANSPORT == tcp ]] && listen=(--bind=127.0.0.1 --port="$(port_of "$t")")
	rm -f "$sock"
	spawn qemu-nbd "$RDIR/$t/qemu-nbd.log" qemu-nbd --cache=none --aio=native --format=raw \
		--persistent --shared=16 "${listen[@]}" --export-name=bench "$img"
	QEMU_PID=$SPAWNED
	QEMU_URI=$(uri "$t" "$sock" bench)
	wait_until 30 "$QEMU_PID" "qemu-nbd" nbd_ready "$QEMU_URI"
}

# ---------------------------------------------------------------- targets ---
# Each target_* writes its logs and fio results under $RDIR/TARGET, RDIR being
# the current round's directory (set by the round loop at the end).
target_raw() {
	local img=$WORK/raw/img.raw
	fresh_image "$img" || return 1
	run_jobs "$RDIR/raw" file "$img" || true
}

target_qemu-nbd() {
	local dir=$WORK/qemu-nbd
	fresh_image "$dir/img.raw" || return 1
	start_qemu_nbd qemu-nbd "$dir" "$dir/img.raw" || return 1
	HEALTH_PID=$QEMU_PID run_jobs "$RDIR/qemu-nbd" nbd "$QEMU_URI" || true
	stop_pid "$QEMU_PID" || true
}

target_nbdkit() {
	local dir=$WORK/nbdkit sock=$WORK/nbdkit/nbdkit.sock
	fresh_image "$dir/img.raw" || return 1
	local -a listen=(--unix "$sock")
	[[ $BENCH_TRANSPORT == tcp ]] && listen=(--ipaddr 127.0.0.1 --port "$(port_of nbdkit)")
	rm -f "$sock"
	# Defaults on purpose: cache=default (page cache), flush = fdatasync,
	# multi-conn advertised, 16 threads.
	spawn nbdkit "$RDIR/nbdkit/nbdkit.log" nbdkit --foreground "${listen[@]}" \
		--exportname bench file file="$dir/img.raw"
	local pid=$SPAWNED u
	u=$(uri nbdkit "$sock" bench)
	wait_until 30 "$pid" nbdkit nbd_ready "$u" || return 1
	HEALTH_PID=$pid run_jobs "$RDIR/nbdkit" nbd "$u" || true
	stop_pid "$pid" || true
}

target_nbdfuse() {
	local dir=$WORK/nbdfuse mnt=$WORK/nbdfuse/mnt
	fresh_image "$dir/img.raw" || return 1
	start_qemu_nbd nbdfuse "$dir" "$dir/img.raw" || return 1
	mkdir -p "$mnt"
	MOUNTS+=("$mnt")
	spawn nbdfuse "$RDIR/nbdfuse/nbdfuse.log" nbdfuse "$mnt" "$QEMU_URI"
	local fpid=$SPAWNED
	wait_until 30 "$fpid" "nbdfuse mount" file_ready "$mnt/nbd" || return 1
	HEALTH_PID=$fpid run_jobs "$RDIR/nbdfuse" file "$mnt/nbd" || true
	unmount "$mnt"
	stop_pid "$fpid" || true
	stop_pid "$QEMU_PID" || true
}

# make_pki: a CA, a certificate for the daemon (127.0.0.1), and a client
# certificate laid out for libnbd. fio's nbd engine (libnbd) refuses
# tls-certificates= in a URI (it reads a local file), so the files go where
# libnbd looks by default: for root that is /etc/pki/libnbd, which a bench
# must not touch, for other users $HOME/.pki/libnbd. So the clients of the
# TLS row run as TCP_ROW_USER with HOME=TLS_HOME, on both of its targets
# alike (the user fio runs as does not change a network client's speed).
TCP_ROW_USER=nobody
PKI="" TLS_HOME=""
make_pki() {
	[[ -n $PKI ]] && return 0
	PKI=$WORK/pki
	TLS_HOME=$(mktemp -d /tmp/vdrepl-bench-tls.XXXXXX)
	{
		"$VDREPL" pki init --dir "$PKI" --name bench &&
			"$VDREPL" pki issue --dir "$PKI" --name bench.host --san 127.0.0.1 &&
			"$VDREPL" pki issue --dir "$PKI" --client bench-fio &&
			"$VDREPL" pki export --dir "$PKI" --client bench-fio --libnbd "$TLS_HOME/.pki/libnbd" &&
			chown -R "$TCP_ROW_USER" "$TLS_HOME"
	} >"$RUN/pki.log" 2>&1 || { cat "$RUN/pki.log" >&2; PKI=""; return 1; }
}

# nbds_ready URI: nbd_ready as the TLS row's client.
nbds_ready() {
	local size
	size=$(setpriv --reuid="$TCP_ROW_USER" --regid="$(id -g "$TCP_ROW_USER")" --clear-groups \
		env HOME="$TLS_HOME" nbdinfo --size "$1" 2>/dev/null) || return 1
	[[ $size == "$SIZE_BYTES" ]]
}

# start_vdrepl TARGET DIR -> VD_PID, VD_STATE, VD_SOCK, VD_URI; image DIR/img.raw
# registered as VM "bench", export bench/img. vdrepl-tcp serves plain NBD on
# loopback (--nbd-insecure), vdrepl-nbds NBD TLS with the client allowed;
# the others follow BENCH_TRANSPORT.
start_vdrepl() {
	local t=$1 dir=$2
	VD_STATE=$dir/state
	VD_SOCK=$VD_STATE/nbd.sock
	mkdir -p "$VD_STATE"
	local -a listen=(--nbd "unix:$VD_SOCK")
	local port
	port=$(port_of "$t")
	case $t in
	vdrepl-tcp)
		make_pki || return 1 # for TLS_HOME: both targets' clients run alike
		listen=(--nbd "tcp:127.0.0.1:$port" --nbd-insecure)
		;;
	vdrepl-nbds)
		make_pki || return 1
		listen=(--nbd "tcp:127.0.0.1:$port" --tls-cert "$PKI/bench.host.crt" --tls-key "$PKI/bench.host.key" --tls-ca "$PKI/ca.crt")
		;;
	*) [[ $BENCH_TRANSPORT == tcp ]] && listen=(--nbd "tcp:127.0.0.1:$port" --nbd-insecure) ;;
	esac
	[[ $t == vdrepl-notree ]] && listen+=(--no-block-tree)
	# shellcheck disable=SC2086 # VDREPL_SERVE_ARGS is a word list
	spawn "vdrepl serve" "$RDIR/$t/vdrepl.log" "$VDREPL" --state "$VD_STATE" serve \
		"${listen[@]}" $VDREPL_SERVE_ARGS
	VD_PID=$SPAWNED
	wait_until 60 "$VD_PID" "vdrepl control socket" "$VDREPL" --state "$VD_STATE" vm list || return 1
	"$VDREPL" --state "$VD_STATE" vm add bench --disk "$dir/img.raw" >>"$RDIR/$t/vdrepl-cli.log" 2>&1 ||
		{ cat "$RDIR/$t/vdrepl-cli.log" >&2; return 1; }
	case $t in
	vdrepl-tcp) VD_URI="nbd://127.0.0.1:$port/bench/img" ;;
	vdrepl-nbds)
		"$VDREPL" --state "$VD_STATE" nbd allow add --client bench-fio --export bench >>"$RDIR/$t/vdrepl-cli.log" 2>&1 ||
			{ cat "$RDIR/$t/vdrepl-cli.log" >&2; return 1; }
		VD_URI="nbds://127.0.0.1:$port/bench/img"
		wait_until 60 "$VD_PID" "vdrepl export bench/img" nbds_ready "$VD_URI"
		return
		;;
	*) VD_URI=$(uri "$t" "$VD_SOCK" bench/img) ;;
	esac
	wait_until 60 "$VD_PID" "vdrepl export bench/img" nbd_ready "$VD_URI"
}

stop_vdrepl() { # TARGET
	"$VDREPL" --state "$VD_STATE" status >"$RDIR/$1/vdrepl-status.txt" 2>&1 || true
	record_rss "$VD_PID" "$RDIR/$1/rss-kb"
	local rc=0
	stop_pid "$VD_PID" 60 || rc=$?
	[[ $rc == 0 ]] || { log "vdrepl serve exited with status $rc"; echo "daemon exit status $rc" >>"$RDIR/$1/notes"; }
}

target_vdrepl-nbd() {
	local dir=$WORK/vdrepl-nbd
	fresh_image "$dir/img.raw" || return 1
	start_vdrepl vdrepl-nbd "$dir" || { stop_vdrepl vdrepl-nbd; return 1; }
	HEALTH_PID=$VD_PID run_jobs "$RDIR/vdrepl-nbd" nbd "$VD_URI" || true
	stop_vdrepl vdrepl-nbd
}

# The tree row: vdrepl-nbd's export with the journal keeping no block
# tree, on the TLS row's jobs (4k QD16 and 1M): what the checksums cost.
target_vdrepl-notree() {
	local dir=$WORK/vdrepl-notree jobs
	jobs=$(tls_row_jobs)
	if [[ -z $jobs ]]; then
		echo "skipped: BENCH_JOBS selects none of $TLS_JOBS" >>"$RDIR/vdrepl-notree/notes"
		return 0
	fi
	fresh_image "$dir/img.raw" || return 1
	start_vdrepl vdrepl-notree "$dir" || { stop_vdrepl vdrepl-notree; return 1; }
	BENCH_JOBS=$jobs HEALTH_PID=$VD_PID run_jobs "$RDIR/vdrepl-notree" nbd "$VD_URI" || true
	stop_vdrepl vdrepl-notree
}

# tls_row_jobs: the TLS row's jobs that BENCH_JOBS selects.
tls_row_jobs() {
	local j out=""
	for j in $TLS_JOBS; do selected "$j" "$BENCH_JOBS" && out+="$j "; done
	echo "$out"
}

# The TLS row: the same export over TCP, plain (vdrepl-tcp) and NBD TLS
# (vdrepl-nbds), on the row's jobs only.
target_tcp_row() { # TARGET
	local t=$1 dir=$WORK/$1 jobs
	jobs=$(tls_row_jobs)
	if [[ -z $jobs ]]; then
		echo "skipped: BENCH_JOBS selects none of $TLS_JOBS" >>"$RDIR/$t/notes"
		return 0
	fi
	fresh_image "$dir/img.raw" || return 1
	start_vdrepl "$t" "$dir" || { stop_vdrepl "$t"; return 1; }
	FIO_USER=$TCP_ROW_USER FIO_HOME=$TLS_HOME BENCH_JOBS=$jobs HEALTH_PID=$VD_PID \
		run_jobs "$RDIR/$t" nbd "$VD_URI" || true
	stop_vdrepl "$t"
}
target_vdrepl-tcp() { target_tcp_row vdrepl-tcp; }
target_vdrepl-nbds() { target_tcp_row vdrepl-nbds; }

target_vdrepl-fuse() {
	local dir=$WORK/vdrepl-fuse mnt=$WORK/vdrepl-fuse/mnt
	fresh_image "$dir/img.raw" || return 1
	start_vdrepl vdrepl-fuse "$dir" || { stop_vdrepl vdrepl-fuse; return 1; }
	mkdir -p "$mnt"
	MOUNTS+=("$mnt")
	spawn "vdrepl mount" "$RDIR/vdrepl-fuse/mount.log" "$VDREPL" --state "$VD_STATE" mount "$mnt"
	local mpid=$SPAWNED
	if wait_until 60 "$mpid" "vdrepl mount" file_ready "$mnt/bench/img.img"; then
		HEALTH_PID=$VD_PID run_jobs "$RDIR/vdrepl-fuse" file "$mnt/bench/img.img" || true
	else
		echo "mount did not come up" >>"$RDIR/vdrepl-fuse/notes"
		FAILURES=$((FAILURES + 1))
	fi
	# vdrepl mount unmounts on SIGTERM; fusermount3 only if it did not.
	stop_pid "$mpid" 30 || true
	unmount "$mnt"
	stop_vdrepl vdrepl-fuse
}

# ------------------------------------------------------------------- meta ---
knobs_used() {
	local v out=""
	for v in BENCH_QUICK BENCH_ROUNDS BENCH_SIZE BENCH_RUNTIME BENCH_RAMP BENCH_DIR BENCH_TARGETS BENCH_JOBS \
		BENCH_TRANSPORT BENCH_SEQ_QD BENCH_FSYNC_QD BENCH_DROP_CACHES VDREPL VDREPL_SERVE_ARGS; do
		[[ -n ${!v+x} && -n ${!v} ]] || continue
		# only the knobs the user set, not our defaults
		if printenv "$v" >/dev/null; then out+="$v='${!v}' "; fi
	done
	echo "${out}bench/fio.sh"
}

{
	echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "host=$(hostname)"
	echo "cpu=$(nproc) x $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
	echo "ram=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
	echo "kernel=$(uname -sr)"
	echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
	echo "disk=$(disk_of "$WORK")"
	echo "command=${BENCH_COMMAND:-$(knobs_used)}"
	echo "size=$SIZE"
	echo "runtime=$RUNTIME"
	echo "ramp=$RAMP"
	echo "rounds=$BENCH_ROUNDS"
	echo "seq_qd=$SEQ_QD"
	echo "fsync_qd=$FSYNC_QD"
	echo "transport=$BENCH_TRANSPORT"
	echo "targets=$BENCH_TARGETS"
	echo "fio=$(fio --version)"
	echo "qemu_nbd=$(qemu-nbd --version 2>/dev/null | head -1)"
	echo "nbdkit=$(nbdkit --version 2>/dev/null | head -1)"
	echo "nbdfuse=$(nbdfuse --version 2>/dev/null | head -1)"
	echo "vdrepl=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet HEAD -- . 2>/dev/null || echo '+dirty')"
	echo "vdrepl_note=$VDREPL_NOTE"
	echo "vdrepl_args=$VDREPL_SERVE_ARGS"
	echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RUN/meta"

# -------------------------------------------------------------------- run ---
log "run $STAMP: $BENCH_ROUNDS round(s), size $SIZE, ${RUNTIME}s + ${RAMP}s ramp per job, targets: $BENCH_TARGETS"
log "work dir $WORK ($(disk_of "$WORK")), results in $RUN"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" -v n="$(nproc)" 'BEGIN {exit !(l > n / 2)}'; then
	log "WARNING: load average $load1 on $(nproc) CPUs: other work will skew the numbers"
fi
make_base
# Each round is the whole single-run procedure (every target, fresh image and
# server, every job); rounds interleave the targets in time, so a drift of the
# machine's speed lands on all of them alike. Results: $RUN/round-N/TARGET/.
for ((round = 1; round <= BENCH_ROUNDS; round++)); do
	RDIR=$RUN/round-$round
	mkdir -p "$RDIR"
	log "=== round $round/$BENCH_ROUNDS"
	echo "start=$(date -u '+%H:%M') load=$(cut -d' ' -f1 /proc/loadavg)" >"$RDIR/started"
	for t in $ALL_TARGETS; do
		selected "$t" "$BENCH_TARGETS" || continue
		mkdir -p "$RDIR/$t"
		if [[ $t == vdrepl-* && -z $VDREPL ]]; then
			echo "skipped: $VDREPL_NOTE" >>"$RDIR/$t/notes"
			continue
		fi
		log "== $t (round $round/$BENCH_ROUNDS)"
		if ! "target_$t"; then
			log "target $t failed to start; see $RDIR/$t/*.log"
			echo "failed to start (see logs)" >>"$RDIR/$t/notes"
			FAILURES=$((FAILURES + 1))
		fi
		cleanup_all # anything a failed target left behind
		rm -rf --one-file-system "${WORK:?}/$t"
	done
done

echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN/meta"
python3 "$BENCH/report.py" "$RUN" >"$RESULT"
echo
cat "$RESULT"
echo
log "table written to $RESULT (raw fio JSON in $RUN)"
if [[ $BENCH_SAVE == 1 ]]; then
	cp "$RESULT" "$BENCH/RESULTS.md"
	log "copied to bench/RESULTS.md"
fi
if ((FAILURES > 0)); then
	log "$FAILURES failure(s): see the notes under the table"
	exit 1
fi
