package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TestAppConsistentPointExt4: a real ext4 on a loop device over `vdrepl
// mount`, written to all the time, replicated with a quiesce command that
// runs fsfreeze. The application-consistent point recovered through a test
// failover needs no journal replay and e2fsck finds it clean. A freeze that
// hangs is given up after --quiesce-timeout: the guest is thawed, a
// standard point recorded, and status says why.
func TestAppConsistentPointExt4(t *testing.T) {
	need(t, "losetup", "mkfs.ext4", "e2fsck", "dumpe2fs", "fsfreeze", "nbdcopy")
	needRoot(t)
	p := newPairWith(t, pairOpts{primExtra: []string{"--quiesce-timeout", "2s"}})
	p.prim.addVM("vm1", "64M")
	mp := t.TempDir()
	stopMount := p.prim.mount(mp)
	file := filepath.Join(mp, "vm1", "disk0.img")
	loop := strings.TrimSpace(sh(t, "losetup", "--find", "--show", file))
	fsdir := t.TempDir()
	// Cleanups run last-in first-out: unmount, detach, then stop the mount.
	t.Cleanup(stopMount)
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	sh(t, "mkfs.ext4", "-q", "-F", loop)
	sh(t, "mount", loop, fsdir)
	t.Cleanup(func() { exec.Command("umount", fsdir).Run() })

	// The quiesce command: fsfreeze on the mounted filesystem; it hangs
	// on freeze while the file "hang" exists. It logs its calls.
	dir := t.TempDir()
	calls, hang := filepath.Join(dir, "calls"), filepath.Join(dir, "hang")
	script := filepath.Join(dir, "quiesce")
	body := fmt.Sprintf(`#!/bin/sh
echo "$1 $2" >> %[1]s
case "$2" in
freeze) if [ -e %[2]s ]; then exec sleep 1000; fi; exec fsfreeze -f %[3]s ;;
thaw) exec fsfreeze -u %[3]s ;;
esac
exit 2
`, calls, hang, fsdir)
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h",
		"--recovery-points", "4", "--app-consistent-every", "1000", "--quiesce-cmd", script)
	p.prim.run("replication", "sync", "vm1")

	// An application writes files all the time, never syncing.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	var writes atomic.Int64
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := filepath.Join(fsdir, fmt.Sprintf("f%03d", i%200))
			if err := os.WriteFile(name, []byte(strings.Repeat(fmt.Sprintf("%d ", i), 4000)), 0o644); err != nil {
				t.Errorf("write %s: %v", name, err)
				return
			}
			writes.Add(1)
		}
	}()
	waitFor(t, "the application to write", func() bool { return writes.Load() > 50 })
	app := syncCycle(t, p.prim, "vm1", "--app-consistent")
	close(stop)
	wg.Wait()

	var found *pointJSON
	for _, pt := range pointsOf(t, p.rep, "vm1") {
		if pt.Cycle == app {
			found = &pt
		}
	}
	if found == nil || !found.AppConsistent {
		t.Fatalf("cycle %d is not an application-consistent point: %+v", app, pointsOf(t, p.rep, "vm1"))
	}
	p.rep.run("failover", "test", "vm1", "--point", found.ID)
	img := filepath.Join(t.TempDir(), "point.img")
	sh(t, "nbdcopy", p.rep.uri("vm1-test/disk0"), img)
	p.rep.run("failover", "stop-test", "vm1")
	if hdr := sh(t, "dumpe2fs", "-h", img); strings.Contains(hdr, "needs_recovery") {
		t.Fatalf("the application-consistent point needs a journal replay:\n%s", hdr)
	}
	sh(t, "e2fsck", "-fn", img)

	// A freeze that hangs: thawed after the timeout, a standard point.
	if err := os.WriteFile(hang, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	std := syncCycle(t, p.prim, "vm1", "--app-consistent")
	var stdPoint *pointJSON
	for _, pt := range pointsOf(t, p.rep, "vm1") {
		if pt.Cycle == std {
			stdPoint = &pt
		}
	}
	if stdPoint == nil || stdPoint.AppConsistent {
		t.Fatalf("after a hung freeze, cycle %d should be a standard point: %+v", std, pointsOf(t, p.rep, "vm1"))
	}
	b, _ := os.ReadFile(calls)
	if log := string(b); !strings.HasSuffix(log, "vm1 freeze\nvm1 thaw\n") || strings.Count(log, "freeze") != 2 {
		t.Fatalf("quiesce calls:\n%s", log)
	}
	out := p.prim.run("replication", "status", "vm1")
	if !strings.Contains(out, "is a standard recovery point, not application-consistent") || !strings.Contains(out, "did not freeze within 2s") {
		t.Fatalf("status does not report the failed freeze:\n%s", out)
	}
	// The filesystem was never left frozen: it takes writes at once.
	if err := os.WriteFile(filepath.Join(fsdir, "after"), []byte("after"), 0o644); err != nil {
		t.Fatal(err)
	}
	sh(t, "sync", "-f", filepath.Join(fsdir, "after"))
}
