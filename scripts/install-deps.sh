#!/usr/bin/env bash
# Installs the Debian packages vdrepl's tests and demo drive for real: NBD
# clients, fio, FUSE, ext4 tools. Does nothing when they are all present.
set -euo pipefail
pkgs=(fio qemu-utils libnbd-bin nbdkit nbdfuse fuse3 e2fsprogs util-linux qemu-system-x86 busybox-static cpio systemd iproute2)
bins=(fio qemu-io nbdinfo nbdkit nbdfuse fusermount3 mkfs.ext4 losetup qemu-system-x86_64 busybox cpio systemd-analyze ip)
missing=()
for i in "${!bins[@]}"; do
  command -v "${bins[$i]}" >/dev/null 2>&1 || missing+=("${pkgs[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
