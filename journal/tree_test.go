package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

func waitTreeBuilt(t *testing.T, j *Journal) {
	t.Helper()
	waitFor(t, func() bool { return j.Stats().TreeBuilt })
}

// freshRoots builds a tree from nothing over imgs and returns its roots.
func freshRoots(t *testing.T, imgs model) []blocktree.Root {
	t.Helper()
	db, err := badger.Open(blocktree.Options("").WithInMemory(true))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	sizes := make([]int64, len(imgs))
	for i := range imgs {
		sizes[i] = int64(len(imgs[i]))
	}
	tr, _, err := blocktree.Open(db, []byte("x"), sizes)
	if err != nil {
		t.Fatal(err)
	}
	for i := range imgs {
		for done := false; !done; {
			if done, err = tr.BuildStep(i, bytes.NewReader(imgs[i]), 1<<20, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	r := tr.Roots()
	if r == nil {
		t.Fatal("a fresh build has no roots")
	}
	return r
}

// checkTreeAgrees checks that the journal's tree never claims a hash that
// imgs do not have, and that its roots (once it knows every block) are a
// fresh build's. The caller makes sure the write-back has caught up.
func checkTreeAgrees(t *testing.T, j *Journal, imgs model) {
	t.Helper()
	tr := j.BlockTree()
	for d, img := range imgs {
		hs, err := tr.Blocks(d, 0, int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		for b, h := range hs {
			if want := blocktree.HashBlock(img[b*BlockSize : (b+1)*BlockSize]); h != blocktree.Unknown && h != want {
				t.Fatalf("the tree claims %#x for disk %d block %d, the image has %#x", h, d, b, want)
			}
		}
	}
	if r := tr.Roots(); r != nil && !slices.Equal(r, freshRoots(t, imgs)) {
		t.Fatalf("roots %v, a fresh build over the images %v", r, freshRoots(t, imgs))
	}
}

// caughtUp syncs the journal and writes everything back.
func caughtUp(t *testing.T, j *Journal) {
	t.Helper()
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
}

// TestTreeFollowsWriteBack: after random writes, trims and zeroes (plain
// and direct appends, grouped direct write-backs) the tree equals a fresh
// build over the images.
func TestTreeFollowsWriteBack(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 9))
			mem := vfs.NewMemFS()
			cfg := testConfig(t, mem, "/vm", 1<<20, 768<<10)
			j := mustOpen(t, cfg)
			defer j.Close()
			directHalf(r, j)
			waitTreeBuilt(t, j)
			m := newModel(1<<20, 768<<10)
			for round := 0; round < 4; round++ {
				randomOps(t, r, j, m, 100)
				if r.IntN(2) == 0 {
					if _, err := j.Seal(0); err != nil {
						t.Fatal(err)
					}
				}
				caughtUp(t, j)
				checkModel(t, j, m)
				if got := j.BlockTree().Roots(); !slices.Equal(got, freshRoots(t, m)) {
					t.Fatalf("round %d: roots %v, want %v", round, got, freshRoots(t, m))
				}
				checkTreeAgrees(t, j, readImages(t, mem, cfg))
			}
		})
	}
}

// TestRootsAt: the roots recorded at each barrier are those of the disks'
// content at that barrier, also when the write-back lags several cycles
// behind and skips blocks of older cycles that newer records rewrite.
func TestRootsAt(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 10))
			mem := vfs.NewMemFS()
			cfg := testConfig(t, mem, "/vm", 512<<10, 256<<10)
			j := mustOpen(t, cfg)
			defer j.Close()
			directHalf(r, j)
			waitTreeBuilt(t, j)
			m := newModel(512<<10, 256<<10)
			at := map[uint64]model{}
			for c := 0; c < 8; c++ {
				lag := r.IntN(2) == 0
				if lag {
					// The write-back waits: the next cycles rewrite
					// blocks of this one before it is written back.
					j.wb.Lock()
				}
				for k := 0; k < 20; k++ {
					d := r.IntN(len(m))
					off := r.Int64N(int64(len(m[d]))/BlockSize-4) * BlockSize
					p := fill(r, (1+r.IntN(4))*BlockSize)
					if _, err := j.Disk(d).WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(m[d][off:], p)
				}
				info, err := j.Seal(0)
				if lag {
					j.wb.Unlock()
				}
				if err != nil {
					t.Fatal(err)
				}
				at[info.Cycle] = cloneModel(m)
				if !lag {
					randomOps(t, r, j, m, 10) // trims and zeroes too
					info, err := j.Seal(0)
					if err != nil {
						t.Fatal(err)
					}
					at[info.Cycle] = cloneModel(m)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for c, want := range at {
				roots, err := j.RootsAt(ctx, c)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(roots, freshRoots(t, want)) {
					t.Fatalf("cycle %d: roots %v, want %v", c, roots, freshRoots(t, want))
				}
			}
			// A cycle not sealed yet: the wait ends with ctx.
			short, cancel2 := context.WithTimeout(ctx, 20*time.Millisecond)
			defer cancel2()
			if _, err := j.RootsAt(short, j.OpenCycle()); err != context.DeadlineExceeded {
				t.Fatalf("RootsAt of the open cycle: %v, want DeadlineExceeded", err)
			}
		})
	}
}

// TestWaitWrittenBackClose: a waiter is released by Close with ErrClosed.
func TestWaitWrittenBackClose(t *testing.T) {
	mem := vfs.NewMemFS()
	j := mustOpen(t, testConfig(t, mem, "/vm", 64<<10))
	errc := make(chan error, 1)
	go func() { errc <- j.WaitWrittenBack(context.Background(), j.OpenCycle()) }()
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != ErrClosed {
		t.Fatalf("WaitWrittenBack on close: %v, want ErrClosed", err)
	}
}

// TestTreePersists: with the index on disk the tree survives Close/Open
// without a rebuild, and a kill -9 at random points (the images and the
// index keep what was written) leaves a tree that, after replay, agrees
// with the images.
func TestTreePersists(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20, 512<<10)
	cfg.IndexDir = dir + "/index"
	j := mustOpen(t, cfg)
	waitTreeBuilt(t, j)
	r := rand.New(rand.NewPCG(4, 4))
	m := newModel(1<<20, 512<<10)
	randomOps(t, r, j, m, 100)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 8; round++ {
		j = mustOpen(t, cfg)
		if j.treeReset {
			t.Fatalf("round %d: the tree was reset at Open", round)
		}
		if !slices.Equal(j.BlockTree().Roots(), freshRoots(t, m)) {
			t.Fatalf("round %d: roots after reopen differ from a fresh build", round)
		}
		directHalf(r, j)
		randomOps(t, r, j, m, 50+r.IntN(100))
		switch r.IntN(3) {
		case 0:
			caughtUp(t, j)
		case 1:
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		if r.IntN(2) == 0 {
			if err := j.checkpoint(true); err != nil {
				t.Fatal(err)
			}
		}
		randomOps(t, r, j, m, r.IntN(20))
		if round%2 == 0 {
			j.abandon()
		} else if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		j = mustOpen(t, cfg)
		checkModel(t, j, m)
		caughtUp(t, j)
		checkTreeAgrees(t, j, readImages(t, vfs.Default, cfg))
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCutTreeRepaired: a record recovery cuts (its header verifies, its
// payload does not) was written back and its hashes committed and synced
// to the tree, but the image lost its data (a power cut before the image
// sync). Recovery must not leave the tree claiming those hashes: the range
// is invalidated, then re-hashed from the image, and the tree agrees with
// the image and has roots again.
func TestCutTreeRepaired(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 1<<20)
	cfg.IndexDir = t.TempDir()
	j := mustOpen(t, cfg)
	waitTreeBuilt(t, j)
	r := rand.New(rand.NewPCG(6, 6))
	const off = 256 << 10
	if _, err := j.Disk(0).WriteAt(fill(r, 64<<10), off); err != nil {
		t.Fatal(err)
	}
	caughtUp(t, j)
	if err := j.checkpoint(true); err != nil {
		t.Fatal(err)
	}
	p := fill(r, 64<<10)
	if _, err := j.Disk(0).WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	h := lastQueued(t, j)
	caughtUp(t, j)
	if err := j.tree.Sync(); err != nil {
		t.Fatal(err)
	}
	if hs, _ := j.tree.Blocks(0, off, BlockSize); hs[0] != blocktree.HashBlock(p[:BlockSize]) {
		t.Fatal("the tree does not hold the written-back record's hash")
	}
	j.mu.Lock()
	seg := j.segmentFor(h.LSN)
	j.mu.Unlock()
	j.abandon()
	f, err := mem.OpenFile(seg.name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	flipFile(t, f, int64(h.LSN-seg.base)+HeaderSize+int64(h.Length)-1)
	f.Close()
	// The image lost the record: another 64 KiB there.
	img, err := mem.OpenFile(cfg.Disks[0].Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(fill(r, 64<<10), off); err != nil {
		t.Fatal(err)
	}
	img.Close()

	j2 := mustOpen(t, cfg)
	defer j2.Close()
	waitFor(t, func() bool { return j2.Stats().TreeComplete })
	checkTreeAgrees(t, j2, readImages(t, mem, cfg))
}

// copyDir copies the files of src (a Badger directory, but its lock) to
// dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() == "LOCK" || e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestTreePowerCut: the journal and images on a MemFS lose their unsynced
// data; the tree's Badger is in a real directory and comes back either as
// it was at the crash (everything committed kept, so ahead of images that
// lost writes) or as it was at the last checkpoint (everything since lost:
// the least the checkpoint's tree.Sync promises). Either way, after
// recovery the tree agrees with the images.
func TestTreePowerCut(t *testing.T) {
	for seed := uint64(1); seed <= 12; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 79))
			mem := vfs.NewMemFS()
			cfg := crashConfig(t, mem, r)
			// Checkpoints only where the test takes them, so that the
			// copy of the index is the last checkpoint's.
			cfg.CheckpointInterval = time.Hour
			cfg.IndexDir = filepath.Join(t.TempDir(), "index")
			j := mustOpen(t, cfg)
			directHalf(r, j)
			waitTreeBuilt(t, j)
			snap := filepath.Join(t.TempDir(), "at-checkpoint")
			checkpoint := func() {
				// The write-back waits, so the copy is the tree the
				// checkpoint synced.
				j.wb.Lock()
				defer j.wb.Unlock()
				if err := j.checkpoint(true); err != nil {
					t.Fatal(err)
				}
				os.RemoveAll(snap)
				copyDir(t, cfg.IndexDir, snap)
			}
			checkpoint()
			m := newModel(crashSizes...)
			h := newHistory()
			for k := 0; k < 4; k++ {
				if err := runWorkload(r, j, m, h, 40+r.IntN(40)); err != nil {
					t.Fatal(err)
				}
				if err := j.writeBack(); err != nil {
					t.Fatal(err)
				}
				if r.IntN(2) == 0 {
					checkpoint()
				}
			}
			if err := runWorkload(r, j, m, h, r.IntN(40)); err != nil {
				t.Fatal(err)
			}
			// The power cut stops everything at once: the background,
			// which would go on syncing, writing back and committing to
			// the tree, stops before the clone is taken.
			var atCrash, atCkpt *vfs.MemFS
			j.abandonWith(func() { atCrash, atCkpt = mem.CrashClone(), mem.CrashClone() })
			t.Log("index as at the crash")
			recoverAndCheck(t, cfg, atCrash, h).Close()
			t.Log("index as at the last checkpoint")
			c := cfg
			c.IndexDir = snap
			recoverAndCheck(t, c, atCkpt, h)
		})
	}
}

// TestWaitWrittenBackFailure: a write-back that fails releases a waiter
// with the journal's failure.
func TestWaitWrittenBackFailure(t *testing.T) {
	mem := vfs.NewMemFS()
	efs := vfs.NewErrorFS(mem)
	cfg := testConfig(t, efs, "/vm", 64<<10)
	j := mustOpen(t, cfg)
	defer j.Close()
	waitTreeBuilt(t, j)
	j.wb.Lock() // the write-back waits until the image fails
	if _, err := j.Disk(0).WriteAt(make([]byte, BlockSize), 0); err != nil {
		j.wb.Unlock()
		t.Fatal(err)
	}
	info, err := j.Seal(0)
	if err != nil {
		j.wb.Unlock()
		t.Fatal(err)
	}
	efs.InjectAfterPath(vfs.OpWrite, ".img", 0, vfs.ErrInjected)
	j.wb.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := j.WaitWrittenBack(ctx, info.Cycle); !errors.Is(err, ErrFailed) || !errors.Is(err, vfs.ErrInjected) {
		t.Fatalf("WaitWrittenBack over a failed write-back: %v, want ErrFailed wrapping the injected error", err)
	}
}
