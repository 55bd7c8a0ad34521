package journal

import (
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// An initial copy read from the live disk while the guest writes, followed by
// the cycles after the resync barrier, equals the primary exactly.
func TestResyncFuzzyCopyPlusCyclesIsExact(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 4<<20, 1<<20)
	cfg.Retain = false
	j := mustOpen(t, cfg)
	defer func() { j.Close() }()
	m := newModel(4<<20, 1<<20)
	r := rand.New(rand.NewPCG(7, 8))
	randomOps(t, r, j, m, 100)
	if _, err := j.Seal(0); err != nil {
		t.Fatal(err)
	}
	if len(j.Cycles()) != 0 {
		t.Fatal("cycles kept without Retain")
	}
	if _, err := j.BeginResync(); err == nil {
		t.Fatal("BeginResync without Retain succeeded")
	}

	if err := j.SetRetain(true); err != nil {
		t.Fatal(err)
	}
	st := j.Stats()
	if !st.ResyncRequired || st.DirtyBlocks != (5<<20)/BlockSize {
		t.Fatalf("after enabling: resync required %v, %d dirty blocks; want every block", st.ResyncRequired, st.DirtyBlocks)
	}
	randomOps(t, r, j, m, 50) // the open cycle: never shipped, the copy covers it

	// The guest keeps writing while the copy runs.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	wr := rand.New(rand.NewPCG(9, 10))
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			randomOps(t, wr, j, m, 5)
		}
	}()
	base, err := j.BeginResync()
	if err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.ResyncRequired || st.ResyncBase != base.Cycle {
		t.Fatalf("during resync: %+v", st)
	}
	replica := newModel(4<<20, 1<<20)
	for d := range replica {
		for off := 0; off < len(replica[d]); off += 64 << 10 {
			if _, err := j.Disk(d).ReadAt(replica[d][off:off+64<<10], int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	last, err := j.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	cs := j.Cycles()
	if len(cs) == 0 || cs[0].Cycle != base.Cycle+1 || cs[len(cs)-1].Cycle != last.Cycle {
		t.Fatalf("closed cycles %v, want %d..%d", cs, base.Cycle+1, last.Cycle)
	}

	// A restart in the middle keeps the resync and its cycles.
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.Retain = true
	j = mustOpen(t, cfg)
	if st := j.Stats(); st.ResyncBase != base.Cycle || len(j.Cycles()) != len(cs) {
		t.Fatalf("after reopen: resync base %d, %d cycles; want %d, %d", st.ResyncBase, len(j.Cycles()), base.Cycle, len(cs))
	}
	for _, c := range cs {
		applyCycle(t, j, c.Cycle, replica)
	}
	for d := range m {
		if k := firstDiff(replica[d], m[d]); k >= 0 {
			t.Fatalf("disk %d: copy + cycles differs from the primary at byte %d", d, k)
		}
	}
	if err := j.EndResync(base.Cycle); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = mustOpen(t, cfg)
	if st := j.Stats(); st.ResyncBase != 0 || st.ResyncRequired {
		t.Fatalf("after EndResync and reopen: %+v", st)
	}
}

// A crash inside BeginResync after the marker was written but before the
// dirty map went leaves both; the dirty map wins.
func TestResyncMarkerLosesToDirtyMap(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20)
	cfg.Retain = false
	j := mustOpen(t, cfg)
	if err := j.SetRetain(true); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := vfs.WriteFileAtomic(vfs.Default, filepath.Join(cfg.Dir, resyncFile), encodeResync(1), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Retain = true
	j = mustOpen(t, cfg)
	defer j.Close()
	if st := j.Stats(); !st.ResyncRequired || st.ResyncBase != 0 {
		t.Fatalf("both files present: %+v, want resync required and no resync under way", st)
	}
	if _, err := vfs.Default.Stat(filepath.Join(cfg.Dir, resyncFile)); err == nil {
		t.Fatal("stale resync marker kept")
	}
}

// Passing the cap during a resync cancels it: dirty tracking again.
func TestCapDuringResyncRestartsIt(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 8<<20)
	cfg.Cap = 2 << 20
	j := mustOpen(t, cfg)
	defer j.Close()
	base, err := j.BeginResync()
	if err != nil {
		t.Fatal(err)
	}
	if j.Stats().ResyncBase != base.Cycle {
		t.Fatal("resync not under way")
	}
	p := make([]byte, 1<<20)
	for k := 0; k < 6; k++ {
		if _, err := j.Disk(0).WriteAt(p, int64(k)<<20); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return j.Stats().ResyncRequired })
	if st := j.Stats(); st.ResyncBase != 0 {
		t.Fatalf("resync still under way after the cap: %+v", st)
	}
	if err := j.EndResync(base.Cycle); err != nil {
		t.Fatal(err)
	}
	if !j.Stats().ResyncRequired {
		t.Fatal("EndResync of a cancelled resync cleared resync required")
	}
}

func TestSetRetainOffReleasesEverything(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20)
	j := mustOpen(t, cfg)
	defer j.Close()
	m := newModel(1 << 20)
	randomOps(t, rand.New(rand.NewPCG(1, 1)), j, m, 20)
	if _, err := j.Seal(0); err != nil {
		t.Fatal(err)
	}
	if len(j.Cycles()) != 1 {
		t.Fatal("cycle not kept")
	}
	if err := j.SetRetain(false); err != nil {
		t.Fatal(err)
	}
	if len(j.Cycles()) != 0 || j.Stats().ResyncRequired {
		t.Fatalf("after SetRetain(false): %d cycles, %+v", len(j.Cycles()), j.Stats())
	}
	checkModel(t, j, m)
}

// Releasing shipped cycles while the next one is sealed must never fail the
// seal (Badger's DropPrefix blocked concurrent index writes).
func TestReleaseDuringSealNeverFailsIt(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20)
	cfg.Cap = 1 << 30
	j := mustOpen(t, cfg)
	defer j.Close()
	r := rand.New(rand.NewPCG(3, 3))
	released := make(chan uint64, 64)
	done := make(chan error, 1)
	go func() {
		for c := range released {
			if err := j.Release(c); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for k := 0; k < 200; k++ {
		for b := 0; b < 20; b++ {
			if _, err := j.Disk(0).WriteAt(fill(r, BlockSize), int64(r.IntN(256))*BlockSize); err != nil {
				t.Fatal(err)
			}
		}
		info, err := j.Seal(0)
		if err != nil {
			t.Fatalf("seal %d: %v", k, err)
		}
		released <- info.Cycle
	}
	close(released)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.ResyncRequired {
		t.Fatalf("resync required after racing releases: %+v", st)
	}
}
