// Package e2e holds end-to-end tests: the real vdrepl binary, started as a
// daemon, driven by real clients (nbdinfo, qemu-io, nbdcopy, fio, a FUSE
// mount with ext4 on a loop device). It has no non-test code.
package e2e
