package daemon

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
)

// TestFenceGate: a fenced VM's disk, as the front ends get it from the
// catalogue, is read-only (the export says so to new clients) and refuses
// every kind of write on the way in, including the journal's receive path
// (blockdev.Receiver, whose buffer goes back) while reads and the map
// (blockdev.Mapper) still work. A planned failover's gate does not lift
// the fence.
func TestFenceGate(t *testing.T) {
	d := newTestDaemon(t)
	addTestVM(t, d, "a")
	f := control.Fence{Replica: "r:8443", ReplicaName: "r.test", Kind: "unplanned", FailedOverAt: time.Date(2026, 12, 1, 2, 3, 4, 0, time.UTC)}
	if err := d.fenceVM("a", f); err != nil {
		t.Fatal(err)
	}
	x, ok := (*exports)(d).Lookup("a/d0")
	if !ok || !x.ReadOnly {
		t.Fatalf("export of a fenced VM: %+v %v", x, ok)
	}
	disk := x.Disk
	if _, err := disk.WriteAt([]byte{1}, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("WriteAt: %v", err)
	}
	if err := disk.Trim(0, 4096); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("Trim: %v", err)
	}
	if err := disk.Zero(0, 4096, true); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("Zero: %v", err)
	}
	rcv, ok := disk.(blockdev.Receiver)
	if !ok {
		t.Fatal("the fenced disk lost blockdev.Receiver")
	}
	write, err := rcv.ReceiveWrite(bytes.NewReader(make([]byte, 64<<10)), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := write(0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("received write: %v", err)
	}
	if _, ok := disk.(blockdev.Mapper); !ok {
		t.Fatal("the fenced disk lost blockdev.Mapper")
	}
	if _, err := disk.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("read of a fenced disk: %v", err)
	}
	(*primaryRole)(d).Gate("a", false)
	if _, err := disk.WriteAt([]byte{1}, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("an open planned-failover gate lifted the fence: %v", err)
	}
	if w := fenceWarnings(d.registeredVMs()); len(w) != 1 || !strings.Contains(w[0], "FENCED: failed over on r.test (r:8443) at 2026-12-01T02:03:04Z") {
		t.Fatalf("status warnings: %q", w)
	}
}

// TestFencePersistsAndUnfence: the fence is in the registry, so a VM
// opened again from it is fenced; unfence needs force, and the failover
// it was unfenced despite does not fence the VM again, a later one does.
func TestFencePersistsAndUnfence(t *testing.T) {
	d := newTestDaemon(t)
	v := addTestVM(t, d, "a")
	at := time.Date(2026, 12, 1, 2, 3, 4, 0, time.UTC)
	f := control.Fence{Replica: "r:8443", Kind: "unplanned", FailedOverAt: at}
	if err := d.fenceVM("a", f); err != nil {
		t.Fatal(err)
	}
	specs, err := d.reg.load()
	if err != nil || len(specs) != 1 || specs[0].Fenced == nil || !specs[0].Fenced.FailedOverAt.Equal(at) {
		t.Fatalf("registry after the fence: %+v %v", specs, err)
	}
	// Served again from the registry (as at start-up): still fenced.
	v.close()
	again, err := d.openVM(specs[0], false)
	if err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	d.vms["a"] = again
	d.mu.Unlock()
	x, _ := (*exports)(d).Lookup("a/d0")
	if _, err := x.Disk.WriteAt([]byte{1}, 0); !errors.Is(err, blockdev.ErrReadOnly) || !x.ReadOnly {
		t.Fatalf("reopened fenced VM takes writes: %v", err)
	}

	if err := d.Unfence("a", false); !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), "split brain") {
		t.Fatalf("unfence without force: %v", err)
	}
	if err := d.Unfence("a", true); err != nil {
		t.Fatal(err)
	}
	if _, err := x.Disk.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("write after unfence: %v", err)
	}
	if err := d.Unfence("a", true); !errors.Is(err, control.ErrInvalid) {
		t.Fatalf("unfence of a VM not fenced: %v", err)
	}
	// The same failover, reported again: not fenced again.
	if err := d.fenceVM("a", f); err != nil {
		t.Fatal(err)
	}
	if s := servedNow(d, "a").spec; s.Fenced != nil || !s.UnfencedFailover.Equal(at) {
		t.Fatalf("fenced again by the failover it was unfenced despite: %+v", s)
	}
	// Another failover later: fenced.
	f.FailedOverAt = at.Add(time.Hour)
	if err := d.fenceVM("a", f); err != nil {
		t.Fatal(err)
	}
	if servedNow(d, "a").spec.Fenced == nil {
		t.Fatal("a later failover did not fence the VM")
	}
}
