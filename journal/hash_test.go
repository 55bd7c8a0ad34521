package journal

import (
	"bytes"
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// TestHashesAtAppend: every write record queued for the write-back, by
// each append path (plain, copied into an append buffer, received into
// one), carries the hashes of its payload's blocks, and the tree the
// write-back builds from them, with the buffers kept or the payloads read
// back from the journal, equals a fresh build over the images.
func TestHashesAtAppend(t *testing.T) {
	for _, keep := range []bool{true, false} {
		mem := vfs.NewMemFS()
		cfg := testConfig(t, mem, "/vm", 8<<20)
		j := mustOpen(t, cfg)
		waitTreeBuilt(t, j)
		if !keep {
			j.mu.Lock()
			j.mu.retainLimit = 0 // the write-back reads every payload back
			j.mu.Unlock()
		}
		m := newModel(8 << 20)
		r := rand.New(rand.NewPCG(5, 5))
		d := j.Disk(0)
		j.wb.Lock() // nothing is written back while the queue is looked at
		for _, w := range []struct {
			off      int64
			n        int
			received bool
		}{
			{0, 4096, false},                // plain
			{64 << 10, 3 * 4096, false},     // plain, several blocks
			{1 << 20, 256 << 10, false},     // copied into an append buffer
			{2 << 20, 1 << 20, true},        // received
			{4<<20 + 512, 512 << 10, true},  // received, unaligned: copied
			{6 << 20, 8 << 10, true},        // received, small: plain
			{100, 300, false},               // unaligned: read-modify-write
			{1<<20 + 4096, 128 << 10, true}, // received, rewrites a part
		} {
			p := fill(r, w.n)
			if w.received {
				write, err := d.ReceiveWrite(bytes.NewReader(p), w.n)
				if err != nil {
					t.Fatal(err)
				}
				if err := write(w.off); err != nil {
					t.Fatal(err)
				}
			} else if _, err := d.WriteAt(p, w.off); err != nil {
				t.Fatal(err)
			}
			copy(m[0][w.off:], p)
		}
		j.mu.Lock()
		queue := slices.Clone(j.mu.queue)
		j.mu.Unlock()
		for _, q := range queue {
			if q.h.Kind != KindWrite {
				continue
			}
			p := make([]byte, q.h.Length)
			if err := j.readJournal(p, q.h.LSN+HeaderSize); err != nil {
				t.Fatal(err)
			}
			if want := blocktree.HashBlocks(nil, p); !slices.Equal(q.hashes, want) {
				t.Fatalf("record %#x (%d bytes at %d): hashes %x, want %x", q.h.LSN, q.h.Length, q.h.Offset, q.hashes, want)
			}
		}
		j.wb.Unlock()
		caughtUp(t, j)
		checkModel(t, j, m)
		if got := j.BlockTree().Roots(); !slices.Equal(got, freshRoots(t, m)) {
			t.Fatalf("keep %v: roots %v, want %v", keep, got, freshRoots(t, m))
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestNoBlockTree: without a tree the journal works as with one, barriers
// are still waited for (with no roots), and a tree left in the index is
// rebuilt by the next Open that keeps one.
func TestNoBlockTree(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20, 512<<10)
	cfg.IndexDir = dir + "/index"
	j := mustOpen(t, cfg)
	waitTreeBuilt(t, j)
	r := rand.New(rand.NewPCG(6, 6))
	m := newModel(1<<20, 512<<10)
	randomOps(t, r, j, m, 50)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	cfg.NoBlockTree = true
	j = mustOpen(t, cfg)
	if j.BlockTree() != nil {
		t.Fatal("BlockTree is not nil with NoBlockTree")
	}
	directHalf(r, j)
	randomOps(t, r, j, m, 100)
	info, err := j.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	roots, err := j.RootsAt(ctx, info.Cycle)
	if err != nil || roots != nil {
		t.Fatalf("RootsAt without a tree: %v, %v; want nil, nil", roots, err)
	}
	if s := j.Stats(); s.TreeBuilt || s.TreeComplete || s.TreeSize != 0 {
		t.Fatalf("Stats without a tree: built %v complete %v size %d", s.TreeBuilt, s.TreeComplete, s.TreeSize)
	}
	caughtUp(t, j)
	checkModel(t, j, m)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	cfg.NoBlockTree = false
	j = mustOpen(t, cfg)
	defer j.Close()
	if !j.treeReset {
		t.Fatal("the tree the journal did not keep was not reset at Open")
	}
	waitTreeBuilt(t, j)
	checkModel(t, j, m)
	if got := j.BlockTree().Roots(); !slices.Equal(got, freshRoots(t, m)) {
		t.Fatalf("roots after the rebuild %v, want %v", got, freshRoots(t, m))
	}
}
