package doctor

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestFUSE(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("/dev/fuse: %v (CI needs FUSE)", err)
		}
		t.Skipf("no /dev/fuse here: %v", err)
	}
	if _, err := exec.LookPath("fusermount3"); err == nil {
		want(t, FUSE("/dev/fuse"), CheckFUSE, OK, "fusermount3")
	}
	dir := t.TempDir()
	want(t, FUSE(filepath.Join(dir, "fuse")), CheckFUSE, Problem, "does not exist", "modprobe fuse")
	file := filepath.Join(dir, "file")
	write(t, file, nil)
	want(t, FUSE(file), CheckFUSE, Problem, "not a character device")

	// A PATH without fusermount3.
	t.Setenv("PATH", dir)
	sev := Warning
	if os.Geteuid() != 0 {
		sev = Problem
	}
	want(t, FUSE("/dev/fuse"), CheckFUSE, sev, "fusermount3 is not on PATH", "apt-get install fuse3")
}

func TestStateDir(t *testing.T) {
	dir := t.TempDir()
	fs := StateDir(dir, 0, "")
	want(t, fs, CheckStateDir, OK, "writable")
	want(t, fs, CheckJournalRoom, OK, "free")
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("the write check left %v behind", left)
	}
	want(t, StateDir(filepath.Join(dir, "new", "state"), 0, ""), CheckStateDir, OK, "does not exist yet")

	file := filepath.Join(dir, "file")
	write(t, file, nil)
	want(t, StateDir(file, 0, ""), CheckStateDir, Problem, "not a directory", "--state")

	// Room: a cap the filesystem cannot hold, and one it can.
	fs = StateDir(dir, 1<<60, "the journals of vm1")
	want(t, fs, CheckJournalRoom, Problem, "the journals of vm1 may grow 1.0 EiB more", "--journal-cap")
	want(t, StateDir(dir, 4096, "the journals of vm1"), CheckJournalRoom, OK, "enough for the journals of vm1")
}

func TestNBD(t *testing.T) {
	dir := t.TempDir()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	free.Close()
	live := filepath.Join(dir, "live.sock")
	ul, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	stale := filepath.Join(dir, "stale.sock")
	sl, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	sl.(*net.UnixListener).SetUnlinkOnClose(false)
	sl.Close()
	file := filepath.Join(dir, "file")
	write(t, file, nil)

	ours := "tcp:" + busy.Addr().String()
	for _, tc := range []struct {
		addr string
		held []string
		sev  Severity
		text string
	}{
		{"tcp:" + busy.Addr().String(), nil, Problem, "another process listens"},
		{ours, []string{ours}, OK, "held by the running daemon"},
		{"tcp:" + freeAddr, nil, OK, "free"},
		{"tcp:192.0.2.1:10809", nil, Problem, "not one of this host's"},
		{"unix:" + live, nil, Problem, "another process listens"},
		{"unix:" + stale, nil, OK, "stale socket"},
		{"unix:" + filepath.Join(dir, "none.sock"), nil, OK, "free"},
		{"unix:" + file, nil, Problem, "not a socket"},
		{"udp:1.2.3.4:5", nil, Problem, "not an NBD listen address"},
	} {
		fs := NBD([]string{tc.addr}, tc.held)
		if len(fs) != 1 {
			t.Fatalf("%s: %d findings", tc.addr, len(fs))
		}
		want(t, fs, CheckNBD, tc.sev, tc.text)
	}
}
