package failover

import (
	"errors"
	"slices"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// TestStateOf is the table of the package doc, row by row.
func TestStateOf(t *testing.T) {
	fo := &wire.FailedOver{Kind: "unplanned", Latest: 7}
	own := &Entry{Name: "v"}
	failed := &Entry{Name: "v", FailedOver: true}
	for _, c := range []struct {
		e    *Entry
		r    ReplicaStatus
		want State
	}{
		{nil, ReplicaStatus{}, Unknown},
		{nil, ReplicaStatus{Known: true}, Replica},
		{nil, ReplicaStatus{Known: true, Failover: fo}, Recorded},
		{nil, ReplicaStatus{Known: true, Failover: fo, Rolled: true}, Rolled},
		{failed, ReplicaStatus{Known: true, Failover: fo, Rolled: true}, Served},
		{failed, ReplicaStatus{Known: true, Failover: fo}, Unfinished},
		{failed, ReplicaStatus{Known: true}, Cancelled},
		{failed, ReplicaStatus{}, Completed},
		{own, ReplicaStatus{Known: true, Adopted: true}, Adopted},
		{own, ReplicaStatus{}, Primary},
		{own, ReplicaStatus{Known: true}, Primary}, // a replica of the same name is not adopted: apply refuses that pair
	} {
		if got := StateOf(c.e, c.r); got != c.want {
			t.Errorf("StateOf(%+v, %+v) = %v, want %v", c.e, c.r, got, c.want)
		}
	}
}

// TestTransitions drives every command from its starting state to its
// end, and through the states between.
func TestTransitions(t *testing.T) {
	w := newWorld(t, vfs.NewMemFS())
	w.addReplica("v")
	if s := w.state("v"); s != Replica {
		t.Fatalf("start: %v", s)
	}
	tg, _, err := w.m.Unplanned("v", "p1")
	if err != nil {
		t.Fatal(err)
	}
	if tg.Point != "p1" || tg.Latest != 7 || len(tg.Images) != 1 {
		t.Fatalf("Unplanned target %+v", tg)
	}
	if want := []string{"failover-recorded", "failover-reverted", "failover-before-register"}; !slices.Equal(w.hit, want) {
		t.Fatalf("unplanned steps %v, want %v", w.hit, want)
	}
	if s := w.state("v"); s != Served {
		t.Fatalf("after Unplanned: %v", s)
	}
	w.hit = nil
	if err := w.m.Cancel("v"); err != nil {
		t.Fatal(err)
	}
	if want := []string{"cancel-journal-closed", "cancel-recorded", "cancel-before-forget"}; !slices.Equal(w.hit, want) {
		t.Fatalf("cancel steps %v, want %v", w.hit, want)
	}
	if s := w.state("v"); s != Replica {
		t.Fatalf("after Cancel: %v", s)
	}
	if _, _, err := w.m.Unplanned("v", ""); err != nil {
		t.Fatal(err)
	}
	w.hit = nil
	if err := w.m.Complete("v", ""); err != nil {
		t.Fatal(err)
	}
	if s := w.state("v"); s != Primary || !slices.Contains(w.hit, "complete-before-registry") {
		t.Fatalf("after Complete: %v, steps %v", s, w.hit)
	}

	w.addReplica("p")
	w.hit = nil
	if repeated, err := w.m.Promote("p", "old"); err != nil || repeated {
		t.Fatalf("Promote: %v, repeated %v", err, repeated)
	}
	if want := []string{"failover-recorded", "promote-failed-over", "complete-points-dropped", "complete-before-registry", "promote-completed"}; !slices.Equal(w.hit, want) {
		t.Fatalf("promote steps %v, want %v", w.hit, want)
	}
	if e, _ := w.host.Entry("p"); w.state("p") != Primary || e.PromotedFrom != "old" {
		t.Fatalf("after Promote: %v %+v", w.state("p"), e)
	}
	if repeated, err := w.m.Promote("p", "old"); err != nil || !repeated {
		t.Fatalf("repeated Promote: %v, repeated %v", err, repeated)
	}
}

// TestRefusals: a command from a state it does not start from changes
// nothing and says why.
func TestRefusals(t *testing.T) {
	w := newWorld(t, vfs.NewMemFS())
	w.addReplica("v")
	var fe *Error
	if err := w.m.Cancel("v"); !errors.As(err, &fe) || fe.Kind != ErrInvalid {
		t.Fatalf("Cancel of a replica: %v", err)
	}
	if err := w.m.Complete("v", ""); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Complete of a replica: %v", err)
	}
	if _, _, err := w.m.Unplanned("v", "p1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.m.Unplanned("v", ""); !errors.Is(err, ErrExists) {
		t.Fatalf("Unplanned to another point: %v", err)
	}
	if err := w.m.Complete("v", ""); err != nil {
		t.Fatal(err)
	}
	if _, _, err := w.m.Unplanned("v", ""); !errors.Is(err, ErrExists) {
		t.Fatalf("Unplanned of a primary: %v", err)
	}
	if _, err := w.m.Promote("v", "someone"); !errors.Is(err, ErrExists) {
		t.Fatalf("Promote of a primary for another peer: %v", err)
	}
	if s := w.state("v"); s != Primary {
		t.Fatalf("refusals changed the state: %v", s)
	}
}

// TestCancelReleaseFails: when the VM cannot be taken down, nothing is
// recorded and it stays served.
func TestCancelReleaseFails(t *testing.T) {
	w := newWorld(t, vfs.NewMemFS())
	w.addReplica("v")
	if _, _, err := w.m.Unplanned("v", ""); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("journal close failed")
	w.host.failRel = boom
	if err := w.m.Cancel("v"); !errors.Is(err, boom) {
		t.Fatalf("Cancel: %v", err)
	}
	if e, _ := w.host.Entry("v"); w.state("v") != Served || !e.Served {
		t.Fatalf("after a failed release: %v %+v", w.state("v"), e)
	}
}

// TestRegisterFails: a registry write that fails leaves the failover in
// the replica role only (Rolled); a restart registers it.
func TestRegisterFails(t *testing.T) {
	w := newWorld(t, vfs.NewMemFS())
	w.addReplica("v")
	boom := errors.New("disk full")
	w.efs.InjectAlways(vfs.OpRename, boom)
	if _, _, err := w.m.Unplanned("v", ""); !errors.Is(err, boom) {
		t.Fatalf("Unplanned: %v", err)
	}
	if s := w.state("v"); s != Rolled {
		t.Fatalf("after a failed registration: %v", s)
	}
	w.efs.Reset()
	if s := w.restart().state("v"); s != Served {
		t.Fatalf("after a restart: %v", s)
	}
}

// TestReconcileAdopted: a VM of this host that the replica role adopted
// before a crash is forgotten as a primary.
func TestReconcileAdopted(t *testing.T) {
	w := newWorld(t, vfs.NewMemFS())
	if err := w.host.save(map[string]hostEntry{"v": {}, "w": {}}); err != nil {
		t.Fatal(err)
	}
	m := w.rep.load()
	m["v"] = &repRecord{Adopted: true}
	w.rep.save(m)
	n := w.restart()
	if s := n.state("v"); s != Replica {
		t.Fatalf("adopted VM after restart: %v", s)
	}
	if s := n.state("w"); s != Primary {
		t.Fatalf("other VM after restart: %v", s)
	}
}

// TestCrashAtEveryStep crashes each command at each of its durable steps
// (a power cut: only synced files survive), restarts, and checks that the
// restart leaves the VM in a state the table names and that running the
// command again finishes it.
func TestCrashAtEveryStep(t *testing.T) {
	type cmd struct {
		name  string
		setup func(*world) // brings "v" to the command's start
		run   func(*world) error
		steps []string
		want  State
	}
	unplanned := func(w *world) error { _, _, err := w.m.Unplanned("v", "p1"); return err }
	failedOver := func(w *world) {
		if _, _, err := w.m.Unplanned("v", ""); err != nil {
			t.Fatal(err)
		}
	}
	promote := func(w *world) error { _, err := w.m.Promote("v", "old"); return err }
	cmds := []cmd{
		{"unplanned", func(*world) {}, unplanned,
			[]string{"failover-recorded", "failover-reverted", "failover-before-register"}, Served},
		{"cancel", failedOver, func(w *world) error { return w.m.Cancel("v") },
			[]string{"cancel-journal-closed", "cancel-recorded", "cancel-before-forget"}, Replica},
		{"complete", failedOver, func(w *world) error { return w.m.Complete("v", "") },
			[]string{"complete-points-dropped", "complete-before-registry"}, Primary},
		{"promote", func(*world) {}, promote,
			[]string{"failover-recorded", "promote-failed-over", "complete-points-dropped", "complete-before-registry", "promote-completed"}, Primary},
	}
	// After a restart the VM may be where the command started, where it
	// ends, or served failed over (the cancel or the completion not begun);
	// never anywhere else.
	allowed := map[string][]State{
		"unplanned": {Replica, Served},
		"cancel":    {Served, Replica},
		"complete":  {Served, Primary},
		"promote":   {Replica, Served, Primary},
	}
	for _, c := range cmds {
		for _, step := range c.steps {
			t.Run(c.name+"/"+step, func(t *testing.T) {
				w := newWorld(t, vfs.NewMemFS())
				w.addReplica("v")
				c.setup(w)
				w.armed = step
				got, err := w.run(func() error { return c.run(w) })
				if got != step {
					t.Fatalf("crash point %s not reached (err %v, steps %v)", step, err, w.hit)
				}
				n := w.restart()
				s := n.state("v")
				if !slices.Contains(allowed[c.name], s) {
					t.Fatalf("after a crash at %s the VM is %v, want one of %v", step, s, allowed[c.name])
				}
				if s != c.want {
					if err := c.run(n); err != nil {
						t.Fatalf("%s again after the crash (state %v): %v", c.name, s, err)
					}
				}
				if s := n.state("v"); s != c.want {
					t.Fatalf("after %s again: %v, want %v", c.name, s, c.want)
				}
				if c.name == "promote" {
					if e, _ := n.host.Entry("v"); e.PromotedFrom != "old" {
						t.Fatalf("promoted VM does not name its old primary: %+v", e)
					}
				}
			})
		}
	}
}
