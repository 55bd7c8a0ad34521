package daemon

import (
	"crypto/x509"
	"errors"
	"testing"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// adoptableVM registers a served VM that replicates to replica.example.
func adoptableVM(t *testing.T, d *Daemon) *vm {
	v := addTestVM(t, d, "a")
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Replication = &control.ReplicationSpec{Replica: "replica.example:8443"} }); err != nil {
		t.Fatal(err)
	}
	return v
}

var replicaCert = &x509.Certificate{DNSNames: []string{"replica.example"}}

func enableOf(v *vm) wire.Enable {
	return wire.Enable{Existing: true, Disks: []wire.Disk{{Name: v.spec.Disks[0].Name, Size: v.spec.Disks[0].Size}}}
}

// TestAdoptHoldsNoLock: between Adopt and finish (apply registering the
// replica VM) the daemon holds no lock, and the VM is refused to every
// other operation; finish(false) serves it again.
func TestAdoptHoldsNoLock(t *testing.T) {
	d := newTestDaemon(t)
	v := adoptableVM(t, d)
	h := (*hostHooks)(d)
	images, finish, err := h.Adopt("a", "replica.example", replicaCert, enableOf(v))
	if err != nil {
		t.Fatal(err)
	}
	if len(images) != 1 || images[0] != v.spec.Disks[0].Path {
		t.Fatalf("images %v", images)
	}
	if !d.opMu.TryLock() {
		t.Fatal("Adopt returned holding opMu")
	}
	d.opMu.Unlock()
	if err := d.RemoveVM("a"); !errors.Is(err, control.ErrInUse) {
		t.Fatalf("RemoveVM while adopted: %v", err)
	}
	if _, err := d.Reverse("a", control.ReplicationSpec{}); !errors.Is(err, control.ErrInUse) {
		t.Fatalf("Reverse while adopted: %v", err)
	}
	if _, err := d.servedVM("a"); err == nil {
		t.Fatal("the VM is served while it is adopted")
	}
	finish(false)
	if s := servedNow(d, "a"); s.j == nil || s.busy {
		t.Fatalf("after finish(false) the VM is %+v, want it served", s)
	}
}

// TestAdoptFinish: finish(true) forgets the VM, in the registry too, and
// wakes a planned failover waiting for it.
func TestAdoptFinish(t *testing.T) {
	d := newTestDaemon(t)
	v := adoptableVM(t, d)
	wait := d.fo.AdoptWaiter("a")
	_, finish, err := (*hostHooks)(d).Adopt("a", "replica.example", replicaCert, enableOf(v))
	if err != nil {
		t.Fatal(err)
	}
	finish(true)
	select {
	case <-wait:
	default:
		t.Fatal("the adoption did not wake its waiter")
	}
	if s := servedNow(d, "a"); s != nil {
		t.Fatalf("adopted VM still registered: %+v", s)
	}
	specs, err := d.reg.load()
	if err != nil || len(specs) != 0 {
		t.Fatalf("registry after the adoption: %v %+v", err, specs)
	}
}

// TestAdoptRefuses: a peer that is not the VM's replica, or disks that do
// not match, change nothing.
func TestAdoptRefuses(t *testing.T) {
	d := newTestDaemon(t)
	v := adoptableVM(t, d)
	h := (*hostHooks)(d)
	if _, _, err := h.Adopt("a", "intruder", &x509.Certificate{DNSNames: []string{"intruder.example"}}, enableOf(v)); err == nil {
		t.Fatal("adopted for a peer that is not the replica")
	}
	en := enableOf(v)
	en.Disks[0].Size++
	if _, _, err := h.Adopt("a", "replica.example", replicaCert, en); err == nil {
		t.Fatal("adopted with disks of another size")
	}
	if s := servedNow(d, "a"); s.j == nil || s.busy {
		t.Fatalf("a refused adoption changed the VM: %+v", s)
	}
}
