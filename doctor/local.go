package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/internal/units"
)

// FUSE checks what `vdrepl mount` needs: the FUSE device devFuse,
// which the daemon opens, and the fusermount3 helper on PATH, which
// unmounts for users other than root.
func FUSE(devFuse string) []Finding {
	f := Finding{Check: CheckFUSE, Subject: devFuse, Severity: Problem}
	st, err := os.Stat(devFuse)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f.Cause = "the FUSE device does not exist, so `vdrepl mount` cannot work"
		f.Fix = "load the fuse kernel module (`modprobe fuse`, and list it in /etc/modules-load.d), or in a container pass the device in (--device /dev/fuse)"
		return []Finding{f}
	case err != nil:
		f.Cause, f.Fix = fmt.Sprintf("cannot look at the FUSE device: %v", err), "check the path and its permissions"
		return []Finding{f}
	case st.Mode()&fs.ModeCharDevice == 0:
		f.Cause = fmt.Sprintf("the FUSE device is not a character device (it is %s), so `vdrepl mount` cannot work", st.Mode().Type())
		f.Fix = "remove it and load the fuse kernel module (`modprobe fuse`), which creates the device"
		return []Finding{f}
	}
	dev, err := os.OpenFile(devFuse, os.O_RDWR, 0)
	if err != nil {
		f.Cause = fmt.Sprintf("the FUSE device cannot be opened (%v), so `vdrepl mount` cannot work", err)
		f.Fix = "run the daemon as root, or in a container allow the device (--device /dev/fuse and CAP_SYS_ADMIN)"
		return []Finding{f}
	}
	dev.Close()
	helper, err := exec.LookPath("fusermount3")
	if err != nil {
		f.Subject = "fusermount3"
		f.Severity = Warning
		f.Cause = "fusermount3 is not on PATH: `fusermount3 -u` cannot end a mount, and a daemon that is not root cannot mount"
		if os.Geteuid() != 0 {
			f.Severity = Problem
			f.Cause = "fusermount3 is not on PATH, and without it a daemon that is not root cannot mount"
		}
		f.Fix = "install it (`apt-get install fuse3`)"
		return []Finding{f}
	}
	return []Finding{{Check: CheckFUSE, Subject: devFuse, Severity: OK,
		Cause: "the FUSE device opens and fusermount3 is " + helper}}
}

// StateDir checks that dir (the daemon's state directory) can be
// written, by writing, syncing and removing a small file in it, and that
// its filesystem has need bytes free: room for what (the journals of the
// replicated VMs) to grow to their caps. need 0 skips the second check.
func StateDir(dir string, need int64, what string) []Finding {
	f := Finding{Check: CheckStateDir, Subject: dir, Severity: Problem}
	st, err := os.Stat(dir)
	probe := dir
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// The daemon creates it (and missing parents): the nearest
		// existing ancestor must take it.
		for probe = filepath.Dir(dir); ; probe = filepath.Dir(probe) {
			if _, err := os.Stat(probe); err == nil || probe == filepath.Dir(probe) {
				break
			}
		}
		if err := unix.Access(probe, unix.W_OK); err != nil {
			f.Cause = fmt.Sprintf("the state directory does not exist and cannot be created in %s (%v)", probe, err)
			f.Fix = writeFix(err, probe)
			return []Finding{f}
		}
		f.Severity, f.Cause = OK, "the state directory does not exist yet; `vdrepl serve` creates it"
	case err != nil:
		f.Cause, f.Fix = fmt.Sprintf("cannot look at the state directory: %v", err), "check the path given to --state and its permissions"
		return []Finding{f}
	case !st.IsDir():
		f.Cause = "the state directory is not a directory, so the daemon cannot keep its registry and journals there"
		f.Fix = "give --state (or VDREPL_STATE) a directory, or move the file away"
		return []Finding{f}
	default:
		if err := writeProbe(dir); err != nil {
			f.Cause = fmt.Sprintf("the daemon cannot write its registry and journals in the state directory: %v", err)
			f.Fix = writeFix(err, dir)
			return []Finding{f}
		}
		f.Severity, f.Cause = OK, "the state directory is writable"
	}
	out := []Finding{f}

	var sfs unix.Statfs_t
	if err := unix.Statfs(probe, &sfs); err != nil {
		return append(out, Finding{Check: CheckJournalRoom, Subject: dir, Severity: Warning,
			Cause: fmt.Sprintf("cannot tell the free space of the state directory's filesystem: %v", err), Fix: "check the filesystem"})
	}
	free := int64(sfs.Bavail) * int64(sfs.Bsize)
	room := Finding{Check: CheckJournalRoom, Subject: dir, Severity: OK,
		Cause: fmt.Sprintf("%s free on the state directory's filesystem", units.FormatBytes(free))}
	if need > 0 {
		room.Cause += fmt.Sprintf(", enough for %s to grow %s to their caps", what, units.FormatBytes(need))
		if free < need {
			room.Severity = Problem
			room.Cause = fmt.Sprintf("the state directory's filesystem has %s free, but %s may grow %s more before their caps: when it fills, journal writes fail",
				units.FormatBytes(free), what, units.FormatBytes(need))
			room.Fix = "free space there, move the state directory (--state) to a larger filesystem, or lower --journal-cap"
		}
	}
	return append(out, room)
}

// writeProbe creates, writes, syncs and removes a file in dir.
func writeProbe(dir string) error {
	f, err := os.CreateTemp(dir, ".vdrepl-doctor-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.Write(make([]byte, 4096))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// writeFix says what to do when writing in dir failed with err.
func writeFix(err error, dir string) string {
	switch {
	case errors.Is(err, syscall.EROFS):
		return "its filesystem is mounted read-only: remount it read-write, or give --state a directory on a writable filesystem"
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return "its filesystem is full: free space there, or give --state a directory on a larger filesystem"
	case errors.Is(err, fs.ErrPermission):
		return fmt.Sprintf("run the daemon as root, or give its user %s (chown)", dir)
	}
	return "check the filesystem (dmesg shows I/O errors)"
}

// NBD checks that the daemon can listen on each NBD address (unix:PATH
// or tcp:HOST:PORT): it is free, or held already is one of held, the
// addresses our own running daemon listens on.
func NBD(addrs, held []string) []Finding {
	var out []Finding
	for _, addr := range addrs {
		f := Finding{Check: CheckNBD, Subject: addr, Severity: OK}
		network, a, _ := strings.Cut(addr, ":")
		switch {
		case slices.Contains(held, addr):
			f.Cause = "held by the running daemon"
		case network == "unix" && a != "":
			f.Severity, f.Cause, f.Fix = unixFree(a)
		case network == "tcp" && a != "":
			f.Severity, f.Cause, f.Fix = tcpFree(a)
		default:
			f.Severity, f.Cause, f.Fix = Problem, "not an NBD listen address", "write unix:PATH or tcp:HOST:PORT"
		}
		out = append(out, f)
	}
	return out
}

func unixFree(p string) (Severity, string, string) {
	st, err := os.Lstat(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return OK, "free", ""
	case err != nil:
		return Problem, fmt.Sprintf("cannot look at the socket path: %v", err), "check the path and its directory's permissions"
	case st.Mode()&fs.ModeSocket == 0:
		return Problem, "the path exists and is not a socket, so the daemon cannot listen there",
			"move the file away or give `vdrepl serve --nbd` another path"
	}
	c, err := net.Dial("unix", p)
	if err != nil {
		return OK, "a stale socket nobody listens on; the daemon replaces it", ""
	}
	c.Close()
	return Problem, "another process listens on this socket, so the daemon cannot",
		"stop that process (`ss -xlp` names it) or give `vdrepl serve --nbd` another path"
}

func tcpFree(hostport string) (Severity, string, string) {
	l, err := net.Listen("tcp", hostport)
	if err == nil {
		l.Close()
		return OK, "free", ""
	}
	_, port, _ := net.SplitHostPort(hostport)
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return Problem, "another process listens on this port, so the daemon cannot",
			fmt.Sprintf("stop that process (`ss -ltnp 'sport = :%s'` names it) or give `vdrepl serve --nbd` another port", port)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return Problem, "the address is not one of this host's", "give `vdrepl serve --nbd` an address of this host, or 0.0.0.0"
	case errors.Is(err, fs.ErrPermission):
		return Problem, "ports below 1024 need root", "run the daemon as root or use a port from 1024 up (NBD's own is 10809)"
	}
	return Problem, fmt.Sprintf("cannot listen: %v", err), "give `vdrepl serve --nbd` another address"
}
