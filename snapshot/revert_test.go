package snapshot

import (
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// latestPoint makes the latest cycle a point, as a failover does first.
func (h *harness) latestPoint() {
	h.t.Helper()
	if err := h.s.Cycle(h.cycle, time.Unix(int64(h.cycle)*60, 0), false, true); err != nil {
		h.t.Fatal(err)
	}
	h.at[h.cycle] = cloneImages(h.model)
}

// checkViews checks every point against the model at its cycle.
func (h *harness) checkViews() {
	h.t.Helper()
	for _, p := range h.s.Points() {
		h.checkView(p.ID, h.at[p.Cycle])
	}
}

// guardedWrites writes ops through GuardFS, as a failed-over VM's journal
// writes its images, and updates the model.
func (h *harness) guardedWrites(ops []op) {
	h.t.Helper()
	g := h.s.GuardFS(h.fs)
	for _, o := range ops {
		f, err := g.OpenFile(h.disks[o.disk].Path, os.O_RDWR, 0)
		if err != nil {
			h.t.Fatal(err)
		}
		switch o.kind {
		case opWrite:
			_, err = f.WriteAt(o.data, o.off)
			copy(h.model[o.disk][o.off:], o.data)
		case opTrim:
			err = f.PunchHole(o.off, o.n)
			clear(h.model[o.disk][o.off : o.off+o.n])
		case opZero:
			err = f.ZeroRange(o.off, o.n)
			clear(h.model[o.disk][o.off : o.off+o.n])
		}
		if err == nil {
			err = f.Sync()
		}
		f.Close()
		if err != nil {
			h.t.Fatal(err)
		}
	}
}

// TestRevertKeepsPoints is the unplanned failover and its cancel: revert
// to an older point, write through the guard, then roll back to the
// latest point. Every point stays exact throughout.
func TestRevertKeepsPoints(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 40)
	for range 10 {
		h.step()
	}
	if err := h.s.Revert("6"); !errors.Is(err, ErrNotLatest) {
		t.Fatalf("revert with the latest cycle not a point: %v, want ErrNotLatest", err)
	}
	h.latestPoint()
	latest := cloneImages(h.model)
	if err := h.s.Revert("6"); err != nil {
		t.Fatal(err)
	}
	h.model = cloneImages(h.at[6])
	h.checkImages(h.model)
	h.checkViews()
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3, 6, 9, 10}) {
		t.Fatalf("points after revert: %v", got)
	}
	// The failed-over VM writes; a second revert (to another point) and a
	// reopen keep everything exact.
	h.guardedWrites(h.randomOps())
	h.checkViews()
	h.reopen()
	h.checkViews()
	if err := h.s.Revert("3"); err != nil {
		t.Fatal(err)
	}
	h.model = cloneImages(h.at[3])
	h.checkImages(h.model)
	h.guardedWrites(h.randomOps())
	h.checkViews()
	// Cancel: back to the latest state, older points intact.
	if err := h.s.Rollback("10"); err != nil {
		t.Fatal(err)
	}
	h.checkImages(latest)
	h.model = latest
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3, 6, 9}) {
		t.Fatalf("points after cancel: %v", got)
	}
	h.checkViews()
	h.step() // replication goes on
	h.checkPoints()
	if err := h.s.Revert("99"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revert to a missing point: %v", err)
	}
}

// TestGuardNoPoints: with no points the guard only passes writes through,
// and it refuses to resize an image.
func TestGuardNoPoints(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 41)
	ops := h.randomOps()
	h.guardedWrites(ops)
	h.checkImages(h.model)
	if ps := h.s.Points(); len(ps) != 0 {
		t.Fatalf("points appeared: %v", ps)
	}
	f, err := h.s.GuardFS(h.fs).OpenFile(h.disks[0].Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(h.disks[0].Size + BlockSize); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("resize through the guard: %v", err)
	}
}

// TestCrashDuringRevert cuts the power before every mutating call of a
// Revert; Open and Revert again must finish it with every point exact.
func TestCrashDuringRevert(t *testing.T) {
	b, mem := base(t, 22)
	s, err := Open(b.config())
	if err != nil {
		t.Fatal(err)
	}
	b.s = s
	b.latestPoint()
	s.Close()
	crashes := 0
	for n := 0; ; n++ {
		cfs := newCrashFS(mem.CrashClone(), n, nil)
		h := b.fork(t, cfs, 2)
		h.open()
		err := h.s.Revert("6")
		h.s.Close()
		if cfs.image() == nil {
			if err != nil {
				t.Fatalf("n=%d: %v", n, err)
			}
			break
		}
		if !errors.Is(err, errCrash) && !errors.Is(err, ErrBroken) {
			t.Fatalf("n=%d: %v", n, err)
		}
		crashes++
		h.fs = cfs.image()
		h.open()
		if err := h.s.Revert("6"); err != nil {
			t.Fatalf("n=%d: revert again after the crash: %v", n, err)
		}
		h.model = cloneImages(h.at[6])
		h.checkImages(h.model)
		h.checkViews()
		if err := h.s.Rollback("10"); err != nil {
			t.Fatalf("n=%d: cancel: %v", n, err)
		}
		h.checkImages(h.at[10])
		h.s.Close()
	}
	if crashes == 0 {
		t.Fatal("no crash point reached")
	}
	t.Logf("%d crash points", crashes)
}
