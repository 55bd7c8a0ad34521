#!/usr/bin/env bash
# Boots a small Linux guest with qemu-system-x86_64 whose one disk is a vdrepl
# NBD export (or an image file), runs one job in it and reports the result.
#
#   scripts/guest.sh [options] JOB DISK
#   scripts/guest.sh prepare
#
# JOB is write, verify or write-loop (scripts/guest/init says what each does);
# DISK is nbd+unix:///VM/DISK?socket=SOCK, nbd://HOST:PORT/VM/DISK or an image
# file. `prepare` only fetches the kernel, builds the initramfs and picks the
# accelerator, printing what it chose.
#
# Options:
#   --log FILE        the serial console goes here (default CACHE/JOB.log)
#   --timeout SEC     fail when no result marker appears within SEC (default
#                     300; write-loop runs until it is killed unless given)
#   --seed N          content seed (default 1); --files N files (default 16)
#   --readonly        attach the disk read-only
#   --recovery        verify: replay a journal that needs it (a crash-consistent
#                     recovery point) before fsck instead of failing
#   --accel auto|kvm|tcg   (default $VDREPL_GUEST_ACCEL or auto)
#
# Exit status: 0 when the guest printed PASS (write-loop: when it was stopped
# by SIGTERM/SIGINT), 1 on FAIL, 3 when no marker appeared in time, 2 on a
# usage or set-up error. The marker line is copied to stdout.
#
# The Debian kernel is downloaded, not installed: `apt-get download` of the
# package linux-image-amd64 depends on, unpacked with dpkg-deb -x. The kernel,
# the modules the guest needs and the initramfs are kept in the cache
# directory ($VDREPL_GUEST_CACHE, else /var/cache/vdrepl-guest as root, else
# $XDG_CACHE_HOME/vdrepl-guest) so only the first run pays for them.
#
# Accelerator: KVM only when /dev/kvm really runs a guest. Some hosts expose a
# /dev/kvm on which a stock kernel never boots, so "auto" boots a probe guest
# under KVM with a short deadline once per host boot and falls back to TCG.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "guest.sh: $*" >&2; exit 2; }

# The modules the guest loads, in dependency order after resolution. ext4
# and jbd2 find crc32c through the crypto API, not a symbol, so it is named.
roots=(virtio_pci virtio_blk crc32c_generic ext4)

if [ -n "${VDREPL_GUEST_CACHE:-}" ]; then
	cache=$VDREPL_GUEST_CACHE
elif [ "$(id -u)" -eq 0 ]; then
	cache=/var/cache/vdrepl-guest
else
	cache=${XDG_CACHE_HOME:-$HOME/.cache}/vdrepl-guest
fi

log= timeout= seed=1 files=16 readonly=0 recovery=0 accel=${VDREPL_GUEST_ACCEL:-auto}
while [ $# -gt 0 ]; do
	case $1 in
	--log) log=$2; shift 2 ;;
	--timeout) timeout=$2; shift 2 ;;
	--seed) seed=$2; shift 2 ;;
	--files) files=$2; shift 2 ;;
	--readonly) readonly=1; shift ;;
	--recovery) recovery=1; shift ;;
	--accel) accel=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	-*) die "unknown option $1" ;;
	*) break ;;
	esac
done
[ $# -ge 1 ] || die "usage: guest.sh [options] write|verify|write-loop DISK | prepare"
job=$1
case $job in
prepare) [ $# -eq 1 ] || die "prepare takes no DISK" ;;
write | verify | write-loop) [ $# -eq 2 ] || die "$job needs a DISK" ;;
*) die "unknown job $job" ;;
esac
case $accel in auto | kvm | tcg) ;; *) die "--accel must be auto, kvm or tcg" ;; esac
mkdir -p "$cache"
tmps=()
trap 'rm -rf "${tmps[@]}"' EXIT

# need_pkgs installs the Debian packages whose programs are missing.
need_pkgs() {
	local missing=() i
	local bins=(qemu-system-x86_64 busybox cpio gzip e2fsck mke2fs dumpe2fs ldd)
	local pkgs=(qemu-system-x86 busybox-static cpio gzip e2fsprogs e2fsprogs e2fsprogs libc-bin)
	for i in "${!bins[@]}"; do
		command -v "${bins[$i]}" >/dev/null 2>&1 || missing+=("${pkgs[$i]}")
	done
	[ ${#missing[@]} -eq 0 ] && return
	[ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]}; run as root or: sudo apt-get install --no-install-recommends ${missing[*]}"
	echo "guest.sh: installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# kernel_pkg names the real kernel package behind linux-image-amd64.
kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# fetch_kernel leaves vmlinuz, the needed modules and their load order in
# $kdir, downloading and unpacking the package only when they are not cached.
fetch_kernel() {
	local pkg
	pkg=$(kernel_pkg)
	if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
		apt-get update -qq
		pkg=$(kernel_pkg)
	fi
	if [ -z "$pkg" ]; then
		# Offline with a warm cache: the newest kernel fetched before.
		kdir=$(ls -d "$cache"/kernel/linux-image-* 2>/dev/null | sort -V | tail -n1)
		[ -n "$kdir" ] || die "cannot resolve linux-image-amd64 (run apt-get update) and no kernel is cached"
	else
		kdir=$cache/kernel/$pkg
	fi
	[ -f "$kdir/roots" ] && [ "$(cat "$kdir/roots")" = "${roots[*]}" ] && return
	echo "guest.sh: fetching $pkg" >&2
	local tmp
	tmp=$(mktemp -d "$cache/fetch.XXXXXX")
	tmps+=("$tmp")
	(cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
	dpkg-deb -x "$tmp"/*.deb "$tmp/x"
	local mods
	mods=$(ls -d "$tmp"/x/lib/modules/*/kernel)
	mkdir -p "$tmp/out/modules"
	cp "$tmp"/x/boot/vmlinuz-* "$tmp/out/vmlinuz"
	cp "$tmp"/x/boot/config-* "$tmp/out/config"
	# Module name -> file, then a depth-first walk of depends= from the roots.
	declare -A file=() done=()
	local f n order=()
	while IFS= read -r f; do
		n=$(basename "$f" .ko)
		file[${n//-/_}]=$f
	done < <(find "$mods" -name '*.ko')
	visit() {
		local m=$1 d deps
		[ -n "${done[$m]:-}" ] && return
		done[$m]=1
		[ -n "${file[$m]:-}" ] || die "module $m is not in $pkg (built in? check $tmp/out/config)"
		deps=$(tr '\0' '\n' <"${file[$m]}" | sed -n 's/^depends=//p' | head -n1)
		for d in ${deps//,/ }; do visit "$d"; done
		order+=("$m")
		cp "${file[$m]}" "$tmp/out/modules/$m.ko"
	}
	for n in "${roots[@]}"; do visit "$n"; done
	printf '%s\n' "${order[@]}" >"$tmp/out/modules/order"
	echo "${roots[*]}" >"$tmp/out/roots"
	rm -rf "$kdir"
	mkdir -p "$(dirname "$kdir")"
	mv "$tmp/out" "$kdir"
	rm -rf "$tmp"
}

# build_initrd packs busybox, e2fsprogs with its libraries, the modules and
# scripts/guest/init into a gzip'd newc cpio, keyed by everything it holds.
build_initrd() {
	local key
	key=$( {
		cat "$here/guest/init" "$0" "$kdir/modules/order"
		busybox | head -n1
		ls -l --time-style=+%s "$(command -v e2fsck)" "$(command -v mke2fs)"
	} | sha256sum | cut -c1-16)
	initrd=$kdir/initrd-$key.cpio.gz
	[ -f "$initrd" ] && return
	echo "guest.sh: building initramfs" >&2
	local st b lib
	st=$(mktemp -d "$cache/initrd.XXXXXX")
	tmps+=("$st" "$st.cpio.gz")
	mkdir -p "$st"/{bin,sbin,dev,proc,sys,mnt,etc,lib/modules}
	cp "$(command -v busybox)" "$st/bin/busybox"
	ldd "$st/bin/busybox" >/dev/null 2>&1 && die "$(command -v busybox) is not static (install busybox-static)"
	for b in $("$st/bin/busybox" --list); do [ "$b" = busybox ] || ln -s busybox "$st/bin/$b"; done
	for b in e2fsck mke2fs dumpe2fs; do
		cp "$(command -v $b)" "$st/sbin/$b"
		for lib in $(ldd "$(command -v $b)" | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
			mkdir -p "$st$(dirname "$lib")"
			cp -L "$lib" "$st$lib"
		done
	done
	[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$st/etc/"
	ln -s /proc/mounts "$st/etc/mtab"
	cp "$kdir"/modules/* "$st/lib/modules/"
	cp "$here/guest/init" "$st/init"
	chmod 755 "$st/init"
	(cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$st.cpio.gz"
	rm -f "$kdir"/initrd-*.cpio.gz
	mv "$st.cpio.gz" "$initrd"
	rm -rf "$st"
}

# qemu_cmd ACCEL APPEND DRIVE... fills the qemu command line in $qemu.
qemu_cmd() {
	local a=$1 append=$2
	shift 2
	qemu=(qemu-system-x86_64 -accel "$a" -machine pc -m 256 -smp 1 -nodefaults -no-reboot
		-display none -monitor none -kernel "$kdir/vmlinuz" -initrd "$initrd"
		-append "console=ttyS0 panic=-1 quiet loglevel=3 $append")
	[ "$a" = kvm ] && qemu+=(-cpu host)
	[ $# -gt 0 ] && qemu+=(-drive "$1")
	return 0
}

# pick_accel: kvm when a probe guest prints its marker under KVM in time.
pick_accel() {
	[ "$accel" != auto ] && return
	accel=tcg
	[ -r /dev/kvm ] && [ -w /dev/kvm ] || return 0
	local boot probe
	boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
	probe=$cache/accel-$boot
	if [ ! -f "$probe" ]; then
		qemu_cmd kvm "vdrepl.job=probe"
		local out
		out=$(timeout -k 2 20 "${qemu[@]}" -serial stdio </dev/null 2>&1 || true)
		rm -f "$cache"/accel-*
		if grep -q 'VDREPL-GUEST-RESULT: PASS job=probe' <<<"$out"; then
			echo kvm >"$probe"
		else
			echo tcg >"$probe"
			echo "guest.sh: /dev/kvm does not boot a guest here; using TCG" >&2
		fi
	fi
	accel=$(cat "$probe")
}

# One preparer at a time; guests boot in parallel once it is done.
exec 9>"$cache/lock"
flock 9
need_pkgs
fetch_kernel
build_initrd
pick_accel
exec 9>&-
if [ "$job" = prepare ]; then
	echo "kernel=$kdir/vmlinuz"
	echo "initrd=$initrd"
	echo "accel=$accel"
	exit 0
fi

disk=$2
case $disk in
nbd:* | nbd+unix:*) drive="file=$disk,format=raw,if=virtio,cache=none" ;;
*) [ -f "$disk" ] || die "no image file $disk"; drive="file=$disk,format=raw,if=virtio,cache=none" ;;
esac
[ $readonly = 1 ] && drive+=",readonly=on"
[ -n "$log" ] || log=$cache/$job.log
[ -n "$timeout" ] || { [ "$job" = write-loop ] && timeout=0 || timeout=300; }

qemu_cmd "$accel" "vdrepl.job=$job vdrepl.seed=$seed vdrepl.files=$files vdrepl.recovery=$recovery" "$drive"
qemu+=(-serial "file:$log")
: >"$log"
start=$(date +%s.%N)
if [ "$timeout" -gt 0 ]; then
	timeout -k 5 "$timeout" "${qemu[@]}" </dev/null &
else
	"${qemu[@]}" </dev/null &
fi
qpid=$!
stopped=0
trap 'stopped=1; kill -TERM $qpid 2>/dev/null || true' TERM INT
set +e
wait $qpid
rc=$?
# A trapped signal interrupts wait; wait again for qemu itself.
while kill -0 $qpid 2>/dev/null; do wait $qpid; done
set -e
secs=$(echo "$(date +%s.%N) $start" | awk '{ printf "%.1f", $1 - $2 }')
marker=$(tr -d '\r' <"$log" | grep -a '^VDREPL-GUEST-RESULT: ' | tail -n1 || true)
if [ -n "$marker" ]; then
	echo "$marker"
	echo "guest.sh: job=$job accel=$accel ${secs}s log=$log" >&2
	case $marker in *": PASS "*) exit 0 ;; esac
	exit 1
fi
if [ "$job" = write-loop ] && [ $stopped = 1 ]; then
	echo "guest.sh: write-loop stopped after ${secs}s, $(grep -ac '^VDREPL-GUEST-LOOP: ' "$log") files; log=$log" >&2
	exit 0
fi
echo "guest.sh: no result marker from job=$job after ${secs}s (qemu exit $rc, accel=$accel); last lines of $log:" >&2
tail -n 30 "$log" >&2
exit 3
