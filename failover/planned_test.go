package failover

import (
	"context"
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// handedBack is the handover the new primary receives in these tests.
var handedBack = wire.Handover{Cycle: 9, ReplicateTo: "a.example:8443"}

// TestPlannedTransitions: Primary -> HandedOver -> (adopted by the new
// primary) Replica, every step in order, and the handover record.
func TestPlannedTransitions(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	if s := pw.pstate("v"); s != Primary {
		t.Fatalf("start: %v", s)
	}
	pw.p.onSend = func() {
		if s := pw.pstate("v"); s != HandedOver || !pw.p.readOnly["v"] || pw.p.shipping["v"] {
			t.Errorf("at the send: %v, read-only %v, shipping %v", s, pw.p.readOnly["v"], pw.p.shipping["v"])
		}
		if err := pw.adopt("v"); err != nil {
			t.Errorf("adopt during the send: %v", err)
		}
	}
	res, err := pw.m.Planned(context.Background(), "v", false, "")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Reversed || res.To != "b.example:8443" || res.ToName != "b.example" || res.Cycle != 9 || res.ReplicateTo != "a.example:8443" || res.At.IsZero() {
		t.Fatalf("result %+v", res)
	}
	if want := []string{"handover-recorded", "adopt-registered"}; !slices.Equal(pw.hit, want) {
		t.Fatalf("steps %v, want %v", pw.hit, want)
	}
	if s := pw.pstate("v"); s != Replica {
		t.Fatalf("after the adoption: %v", s)
	}
	if pw.p.shipped != 1 || pw.p.sent != 1 {
		t.Fatalf("shipped %d, sent %d", pw.p.shipped, pw.p.sent)
	}
}

// TestPlannedNotAdopted: a handover the new primary takes without
// replicating back in time leaves the VM handed over, read-only.
func TestPlannedNotAdopted(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	res, err := pw.m.Planned(context.Background(), "v", false, "c.example:1")
	if err != nil || res.Reversed || res.ReplicateTo != "c.example:1" {
		t.Fatalf("Planned: %+v %v", res, err)
	}
	if s := pw.pstate("v"); s != HandedOver || !pw.p.readOnly["v"] || pw.p.shipping["v"] {
		t.Fatalf("after: %v, read-only %v, shipping %v", s, pw.p.readOnly["v"], pw.p.shipping["v"])
	}
}

// TestPlannedRefusals: every check refuses with its reason and leaves the
// VM served, writable and shipping, nothing recorded.
func TestPlannedRefusals(t *testing.T) {
	boom := errors.New("boom")
	for _, c := range []struct {
		name  string
		vm    string
		setup func(*pworld)
		kind  error  // a refusal of this kind, or
		is    error  // an error wrapping this
		text  string // in the error
	}{
		{"unknown", "nope", func(*pworld) {}, nil, errNoPrimary, "nope"},
		{"a replica here", "r", func(pw *pworld) { pw.addReplica("r") }, ErrInvalid, nil, "VM r is a replica on this host; run the planned failover on its primary (old-primary)"},
		{"no identity", "v", func(pw *pworld) { pw.p.noIdentity = boom }, nil, boom, ""},
		{"not replicated", "v", func(pw *pworld) {
			pw.p.update("v", func(r *primRecord) { r.Replica = "" })
		}, ErrInvalid, nil, "VM v is not replicated"},
		{"failed over", "v", func(pw *pworld) {
			reg := pw.host.load()
			reg["v"] = hostEntry{FailedOver: true}
			pw.host.save(reg)
		}, ErrInvalid, nil, "complete the failover first"},
		{"no replica role", "v", func(pw *pworld) { pw.p.noListen = true }, ErrInvalid, nil, "--replica-listen"},
		{"open", "v", func(pw *pworld) { pw.p.users["v"] = "1 NBD connection(s)" }, ErrInUse, nil, "VM v is open (1 NBD connection(s)); shut the VM down first"},
		{"replica unreachable", "v", func(pw *pworld) { pw.p.askErr = boom }, nil, boom, "planned failover of v: ask the replica b.example:8443"},
		{"no certificate", "v", func(pw *pworld) { pw.p.peer = Peer{} }, ErrInvalid, nil, "back from the replica:"},
		{"not allowed", "v", func(pw *pworld) { pw.p.peer.Allowed = false }, ErrInvalid, nil, "`vdrepl replica allow add --primary b.example --storage DIR` first"},
		{"ship fails", "v", func(pw *pworld) { pw.p.shipErr = boom }, nil, boom, "planned failover of v: ship the last cycle"},
		{"record fails", "v", func(pw *pworld) { pw.efs.InjectAlways(vfs.OpRename, boom) }, nil, boom, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			pw := newPWorld(t, vfs.NewMemFS())
			pw.addPrimary("v")
			c.setup(pw)
			_, err := pw.m.Planned(context.Background(), c.vm, false, "")
			pw.efs.Reset()
			var fe *Error
			switch {
			case err == nil:
				t.Fatal("not refused")
			case c.kind != nil && (!errors.As(err, &fe) || fe.Kind != c.kind):
				t.Fatalf("error %v, want a refusal %v", err, c.kind)
			case c.is != nil && !errors.Is(err, c.is):
				t.Fatalf("error %v, want %v", err, c.is)
			case !strings.Contains(err.Error(), c.text):
				t.Fatalf("error %q does not say %q", err, c.text)
			}
			if pw.p.readOnly["v"] || !pw.p.shipping["v"] || pw.p.sent != 0 || pw.p.load()["v"].HandedOver != nil {
				t.Fatalf("a refusal changed the VM: read-only %v, shipping %v, sent %d, record %+v", pw.p.readOnly["v"], pw.p.shipping["v"], pw.p.sent, pw.p.load()["v"])
			}
		})
	}
}

// TestPlannedForce: --force hands over a VM in use, disconnecting its
// clients.
func TestPlannedForce(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	pw.p.users["v"] = "1 file(s) open through FUSE"
	if _, err := pw.m.Planned(context.Background(), "v", true, ""); err != nil {
		t.Fatal(err)
	}
	if !pw.p.disconnected["v"] || pw.pstate("v") != HandedOver {
		t.Fatalf("disconnected %v, state %v", pw.p.disconnected["v"], pw.pstate("v"))
	}
}

// TestPlannedRefusedUndo: a handover the replica refuses is undone: the
// record cleared, the VM writable and shipping again.
func TestPlannedRefusedUndo(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	boom := errors.New("409 mismatch")
	pw.p.sendErr, pw.p.refused = boom, true
	_, err := pw.m.Planned(context.Background(), "v", false, "")
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "planned failover of v refused by b.example:8443, the VM is served here again") {
		t.Fatalf("Planned: %v", err)
	}
	if s := pw.pstate("v"); s != Primary || pw.p.readOnly["v"] || !pw.p.shipping["v"] {
		t.Fatalf("after the undo: %v, read-only %v, shipping %v", s, pw.p.readOnly["v"], pw.p.shipping["v"])
	}
	// A restart finds it a plain primary too.
	if s := pw.restart().pstate("v"); s != Primary {
		t.Fatalf("after a restart: %v", s)
	}
}

// TestPlannedUndoFails: when the record cannot be cleared, the VM stays
// handed over (read-only, the record says so) rather than half undone.
func TestPlannedUndoFails(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	refusal := errors.New("403 forbidden")
	boom := errors.New("disk full")
	pw.p.sendErr, pw.p.refused = refusal, true
	// The record is written before the send: fail the undo's write only.
	pw.p.atSend = func() { pw.efs.InjectAlways(vfs.OpRename, boom) }
	if _, err := pw.m.Planned(context.Background(), "v", false, ""); !errors.Is(err, refusal) {
		t.Fatalf("refused handover: %v", err)
	}
	pw.efs.Reset()
	if s := pw.pstate("v"); s != HandedOver || !pw.p.readOnly["v"] || pw.p.shipping["v"] {
		t.Fatalf("after a failed undo: %v, read-only %v, shipping %v", s, pw.p.readOnly["v"], pw.p.shipping["v"])
	}
}

// TestPlannedNotConfirmed: a send that may not have arrived keeps the VM
// handed over; running the command again sends the same handover without
// shipping again, and finishes.
func TestPlannedNotConfirmed(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	boom := errors.New("connection reset")
	pw.p.sendErr = boom
	_, err := pw.m.Planned(context.Background(), "v", false, "")
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "is not confirmed (the VM stays read-only here); run the command again") {
		t.Fatalf("Planned: %v", err)
	}
	if s := pw.pstate("v"); s != HandedOver || !pw.p.readOnly["v"] || pw.p.shipping["v"] {
		t.Fatalf("after: %v, read-only %v, shipping %v", s, pw.p.readOnly["v"], pw.p.shipping["v"])
	}
	pw.p.sendErr, pw.p.cycle = nil, 99
	pw.p.onSend = func() {
		if err := pw.adopt("v"); err != nil {
			t.Error(err)
		}
	}
	res, err := pw.m.Planned(context.Background(), "v", false, "")
	if err != nil || !res.Reversed || res.Cycle != 9 {
		t.Fatalf("again: %+v %v", res, err)
	}
	if pw.p.shipped != 1 || pw.p.sent != 2 || pw.pstate("v") != Replica {
		t.Fatalf("shipped %d, sent %d, state %v", pw.p.shipped, pw.p.sent, pw.pstate("v"))
	}
}

// TestPlannedCrashAtEveryStep cuts the power at each durable step of a
// planned failover, on the old primary (handover-recorded, and
// adopt-registered inside the adoption) and restarts it: the VM is where
// the command left it, served the way the table says, and running the
// command again finishes it or says why it has nothing left to do.
func TestPlannedCrashAtEveryStep(t *testing.T) {
	for _, step := range []string{"handover-recorded", "adopt-registered"} {
		t.Run(step, func(t *testing.T) {
			pw := newPWorld(t, vfs.NewMemFS())
			pw.addPrimary("v")
			pw.p.onSend = func() { pw.adopt("v") }
			pw.armed = step
			got, err := pw.run(func() error { _, err := pw.m.Planned(context.Background(), "v", false, ""); return err })
			if got != step {
				t.Fatalf("crash point %s not reached (err %v, steps %v)", step, err, pw.hit)
			}
			n := pw.restart()
			switch step {
			case "handover-recorded":
				if s := n.pstate("v"); s != HandedOver || !n.p.readOnly["v"] || n.p.shipping["v"] {
					t.Fatalf("after the crash: %v, read-only %v, shipping %v", s, n.p.readOnly["v"], n.p.shipping["v"])
				}
				n.p.onSend = func() {
					if err := n.adopt("v"); err != nil {
						t.Error(err)
					}
				}
				res, err := n.m.Planned(context.Background(), "v", false, "")
				if err != nil || !res.Reversed || n.p.shipped != 0 || n.p.sent != 1 {
					t.Fatalf("again: %+v %v (shipped %d, sent %d)", res, err, n.p.shipped, n.p.sent)
				}
			case "adopt-registered":
				// Reconcile forgot the adopted VM (the Adopted row).
				var fe *Error
				if _, err := n.m.Planned(context.Background(), "v", false, ""); !errors.As(err, &fe) || !strings.Contains(fe.Reason, "is a replica on this host") {
					t.Fatalf("again: %v", err)
				}
			}
			if s := n.pstate("v"); s != Replica {
				t.Fatalf("at the end: %v", s)
			}
		})
	}
}

// TestAdoptRefusals: Adopt refuses a peer that is not the VM's replica,
// a VM in use or not served, disks that do not match, and changes
// nothing; finish(false) serves the VM again, finish(true) wakes the
// waiter.
func TestAdoptRefusals(t *testing.T) {
	other := &x509.Certificate{DNSNames: []string{"c.example"}}
	disk := []wire.Disk{{Name: "d0", Size: 4096}}
	for _, c := range []struct {
		name  string
		vm    string
		cert  *x509.Certificate
		disks []wire.Disk
		setup func(*pworld)
		kind  error
	}{
		{"unknown VM", "nope", replicaCert, disk, func(*pworld) {}, ErrForbidden},
		{"not served", "v", replicaCert, disk, func(pw *pworld) { pw.host.served["v"] = false }, ErrForbidden},
		{"another peer", "v", other, disk, func(*pworld) {}, ErrForbidden},
		{"no certificate", "v", nil, disk, func(*pworld) {}, ErrForbidden},
		{"not replicated", "v", replicaCert, disk, func(pw *pworld) {
			pw.p.update("v", func(r *primRecord) { r.Replica = "" })
		}, ErrForbidden},
		{"in use", "v", replicaCert, disk, func(pw *pworld) { pw.p.users["v"] = "1 NBD connection(s)" }, ErrInUse},
		{"other disk", "v", replicaCert, []wire.Disk{{Name: "d1", Size: 4096}}, func(*pworld) {}, ErrMismatch},
		{"other size", "v", replicaCert, []wire.Disk{{Name: "d0", Size: 8192}}, func(*pworld) {}, ErrMismatch},
	} {
		t.Run(c.name, func(t *testing.T) {
			pw := newPWorld(t, vfs.NewMemFS())
			pw.addPrimary("v")
			c.setup(pw)
			served := pw.host.served["v"]
			_, _, err := pw.m.Adopt(c.vm, "b.example", c.cert, c.disks)
			var fe *Error
			if !errors.As(err, &fe) || fe.Kind != c.kind {
				t.Fatalf("Adopt: %v, want a refusal %v", err, c.kind)
			}
			if pw.host.served["v"] != served || !pw.p.shipping["v"] || pw.pstate("v") != Primary {
				t.Fatalf("a refusal changed the VM: served %v, shipping %v, state %v", pw.host.served["v"], pw.p.shipping["v"], pw.pstate("v"))
			}
		})
	}
}

// TestAdoptFinish: between Adopt and finish the VM is not served and the
// lock is free; finish(false) serves it again, finish(true) forgets it
// and wakes a planned failover waiting for it.
func TestAdoptFinish(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	wait := pw.m.AdoptWaiter("v")
	_, finish, err := pw.m.Adopt("v", "b.example", replicaCert, []wire.Disk{{Name: "d0", Size: 4096}})
	if err != nil {
		t.Fatal(err)
	}
	if pw.host.served["v"] || pw.p.shipping["v"] {
		t.Fatal("the VM is served or shipping while it is adopted")
	}
	if l, ok := pw.m.lock.(interface{ TryLock() bool }); !ok || !l.TryLock() {
		t.Fatal("Adopt returned holding the lock")
	} else {
		pw.m.lock.Unlock()
	}
	finish(false)
	if !pw.host.served["v"] || pw.pstate("v") != Primary {
		t.Fatalf("after finish(false): served %v, %v", pw.host.served["v"], pw.pstate("v"))
	}
	select {
	case <-wait:
		t.Fatal("a failed adoption woke the waiter")
	default:
	}
	if err := pw.adopt("v"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-wait:
	default:
		t.Fatal("the adoption did not wake its waiter")
	}
	if s := pw.pstate("v"); s != Replica {
		t.Fatalf("after the adoption: %v", s)
	}
}

// TestAdoptHandedOver: a handed-over VM is adopted by the host it was
// handed over to.
func TestAdoptHandedOver(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addPrimary("v")
	if _, err := pw.m.Planned(context.Background(), "v", false, ""); err != nil {
		t.Fatal(err)
	}
	pw.p.update("v", func(r *primRecord) { r.Replica = "" }) // only handed_over names the peer
	if err := pw.adopt("v"); err != nil {
		t.Fatal(err)
	}
	if s := pw.pstate("v"); s != Replica {
		t.Fatalf("after: %v", s)
	}
}

// TestTakeOver: the new primary promotes the VM and replicates it back
// once; a repeated handover finds it done.
func TestTakeOver(t *testing.T) {
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addReplica("v")
	if err := pw.m.TakeOver("v", "old", handedBack); err != nil {
		t.Fatal(err)
	}
	if e, _ := pw.host.Entry("v"); pw.pstate("v") != Primary || e.PromotedFrom != "old" || pw.p.load()["v"].Replica != "a.example:8443" {
		t.Fatalf("after: %v %+v %+v", pw.pstate("v"), e, pw.p.load()["v"])
	}
	if err := pw.m.TakeOver("v", "old", handedBack); err != nil || pw.p.replicatedBack != 1 {
		t.Fatalf("repeated: %v, replicated back %d times", err, pw.p.replicatedBack)
	}
	if err := pw.m.TakeOver("v", "someone", handedBack); !errors.Is(err, ErrExists) {
		t.Fatalf("for another peer: %v", err)
	}
}

// TestTakeOverCrashAtEveryStep: a crash at each step of the promotion,
// a restart, and the handover again finishes it, replicating back.
func TestTakeOverCrashAtEveryStep(t *testing.T) {
	for _, step := range []string{"failover-recorded", "promote-failed-over", "complete-points-dropped", "complete-before-registry", "promote-completed"} {
		t.Run(step, func(t *testing.T) {
			pw := newPWorld(t, vfs.NewMemFS())
			pw.addReplica("v")
			pw.armed = step
			if got, err := pw.run(func() error { return pw.m.TakeOver("v", "old", handedBack) }); got != step {
				t.Fatalf("crash point %s not reached (err %v, steps %v)", step, err, pw.hit)
			}
			n := pw.restart()
			if err := n.m.TakeOver("v", "old", handedBack); err != nil {
				t.Fatalf("again (state %v): %v", n.pstate("v"), err)
			}
			if e, _ := n.host.Entry("v"); n.pstate("v") != Primary || e.PromotedFrom != "old" || n.p.load()["v"].Replica != "a.example:8443" {
				t.Fatalf("after: %v %+v", n.pstate("v"), e)
			}
		})
	}
}

// TestReverse: reverse completes a failover, then enables; it refuses
// another initial copy; on a completed failover it only enables; a crash
// in the completion and Reverse again finishes it.
func TestReverse(t *testing.T) {
	enabled := 0
	enable := func() error { enabled++; return nil }
	pw := newPWorld(t, vfs.NewMemFS())
	pw.addReplica("v")
	if _, _, err := pw.m.Unplanned("v", ""); err != nil {
		t.Fatal(err)
	}
	if err := pw.m.Reverse("v", "full", enable); !errors.Is(err, ErrInvalid) || enabled != 0 || pw.pstate("v") != Served {
		t.Fatalf("Reverse --initial full: %v, enabled %d, %v", err, enabled, pw.pstate("v"))
	}
	pw.armed = "complete-points-dropped"
	if got, err := pw.run(func() error { return pw.m.Reverse("v", "", enable) }); got != pw.armed {
		t.Fatalf("crash not reached: %v", err)
	}
	n := pw.restart()
	if s := n.pstate("v"); s != Served && s != Primary {
		t.Fatalf("after the crash: %v", s)
	}
	if err := n.m.Reverse("v", "existing", enable); err != nil || enabled != 1 || n.pstate("v") != Primary {
		t.Fatalf("Reverse again: %v, enabled %d, %v", err, enabled, n.pstate("v"))
	}
	boom := errors.New("enable failed")
	if err := n.m.Reverse("v", "", func() error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Reverse of a primary: %v", err)
	}
}

// TestStateOfHandedOver: the handed-over row of the table, and Reconcile
// keeps it (a restart serves it read-only).
func TestStateOfHandedOver(t *testing.T) {
	ho := &Entry{Name: "v", HandedOver: true}
	if s := StateOf(ho, ReplicaStatus{}); s != HandedOver {
		t.Fatalf("handed over: %v", s)
	}
	if s := StateOf(ho, ReplicaStatus{Known: true, Adopted: true}); s != Adopted {
		t.Fatalf("handed over and adopted: %v", s)
	}
	w := newWorld(t, vfs.NewMemFS())
	if fixes := w.m.Reconcile([]Entry{*ho}); len(fixes) != 0 {
		t.Fatalf("Reconcile of a handed-over VM: %+v", fixes)
	}
}
