# shellcheck shell=bash disable=SC2153
# Helpers for bench/fio.sh: logging, background processes, readiness polling,
# images, fio runs. Sourced, not executed. fio.sh sets the globals used here:
# SIZE, SIZE_BYTES, WORK, RUNTIME, RAMP, SEQ_QD, FSYNC_QD, BENCH, BENCH_JOBS,
# BENCH_DROP_CACHES, FAILURES.

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes --
# Every background process and mount this run starts is recorded here so that
# cleanup can undo it, on success, failure or Ctrl-C alike.
declare -a BG_PIDS=() BG_NAMES=() MOUNTS=()

# spawn NAME LOGFILE CMD... : start CMD in the background, remember its pid in
# $SPAWNED and in the cleanup list.
spawn() {
	local name=$1 logf=$2
	shift 2
	log "start $name: $*"
	"$@" </dev/null >"$logf" 2>&1 &
	SPAWNED=$!
	BG_PIDS+=("$SPAWNED")
	BG_NAMES+=("$name")
}

# alive PID: true while PID runs (a zombie child counts as dead).
alive() {
	local st
	[[ -r /proc/$1/stat ]] || return 1
	st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $st && $st != Z && $st != X ]]
}

# stop_pid PID [TIMEOUT]: SIGTERM, wait for the exit (poll), SIGKILL after
# TIMEOUT seconds; reap it. Returns the process's exit status when we can see
# it. Only ever signals pids this script started.
stop_pid() {
	local pid=$1 timeout=${2:-20} i rc=0
	local n=$((timeout * 10))
	if alive "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < n; i++)); do
			alive "$pid" || break
			sleep 0.1
		done
		if alive "$pid"; then
			log "pid $pid did not exit ${timeout}s after SIGTERM: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	wait "$pid" 2>/dev/null || rc=$?
	forget_pid "$pid"
	return "$rc"
}

forget_pid() {
	local i
	for i in "${!BG_PIDS[@]}"; do
		if [[ ${BG_PIDS[$i]} == "$1" ]]; then
			unset 'BG_PIDS[i]' 'BG_NAMES[i]'
		fi
	done
}

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

# unmount MNT: fusermount3 -u, retried while busy; lazy as a last resort.
unmount() {
	local mnt=$1 i
	for ((i = 0; i < 50; i++)); do
		is_mounted "$mnt" || break
		fusermount3 -u "$mnt" 2>/dev/null || true
		is_mounted "$mnt" || break
		sleep 0.1
	done
	if is_mounted "$mnt"; then
		log "$mnt still busy: lazy unmount"
		fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
	fi
	local m keep=()
	for m in "${MOUNTS[@]}"; do [[ $m == "$mnt" ]] || keep+=("$m"); done
	MOUNTS=("${keep[@]}")
}

cleanup_all() {
	local i m
	for m in "${MOUNTS[@]}"; do unmount "$m"; done
	# Newest first: clients before the servers they use.
	for ((i = ${#BG_PIDS[@]} - 1; i >= 0; i--)); do
		[[ -n ${BG_PIDS[$i]:-} ]] || continue
		log "stop ${BG_NAMES[$i]} (pid ${BG_PIDS[$i]})"
		stop_pid "${BG_PIDS[$i]}" 10 || true
	done
}

# wait_until TIMEOUT PID DESC CMD...: poll CMD every 0.1s until it succeeds.
# Fails early when PID (the process that should make it true; "-" for none)
# has exited, and after TIMEOUT seconds.
wait_until() {
	local timeout=$1 pid=$2 desc=$3 i
	shift 3
	local n=$((timeout * 10))
	for ((i = 0; i < n; i++)); do
		if "$@" >/dev/null 2>&1; then
			return 0
		fi
		if [[ $pid != - ]] && ! alive "$pid"; then
			log "waiting for $desc: process $pid exited"
			return 1
		fi
		sleep 0.1
	done
	log "waiting for $desc: timed out after ${timeout}s"
	return 1
}

# nbd_ready URI: the export answers the handshake and has the expected size.
nbd_ready() {
	local size
	size=$(nbdinfo --size "$1" 2>/dev/null) || return 1
	[[ $size == "$SIZE_BYTES" ]]
}

# file_ready PATH: the FUSE file exists with the expected size.
file_ready() {
	[[ -f $1 ]] && [[ $(stat -c %s "$1" 2>/dev/null) == "$SIZE_BYTES" ]]
}

# ------------------------------------------------------------------- images --
# make_base: one image of random data per run. Written data, not a fallocate'd
# range: unwritten extents read back as zeros without touching the disk, which
# would flatter every reader.
make_base() {
	local base=$WORK/base.raw
	log "writing the $SIZE base image with random data ($base)"
	dd if=/dev/urandom of="$base" bs=1M count=$((SIZE_BYTES / 1048576)) \
		iflag=fullblock conv=fsync status=none
}

# fresh_image PATH: a private, fully allocated copy of the base image. No
# reflink: a shared extent would turn the first overwrite of each block into
# copy-on-write for some targets and not others.
fresh_image() {
	mkdir -p "$(dirname "$1")"
	cp --reflink=never --sparse=never "$WORK/base.raw" "$1"
	sync -f "$1"
	drop_caches
}

# drop_caches: start every target with a cold page cache (root only; no-op
# otherwise).
drop_caches() {
	if [[ $BENCH_DROP_CACHES == 1 && -w /proc/sys/vm/drop_caches ]]; then
		sync
		echo 3 >/proc/sys/vm/drop_caches
	fi
}

# direct_ok FILE: O_DIRECT read and write work on FILE.
direct_ok() {
	dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null &&
		dd if="$1" of="$1" bs=4096 count=1 iflag=direct oflag=direct conv=notrunc status=none 2>/dev/null
}

# selected NAME LIST: NAME is in the comma/space separated LIST, or LIST is
# empty (everything selected).
selected() {
	local x
	[[ -z $2 ]] && return 0
	for x in ${2//,/ }; do
		[[ $x == "$1" ]] && return 0
	done
	return 1
}

# ---------------------------------------------------------------------- fio --
# Jobs: NAME|fio arguments. Names are stable: report.py keys on them.
bench_jobs() {
	local rt=$RUNTIME rp=$RAMP
	local common="--time_based --runtime=$rt --ramp_time=$rp --numjobs=1"
	printf '%s\n' \
		"randwrite-4k-qd1|$common --rw=randwrite --bs=4k --iodepth=1 --norandommap" \
		"randwrite-4k-qd16|$common --rw=randwrite --bs=4k --iodepth=16 --norandommap" \
		"write-1m-seq|$common --rw=write --bs=1M --iodepth=$SEQ_QD" \
		"randwrite-4k-fsync32|$common --rw=randwrite --bs=4k --iodepth=$FSYNC_QD --norandommap --fsync=32" \
		"randread-4k-qd16|$common --rw=randread --bs=4k --iodepth=16 --norandommap"
}

# run_jobs OUTDIR KIND TARGET...: run every selected job; KIND is "nbd" (TARGET
# is a URI) or "file" (TARGET is a path). Failures are recorded, not fatal: the
# table shows ERR and the script exits non-zero at the end.
run_jobs() {
	local out=$1 kind=$2 where=$3 line name args rc
	local -a engine
	if [[ $kind == nbd ]]; then
		engine=(--ioengine=nbd "--uri=$where")
	else
		local direct=1
		if ! direct_ok "$where"; then
			log "O_DIRECT refused on $where: running buffered (direct=0)"
			direct=0
			echo "direct=0" >>"$out/notes"
		fi
		engine=(--ioengine=libaio "--direct=$direct" "--filename=$where")
	fi
	while IFS= read -r line; do
		name=${line%%|*}
		args=${line#*|}
		selected "$name" "$BENCH_JOBS" || continue
		log "  fio $name"
		rc=0
		if [[ -n ${FIO_USER:-} ]]; then
			# As another user, who cannot write $out: JSON on stdout.
			# shellcheck disable=SC2086 # $args is a word list by design
			setpriv --reuid="$FIO_USER" --regid="$(id -g "$FIO_USER")" --clear-groups \
				env HOME="${FIO_HOME:-/nonexistent}" fio --name="$name" "${engine[@]}" $args \
				--output-format=json >"$out/$name.json" 2>"$out/$name.log" || rc=$?
		else
			# shellcheck disable=SC2086 # $args is a word list by design
			fio --name="$name" "${engine[@]}" $args \
				--output-format=json --output="$out/$name.json" \
				>"$out/$name.log" 2>&1 || rc=$?
		fi
		if [[ $rc != 0 ]] || ! python3 "$BENCH/report.py" --check "$out/$name.json" 2>>"$out/$name.log"; then
			log "  fio $name FAILED (exit $rc); see $out/$name.log"
			echo "$name" >>"$out/failed"
			FAILURES=$((FAILURES + 1))
		fi
		if [[ -n ${HEALTH_PID:-} ]] && ! alive "$HEALTH_PID"; then
			log "  server $HEALTH_PID died during $name"
			echo "server died during $name" >>"$out/notes"
			FAILURES=$((FAILURES + 1))
			return 1
		fi
	done < <(bench_jobs)
}

# record_rss PID OUTFILE: the daemon's peak resident set (VmHWM) so far, kB.
record_rss() {
	local hwm
	hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null) || true
	if [[ -n $hwm ]]; then
		echo "$hwm" >"$2"
		log "  peak RSS of pid $1: $((hwm / 1024)) MiB"
	fi
}

disk_of() { # the block device (and model) under a path
	local src dev
	src=$(df --output=source "$1" | tail -1)
	dev=$(lsblk -no PKNAME "$src" 2>/dev/null | head -1)
	[[ -n $dev ]] || dev=$(basename "$src")
	local model rota size
	model=$(lsblk -dno MODEL "/dev/$dev" 2>/dev/null | xargs || true)
	rota=$(lsblk -dno ROTA "/dev/$dev" 2>/dev/null | xargs || true)
	size=$(lsblk -dno SIZE "/dev/$dev" 2>/dev/null | xargs || true)
	echo "$dev${model:+ ($model)}, $size, rotational=$rota, $(findmnt -no FSTYPE -T "$1") filesystem"
}
