package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// vmFence is the fence of vm on h as `vm list --json` reports it, nil when
// the VM is not fenced.
func vmFence(t *testing.T, h *host, vm string) map[string]any {
	t.Helper()
	var vms []struct {
		Name   string         `json:"name"`
		Fenced map[string]any `json:"fenced"`
	}
	if err := json.Unmarshal([]byte(h.run("vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.Name == vm {
			return v.Fenced
		}
	}
	t.Fatalf("%s is not a VM of this host", vm)
	return nil
}

// TestFenceAfterUnplannedFailover: the primary A is killed, B fails the VM
// over (unplanned), A comes back. A's shipper hears from B that the VM was
// failed over, and A fences it: NBD writes fail, reads work, `vm list`,
// `replication status`, `vdrepl status` and doctor say so; the fence
// survives a restart; `vm unfence` without --force only says what it
// risks, with --force the VM is writable again.
func TestFenceAfterUnplannedFailover(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	w := newTwoWay(t)
	w.a.addVM("vm1", "16M")
	w.a.run("replication", "enable", "vm1", "--replica", w.bAddr, "--frequency", "1h")
	writePattern(t, w.a, "vm1/disk0", 0x51, 1)
	w.a.run("replication", "sync", "vm1", "--timeout", "30s")
	w.a.kill()
	w.b.run("failover", "unplanned", "vm1")

	w.a.start()
	waitFor(t, "A to fence vm1", func() bool { return vmFence(t, w.a, "vm1") != nil })
	f := vmFence(t, w.a, "vm1")
	if f["replica_name"] != "replica.test" || f["kind"] != "unplanned" || f["failed_over_at"] == "" {
		t.Fatalf("fence record: %+v", f)
	}
	stale := exportBytes(t, w.a, "vm1/disk0")
	fenced := func(when string) {
		t.Helper()
		out, err := runOut("qemu-io", "-f", "raw", "-c", "write -P 0x66 2M 64k", w.a.uri("vm1/disk0"))
		if err == nil {
			t.Fatalf("%s: a write to the fenced VM succeeded:\n%s", when, out)
		}
		t.Logf("%s: write refused: %s", when, strings.TrimSpace(out))
		sh(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x51 1M 1M", w.a.uri("vm1/disk0"))
		if !bytes.Equal(exportBytes(t, w.a, "vm1/disk0"), stale) {
			t.Fatalf("%s: the fenced VM's disk changed", when)
		}
		list := w.a.run("vm", "list")
		if !strings.Contains(list, "FENCED: failed over on replica.test") || !strings.Contains(list, "this copy is stale") {
			t.Fatalf("%s: vm list does not say FENCED:\n%s", when, list)
		}
		st := primaryStatus(t, w.a, "vm1")
		if st.State != "fenced" || st.Health != "critical" || !strings.Contains(st.Reason, "FENCED") {
			t.Fatalf("%s: replication status: %+v", when, st)
		}
		if text := w.a.run("replication", "status", "vm1"); !strings.Contains(text, "FENCED: failed over on replica.test") {
			t.Fatalf("%s: replication status text:\n%s", when, text)
		}
		if status := w.a.run("status"); !strings.Contains(status, "vm1: FENCED") {
			t.Fatalf("%s: vdrepl status does not warn:\n%s", when, status)
		}
		out, _, err = w.a.try("doctor", "vm1")
		if err == nil || !strings.Contains(out, "fence") || !strings.Contains(out, "vdrepl replication reverse vm1") {
			t.Fatalf("%s: doctor vm1: %v\n%s", when, err, out)
		}
	}
	fenced("after the failover")

	// The FUSE file is read-only too.
	need(t, "fusermount3")
	mp := t.TempDir()
	stopMount := w.a.mount(mp)
	img := filepath.Join(mp, "vm1", "disk0.img")
	if rw, err := os.OpenFile(img, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		if err == nil {
			rw.Close()
		}
		t.Fatalf("open of the fenced VM's FUSE file for writing: %v, want EROFS", err)
	}
	got := make([]byte, 1<<20)
	ro, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x51}, 1<<20)) {
		t.Fatalf("read of the fenced VM's FUSE file: %v", err)
	}
	ro.Close()
	stopMount()

	// The fence is in the registry: a restart keeps it, before the
	// replica is even asked again.
	w.a.stop()
	w.a.start()
	fenced("after a restart")

	_, errOut, err := w.a.try("vm", "unfence", "vm1")
	if err == nil || !strings.Contains(errOut, "split brain") || !strings.Contains(errOut, "--force") {
		t.Fatalf("unfence without --force: %v\n%s", err, errOut)
	}
	if vmFence(t, w.a, "vm1") == nil {
		t.Fatal("unfence without --force unfenced")
	}
	out := w.a.run("vm", "unfence", "vm1", "--force")
	t.Logf("unfence --force: %s", strings.TrimSpace(out))
	writePattern(t, w.a, "vm1/disk0", 0x67, 2)
	if vmFence(t, w.a, "vm1") != nil || strings.Contains(w.a.run("vm", "list"), "FENCED") {
		t.Fatal("still fenced after unfence --force")
	}
}
