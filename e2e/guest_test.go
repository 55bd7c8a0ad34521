package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A real guest end to end: a Debian kernel with a busybox initramfs
// (scripts/guest.sh, scripts/guest/init) boots in qemu-system-x86_64 with its
// disk on vdrepl's NBD export, makes ext4 and writes files with known
// content; the replica's copy must then boot, fsck clean and hold every file.

const guestScript = "../scripts/guest.sh"

var guestMarker = regexp.MustCompile(`(?m)^VDREPL-GUEST-RESULT: (PASS|FAIL) (.*)$`)

// guestPrepare fetches the kernel and builds the initramfs once (cached
// between runs by guest.sh) so the boots below are timed on their own.
func guestPrepare(t *testing.T) {
	t.Helper()
	need(t, "qemu-system-x86_64", "busybox", "cpio", "nbdcopy", "nbdinfo")
	start := time.Now()
	out, err := runOut("bash", guestScript, "prepare")
	if err != nil {
		t.Fatalf("guest.sh prepare: %v\n%s", err, out)
	}
	t.Logf("guest.sh prepare (%.1fs):\n%s", time.Since(start).Seconds(), out)
}

// guestResult is how one guest job ended.
type guestResult struct {
	err     error             // guest.sh's exit
	verdict string            // PASS, FAIL or "" without a marker
	detail  string            // the rest of the marker line
	kv      map[string]string // its key=value pairs
	report  string            // guest.sh's output and the console, for failure messages
}

// runGuest runs one guest job to its end.
func runGuest(t *testing.T, job, disk string, flags ...string) guestResult {
	t.Helper()
	log := filepath.Join(t.TempDir(), job+".log")
	args := append([]string{guestScript, "--log", log, "--timeout", "240"}, flags...)
	args = append(args, job, disk)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	r := guestResult{err: cmd.Run(), kv: map[string]string{}}
	took := time.Since(start)
	console, _ := os.ReadFile(log)
	r.report = fmt.Sprintf("guest %s on %s: exit %v after %.1fs\n%s%s\nconsole:\n%s", job, disk, r.err, took.Seconds(), stdout.String(), stderr.String(), console)
	if m := guestMarker.FindStringSubmatch(stdout.String()); m != nil {
		r.verdict, r.detail = m[1], m[2]
		for _, f := range strings.Fields(m[2]) {
			if k, v, ok := strings.Cut(f, "="); ok {
				r.kv[k] = v
			}
		}
	}
	t.Logf("guest %s: %s %s (%.1fs)", job, r.verdict, r.detail, took.Seconds())
	return r
}

// bootGuest runs one guest job that must PASS and returns the key=value
// pairs of its marker; anything else fails the test with the console log.
func bootGuest(t *testing.T, job, disk string, flags ...string) map[string]string {
	t.Helper()
	r := runGuest(t, job, disk, flags...)
	if r.err != nil || r.verdict != "PASS" {
		t.Fatal(r.report)
	}
	return r.kv
}

// loopGuest is a write-loop guest running in the background.
type loopGuest struct {
	cmd    *exec.Cmd
	log    string
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

func startLoopGuest(t *testing.T, disk string) *loopGuest {
	t.Helper()
	g := &loopGuest{log: filepath.Join(t.TempDir(), "write-loop.log"), done: make(chan struct{})}
	// The timeout only bounds a guest left behind by a crashed test.
	g.cmd = exec.Command("bash", guestScript, "--log", g.log, "--timeout", "600", "write-loop", disk)
	g.cmd.Stderr = &g.stderr
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { g.err = g.cmd.Wait(); close(g.done) }()
	t.Cleanup(func() {
		select {
		case <-g.done:
		default:
			g.cmd.Process.Signal(syscall.SIGTERM)
			<-g.done
		}
	})
	return g
}

// last is the newest file the loop reported durable and in its manifest, -1
// before the first.
func (g *loopGuest) last() int {
	f, err := os.Open(g.log)
	if err != nil {
		return -1
	}
	defer f.Close()
	n := -1
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimRight(sc.Text(), "\r"), "VDREPL-GUEST-LOOP: "); ok {
			if i, err := strconv.Atoi(v); err == nil && i > n {
				n = i
			}
		}
	}
	return n
}

// waitPast waits until the loop has reported file n, failing when the guest
// ends first or it takes more than two minutes (boot included).
func (g *loopGuest) waitPast(t *testing.T, n int) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if l := g.last(); l >= n {
			return l
		}
		select {
		case <-g.done:
			console, _ := os.ReadFile(g.log)
			t.Fatalf("write-loop guest ended (%v) before file %d\n%s\nconsole:\n%s", g.err, n, g.stderr.String(), console)
		default:
		}
		if time.Now().After(deadline) {
			console, _ := os.ReadFile(g.log)
			t.Fatalf("write-loop guest reported no file %d within 2 minutes\nconsole:\n%s", n, console)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop kills the guest the way a host loses it (qemu gets SIGTERM, nothing
// is unmounted) and checks it had been running until then.
func (g *loopGuest) stop(t *testing.T) {
	t.Helper()
	g.cmd.Process.Signal(syscall.SIGTERM)
	<-g.done
	if g.err != nil {
		console, _ := os.ReadFile(g.log)
		t.Fatalf("write-loop guest: %v\n%s\nconsole:\n%s", g.err, g.stderr.String(), console)
	}
}

// cli runs the CLI against h and fails t (not h's test: these run in
// subtests) on a non-zero exit.
func cli(t *testing.T, h *host, args ...string) string {
	t.Helper()
	out, errOut, err := h.try(args...)
	if err != nil {
		t.Fatalf("vdrepl %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// exports lists the NBD exports h serves.
func exports(t *testing.T, h *host) string {
	t.Helper()
	return sh(t, "nbdinfo", "--list", "nbd+unix:///?socket="+h.sock)
}

// TestGuestEndToEnd: guests write ext4 through the primary's NBD export and
// the replica's copies boot: straight from the image file, after an
// unplanned failover from the replica's own export, and from a test-failover
// export taken while a guest keeps writing on the primary.
//
// Two VMs, because an unplanned failover makes vm1 the replica's to run:
// the test failover needs a VM that is still replicating.
func TestGuestEndToEnd(t *testing.T) {
	guestPrepare(t)
	p := newPair(t)
	for _, vm := range []string{"vm1", "vm2"} {
		p.prim.addVM(vm, "64M")
		// Cycles are cut every second while the guest writes, not only at the end.
		p.prim.run("replication", "enable", vm, "--replica", p.replicaAddr, "--frequency", "1s")
	}

	ok := t.Run("guests write ext4 through NBD", func(t *testing.T) {
		for _, vm := range []string{"vm1", "vm2"} {
			got := bootGuest(t, "write", p.prim.uri(vm+"/disk0"))
			if got["files"] != "16" {
				t.Fatalf("write guest of %s: %v", vm, got)
			}
			cli(t, p.prim, "replication", "sync", vm)
			p.checkEqual(t, vm, "disk0")
		}
	})
	if !ok {
		t.FailNow()
	}

	t.Run("replica image boots", func(t *testing.T) {
		got := bootGuest(t, "verify", filepath.Join(p.storage, "vm1", "disk0.img"), "--readonly")
		if got["files"] != "16" || got["recovered"] != "0" {
			t.Fatalf("verify guest on the replica image: %v", got)
		}
	})

	// The check above can fail: one byte of one file changed in a copy of
	// the same image makes the guest say FAIL and name the file.
	t.Run("a damaged copy fails verify", func(t *testing.T) {
		img, err := os.ReadFile(filepath.Join(p.storage, "vm1", "disk0.img"))
		if err != nil {
			t.Fatal(err)
		}
		// Block 2 of files/f-4 starts with its key (init: seed*1000003+4).
		at := bytes.Index(img, []byte("key=1000007 block=2\n"))
		if at < 0 {
			t.Fatal("block 2 of files/f-4 is not in the replica image")
		}
		img[at+100] ^= 0x20
		bad := filepath.Join(t.TempDir(), "damaged.img")
		if err := os.WriteFile(bad, img, 0o644); err != nil {
			t.Fatal(err)
		}
		r := runGuest(t, "verify", bad, "--readonly")
		var exit *exec.ExitError
		if !errors.As(r.err, &exit) || exit.ExitCode() != 1 || r.verdict != "FAIL" || !strings.Contains(r.detail, "files/f-4: sha256") {
			t.Fatalf("want FAIL naming files/f-4 with exit 1; %s", r.report)
		}
	})

	t.Run("unplanned failover", func(t *testing.T) {
		cli(t, p.rep, "failover", "unplanned", "vm1")
		// A cleanly unmounted filesystem must come back clean: no journal
		// replay allowed (no --recovery), fsck -fn exit 0, every checksum.
		got := bootGuest(t, "verify", p.rep.uri("vm1/disk0"))
		if got["files"] != "16" || got["recovered"] != "0" {
			t.Fatalf("verify guest after unplanned failover: %v", got)
		}
		cli(t, p.rep, "failover", "complete", "vm1")
	})

	t.Run("test failover while the guest writes", func(t *testing.T) {
		g := startLoopGuest(t, p.prim.uri("vm2/disk0"))
		seen := g.waitPast(t, 4)
		// Every file the loop reported before this sync is in the point.
		cli(t, p.prim, "replication", "sync", "vm2")
		cli(t, p.rep, "failover", "test", "vm2")
		if !strings.Contains(exports(t, p.rep), "vm2-test/disk0") {
			t.Fatalf("no vm2-test/disk0 export after failover test:\n%s", exports(t, p.rep))
		}
		// The point is crash-consistent: the journal may need replay, then
		// fsck must be clean and every manifest entry must match.
		got := bootGuest(t, "verify", p.rep.uri("vm2-test/disk0"), "--recovery")
		last, _ := strconv.Atoi(got["loop_last"])
		if got["files"] != "16" || last < seen {
			t.Fatalf("verify guest on the test export: %v; the loop had reported file %d before the sync", got, seen)
		}
		// The primary's guest kept writing through all of it.
		g.waitPast(t, g.last()+2)
		cli(t, p.rep, "failover", "stop-test", "vm2")
		if strings.Contains(exports(t, p.rep), "vm2-test/") {
			t.Fatalf("vm2-test still served after stop-test:\n%s", exports(t, p.rep))
		}
		g.stop(t)
		// Replication went on underneath: the replica catches up with the
		// primary as the killed guest left it.
		cli(t, p.prim, "replication", "sync", "vm2")
		p.checkEqual(t, "vm2", "disk0")
	})
}
