package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// mount runs `vdrepl mount` in the background and waits until it says the
// disks are there. The returned func ends it with SIGINT and waits.
func (h *host) mount(mp string) (stop func()) {
	h.t.Helper()
	need(h.t, "fusermount3")
	cmd := exec.Command(vdreplBin, "--state", h.state, "mount", mp)
	stdout, _ := cmd.StdoutPipe()
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	done := make(chan error, 1)
	mounted := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "mounted ") {
				close(mounted)
			}
		}
		done <- cmd.Wait()
	}()
	select {
	case <-mounted:
	case err := <-done:
		h.t.Fatalf("vdrepl mount exited: %v: %s", err, errOut.String())
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		h.t.Fatal("vdrepl mount did not mount within 30s")
	}
	var once bool
	stop = func() {
		if once {
			return
		}
		once = true
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case err := <-done:
			if err != nil {
				h.t.Errorf("vdrepl mount exited with %v: %s", err, errOut.String())
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			h.t.Error("vdrepl mount did not exit within 30s of SIGINT")
		}
	}
	h.t.Cleanup(stop)
	return stop
}

func isMounted(mp string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	return strings.Contains(string(b), " "+mp+" ")
}

func TestFUSEFioVerify(t *testing.T) {
	need(t, "fio")
	h := newHost(t)
	h.addVM("vm1", "64M")
	mp := t.TempDir()
	stop := h.mount(mp)
	file := filepath.Join(mp, "vm1", "disk0.img")
	st, err := os.Stat(file)
	if err != nil || st.Size() != 64<<20 {
		t.Fatalf("stat %s: %v size %d", file, err, st.Size())
	}
	sh(t, "fio", "--name=v", "--filename="+file, "--ioengine=libaio", "--direct=1",
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32m",
		"--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1")
	stop()
	if isMounted(mp) {
		t.Fatal("mount still present after SIGINT to vdrepl mount")
	}
}

// TestFUSEExt4OnLoop: a real ext4 on a loop device over the FUSE file; fsck
// clean; then the same bytes read through NBD hold the same files.
func TestFUSEExt4OnLoop(t *testing.T) {
	need(t, "losetup", "mkfs.ext4", "e2fsck", "debugfs", "nbdcopy")
	h := newHost(t)
	h.addVM("vm1", "128M")
	mp := t.TempDir()
	stop := h.mount(mp)
	file := filepath.Join(mp, "vm1", "disk0.img")

	loop := strings.TrimSpace(sh(t, "losetup", "--find", "--show", file))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	sh(t, "mkfs.ext4", "-q", "-F", loop)
	fsdir := t.TempDir()
	sh(t, "mount", loop, fsdir)
	t.Cleanup(func() { exec.Command("umount", fsdir).Run() })
	sums := map[string][32]byte{}
	for i := 0; i < 20; i++ {
		b := bytes.Repeat([]byte(fmt.Sprintf("file %d of vdrepl ", i)), 1000*(i+1))
		name := fmt.Sprintf("f%02d", i)
		if err := os.WriteFile(filepath.Join(fsdir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[name] = sha256.Sum256(b)
	}
	sh(t, "sync")
	sh(t, "umount", fsdir)
	sh(t, "losetup", "-d", loop)
	sh(t, "e2fsck", "-fn", file)
	stop()

	// The same filesystem through the NBD export.
	copyImg := filepath.Join(t.TempDir(), "copy.img")
	sh(t, "nbdcopy", h.uri("vm1/disk0"), copyImg)
	sh(t, "e2fsck", "-fn", copyImg)
	for name, want := range sums {
		out := filepath.Join(t.TempDir(), name)
		sh(t, "debugfs", "-R", "dump /"+name+" "+out, copyImg)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(b) != want {
			t.Fatalf("%s differs through NBD", name)
		}
	}
}

// TestFUSEUnmountFromOutside: fusermount3 -u ends `vdrepl mount`.
func TestFUSEUnmountFromOutside(t *testing.T) {
	h := newHost(t)
	h.addVM("vm1", "8M")
	mp := t.TempDir()
	h.mount(mp)
	sh(t, "fusermount3", "-u", mp)
	waitFor(t, "the mount to disappear from status", func() bool {
		return !strings.Contains(h.run("status"), mp)
	})
	if isMounted(mp) {
		t.Fatal("still mounted")
	}
}

// TestRemoveRefusedWhileOpen: a VM whose disk is open through FUSE cannot be
// removed; once closed it can.
func TestRemoveRefusedWhileOpen(t *testing.T) {
	h := newHost(t)
	h.addVM("vm1", "8M")
	mp := t.TempDir()
	stop := h.mount(mp)
	f, err := os.OpenFile(filepath.Join(mp, "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := h.try("vm", "remove", "vm1"); err == nil || !strings.Contains(errOut, "open through FUSE") {
		t.Fatalf("remove of an open VM: err %v, stderr %q", err, errOut)
	}
	if len(h.vms()) != 1 {
		t.Fatal("refused remove changed the registry")
	}
	f.Close()
	waitFor(t, "the FUSE release to reach the daemon", func() bool {
		_, _, err := h.try("vm", "remove", "vm1")
		return err == nil
	})
	stop()
}
