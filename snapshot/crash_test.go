package snapshot

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// fork returns a harness over fsys with h's model, for another run from the
// same state. h's Store must be closed and fsys hold what h's fs held.
func (h *harness) fork(t testing.TB, fsys vfs.FS, seed uint64) *harness {
	at := map[uint64][][]byte{}
	for c, m := range h.at {
		at[c] = m // never written in place
	}
	return &harness{
		t: t, fs: fsys, dir: h.dir, disks: h.disks,
		model: cloneImages(h.model), at: at, cycle: h.cycle,
		rng: rand.New(rand.NewPCG(seed, 11)), every: h.every, quick: true,
	}
}

// base builds a history with points at 3, 6 and 9 and returns it with its
// Store closed; its MemFS holds everything synced.
func base(t *testing.T, seed uint64) (*harness, *vfs.MemFS) {
	mem := vfs.NewMemFS()
	h := newHarnessSizes(t, mem, seed, smallSizes)
	for range 10 {
		h.step()
	}
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	return h, mem
}

// TestCrashDuringApply cuts the power before every mutating call of a run
// of cycles (BeforeWrite appends, Sync, image writes, Cycle with a point:
// segment creation, manifest). Recovery opens the Store on what the crash
// left and applies the interrupted cycle again, as apply does for its
// intent; then every point must be exact. With random crash images,
// unsynced writes survive in part, in any order: torn segment tails.
func TestCrashDuringApply(t *testing.T) {
	b, mem := base(t, 20)
	for _, random := range []bool{false, true} {
		crashes := 0
		for n := 0; ; n++ {
			cfs := newCrashFS(mem.CrashClone(), n, nil)
			if random {
				cfs.rng = rand.New(rand.NewPCG(uint64(n), 3))
			}
			h := b.fork(t, cfs, 99)
			s, err := Open(h.config())
			if err != nil {
				t.Fatalf("n=%d: open before the crash: %v", n, err)
			}
			h.s = s
			var pending struct {
				c    uint64
				ops  []op
				take bool
			}
			crashed := false
			for range 5 {
				c := h.cycle + 1
				ops := h.randomOps()
				take := c%h.every == 0
				if err := h.applyOps(c, ops, take); err != nil {
					if !errors.Is(err, errCrash) {
						t.Fatalf("n=%d cycle %d: %v", n, c, err)
					}
					pending.c, pending.ops, pending.take = c, ops, take
					crashed = true
					break
				}
				h.commit(c, ops, take)
			}
			s.Close()
			if !crashed {
				if crashes == 0 {
					t.Fatal("no crash point reached")
				}
				t.Logf("random=%v: %d crash points", random, crashes)
				break
			}
			crashes++
			img := cfs.image()
			if img == nil {
				t.Fatalf("n=%d: failed without crashing", n)
			}
			h.fs = img
			s, err = Open(h.config())
			if err != nil {
				t.Fatalf("n=%d random=%v: open after the crash: %v", n, random, err)
			}
			h.s = s
			if err := h.applyOps(pending.c, pending.ops, pending.take); err != nil {
				t.Fatalf("n=%d: redo cycle %d: %v", n, pending.c, err)
			}
			h.commit(pending.c, pending.ops, pending.take)
			h.checkPoints()
			// One more cycle and a reopen: the store goes on normally.
			h.step()
			h.reopen()
			h.checkPoints()
			h.s.Close()
		}
	}
}

// TestCrashDuringRollback cuts the power before every mutating call of a
// Rollback. Open on what the crash left finishes it when its intent was
// durable; either way the images and the points are exact.
func TestCrashDuringRollback(t *testing.T) {
	b, mem := base(t, 21)
	target := uint64(6)
	var rolled, notYet int
	for n := 0; ; n++ {
		cfs := newCrashFS(mem.CrashClone(), n, nil)
		h := b.fork(t, cfs, 1)
		s, err := Open(h.config())
		if err != nil {
			t.Fatal(err)
		}
		h.s = s
		err = s.Rollback("6")
		s.Close()
		if cfs.image() == nil {
			if err != nil {
				t.Fatalf("n=%d: %v", n, err)
			}
			break
		}
		// A crash while removing what the rollback left behind is only
		// logged: the rollback is done.
		if err != nil && !errors.Is(err, errCrash) {
			t.Fatalf("n=%d: %v", n, err)
		}
		h.fs = cfs.image()
		h.open()
		switch got := pointCycles(h.s.Points()); {
		case slices.Equal(got, []uint64{3}):
			rolled++
			h.model = cloneImages(h.at[target])
			h.cycle = target
		case slices.Equal(got, []uint64{3, 6, 9}):
			notYet++
		default:
			t.Fatalf("n=%d: points after the crash %v", n, got)
		}
		h.checkPoints()
		if names, _ := h.fs.ReadDir(h.dir); slices.Contains(names, intentFile) {
			t.Fatalf("n=%d: intent left after Open: %v", n, names)
		}
		h.step()
		h.checkPoints()
		h.s.Close()
	}
	if rolled == 0 || notYet == 0 {
		t.Fatalf("crash outcomes: %d finished at Open, %d not begun", rolled, notYet)
	}
	t.Logf("%d crashes finished at Open, %d before the intent", rolled, notYet)
}

// TestCrashDuringPrune: a crash while pruning leaves the old or the new
// manifest, and never a segment a listed point needs missing.
func TestCrashDuringPrune(t *testing.T) {
	b, mem := base(t, 22)
	for n := 0; ; n++ {
		cfs := newCrashFS(mem.CrashClone(), n, nil)
		h := b.fork(t, cfs, 1)
		h.open()
		err := h.s.Prune(1)
		h.s.Close()
		if cfs.image() == nil {
			if err != nil {
				t.Fatalf("n=%d: %v", n, err)
			}
			break
		}
		h.fs = cfs.image()
		h.open()
		if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{9}) && !slices.Equal(got, []uint64{3, 6, 9}) {
			t.Fatalf("n=%d: points %v", n, got)
		}
		h.checkPoints()
		h.s.Close()
	}
}
