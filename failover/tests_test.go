package failover

import (
	"errors"
	"io/fs"
	"slices"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// fakeCopy is a test failover's copy that writes to its scratch
// directory, as the overlay does.
type fakeCopy struct {
	point    string
	closed   bool
	closeErr error // what Close returns
}

func (c *fakeCopy) PointID() string { return c.point }
func (c *fakeCopy) Close() error    { c.closed = true; return c.closeErr }

type testsWorld struct {
	mem    *vfs.MemFS
	efs    *vfs.ErrorFS
	ts     *Tests[*fakeCopy]
	opened []string // vm@point, in order
}

func newTestsWorld(t *testing.T, mem *vfs.MemFS) *testsWorld {
	w := &testsWorld{mem: mem, efs: vfs.NewErrorFS(mem)}
	if err := mem.MkdirAll("/state", 0o700); err != nil {
		t.Fatal(err)
	}
	mem.SyncDir("/")
	w.ts = NewTests(TestsConfig[*fakeCopy]{
		FS: w.efs, StateDir: "/state",
		Open: func(vm, point, scratch string) (*fakeCopy, error) {
			if vm == "gone" {
				return nil, errors.New("not a replica VM")
			}
			if _, err := mem.Stat(scratch); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("scratch %s left from before: %v", scratch, err)
			}
			if err := mem.MkdirAll(scratch, 0o700); err != nil {
				return nil, err
			}
			if err := vfs.WriteFileAtomic(mem, scratch+"/overlay", []byte("writes"), 0o600); err != nil {
				return nil, err
			}
			w.opened = append(w.opened, vm+"@"+point)
			return &fakeCopy{point: point}, nil
		},
		Taken: func(vm string) error {
			if vm == "clash" {
				return ErrExists
			}
			return nil
		},
	})
	return w
}

// TestTestsLifecycle: start, refusals, stop; the record follows.
func TestTestsLifecycle(t *testing.T) {
	w := newTestsWorld(t, vfs.NewMemFS())
	run, err := w.ts.Start("v", "p1")
	if err != nil {
		t.Fatal(err)
	}
	if run.VM != "v" || run.Copy.point != "p1" || run.Started.IsZero() {
		t.Fatalf("Start: %+v", run)
	}
	if _, err := w.ts.Start("v", "p2"); !errors.Is(err, ErrExists) {
		t.Fatalf("a second Start: %v", err)
	}
	if _, err := w.ts.Start("clash", ""); !errors.Is(err, ErrExists) {
		t.Fatalf("Start of a clashing name: %v", err)
	}
	if _, err := w.ts.Start("gone", ""); err == nil {
		t.Fatal("Start of a VM that cannot open")
	}
	if l := w.ts.List(); len(l) != 1 || l[0].VM != "v" {
		t.Fatalf("List: %+v", l)
	}
	if err := w.ts.Stop("v"); err != nil {
		t.Fatal(err)
	}
	if !run.Copy.closed {
		t.Fatal("Stop did not close the copy")
	}
	if _, err := w.mem.Stat("/state/test/v"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("scratch after Stop: %v", err)
	}
	if err := w.ts.Stop("v"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Stop of none: %v", err)
	}
	if ended, err := w.ts.End("v"); ended || err != nil {
		t.Fatalf("End of none: %v %v", ended, err)
	}
	n := newTestsWorld(t, w.mem.CrashClone())
	n.ts.Restart()
	if len(n.ts.List()) != 0 {
		t.Fatal("a stopped test failover started again")
	}
}

// TestTestsRestart: after a crash each recorded test failover starts
// again from its point with a fresh scratch; one that cannot is dropped
// from the record.
func TestTestsRestart(t *testing.T) {
	w := newTestsWorld(t, vfs.NewMemFS())
	for _, vm := range []string{"a", "b"} {
		if _, err := w.ts.Start(vm, "p-"+vm); err != nil {
			t.Fatal(err)
		}
	}
	n := newTestsWorld(t, w.mem.CrashClone())
	n.ts.Restart()
	if want := []string{"a@p-a", "b@p-b"}; !slices.Equal(n.opened, want) {
		t.Fatalf("restarted %v, want %v", n.opened, want)
	}
	// b's replica is gone at the next restart: b is dropped.
	if err := n.ts.CloseAll(); err != nil {
		t.Fatal(err)
	}
	n.ts.cfg.Open = func(open func(vm, point, scratch string) (*fakeCopy, error)) func(vm, point, scratch string) (*fakeCopy, error) {
		return func(vm, point, scratch string) (*fakeCopy, error) {
			if vm == "b" {
				return nil, errors.New("not a replica VM")
			}
			return open(vm, point, scratch)
		}
	}(n.ts.cfg.Open)
	n.ts.Restart()
	if l := n.ts.List(); len(l) != 1 || l[0].VM != "a" {
		t.Fatalf("after a restart without b: %+v", l)
	}
	m := newTestsWorld(t, n.mem.CrashClone())
	m.ts.Restart()
	if want := []string{"a@p-a"}; !slices.Equal(m.opened, want) {
		t.Fatalf("record after dropping b: %v", m.opened)
	}
}

// TestTestsRecordFails: a test failover whose record cannot be written is
// not left running, and its copy is closed.
func TestTestsRecordFails(t *testing.T) {
	w := newTestsWorld(t, vfs.NewMemFS())
	boom := errors.New("disk full")
	w.efs.InjectAlways(vfs.OpRename, boom)
	if _, err := w.ts.Start("v", "p1"); !errors.Is(err, boom) {
		t.Fatalf("Start: %v", err)
	}
	if len(w.ts.List()) != 0 {
		t.Fatal("a test failover runs without its record")
	}
	w.efs.Reset()
	if _, err := w.ts.Start("v", "p1"); err != nil {
		t.Fatal(err)
	}
	w.efs.InjectAlways(vfs.OpRename, boom)
	if ended, err := w.ts.End("v"); !ended || !errors.Is(err, boom) {
		t.Fatalf("End with a failing record: %v %v", ended, err)
	}
}

// TestTestsStopRecordsDespiteCloseError: a copy that does not close cleanly
// is still gone, and so is its record: the error is returned, and after a
// restart the stopped test failover does not start again.
func TestTestsStopRecordsDespiteCloseError(t *testing.T) {
	w := newTestsWorld(t, vfs.NewMemFS())
	run, err := w.ts.Start("v", "p1")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("overlay close failed")
	run.Copy.closeErr = boom
	if err := w.ts.Stop("v"); !errors.Is(err, boom) {
		t.Fatalf("Stop with a failing close: %v, want the close error", err)
	}
	n := newTestsWorld(t, w.mem.CrashClone())
	n.ts.Restart()
	if len(n.opened) != 0 || len(n.ts.List()) != 0 {
		t.Fatalf("a stopped test failover started again after a restart: %v", n.opened)
	}
}
