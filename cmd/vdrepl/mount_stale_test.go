package main

import (
	"bufio"
	"errors"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startMount runs `vdrepl mount mp` against h until the test ends and
// returns once it printed "mounted", or fails the test with what it said.
func startMount(t *testing.T, h *daemonHost, mp string) {
	t.Helper()
	cmd := exec.Command(vdreplBinary(t), "mount", mp, "--state", h.state)
	cmd.Env = cliEnv()
	var errOut strings.Builder
	cmd.Stderr = &errOut
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "mounted "+mp+"\n" {
		io.Copy(io.Discard, out)
		cmd.Wait()
		t.Fatalf("vdrepl mount %s printed %q; stderr: %s", mp, line, errOut.String())
	}
}

// TestCLIMountAfterDaemonCrash: issue 15 item 13. The daemon serving a
// mount is killed (kill -9), which leaves the mount stale; `vdrepl mount`
// on the same point, against a new daemon, detaches it and mounts.
func TestCLIMountAfterDaemonCrash(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs /dev/fuse and root")
	}
	mp := t.TempDir()
	t.Cleanup(func() {
		for unix.Unmount(mp, unix.MNT_DETACH) == nil {
		}
	})
	crashed := startDaemon(t)
	startMount(t, crashed, mp)
	if err := crashed.proc.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(mp); errors.Is(err, syscall.ENOTCONN) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the mount is not stale 10s after the daemon was killed")
		}
	}
	h := startDaemon(t)
	startMount(t, h, mp)
	if _, err := os.ReadDir(mp); err != nil {
		t.Errorf("read the new mount: %v", err)
	}
}
