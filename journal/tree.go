package journal

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// treePrefix is the block tree's key prefix in the cycle store's Badger;
// the cycle index's own prefixes ('b', 'r', 'i') are dropped at every open,
// this one is not.
var treePrefix = []byte{'T'}

// Sizes of the tree's work units.
const (
	// treeBuildStep is what one build step hashes while it holds the
	// write-back lock: about 4 MiB, a few milliseconds of reading and
	// hashing, so that the write-back (and the appends waiting on it) is
	// never held up for long.
	treeBuildStep = 4 << 20
	// treeBatchLeaves is the size at which a tree batch is committed, so
	// that a large trim is committed in pieces of bounded memory. One more
	// payload (512 leaves at most) or zero piece (1024) keeps a Commit
	// within one Badger transaction (blocktree splits one of over 2048
	// leaves, marking the tree dirty meanwhile).
	treeBatchLeaves = 1024
	// treeZeroPiece is how much of a trim or zero range is added to a tree
	// batch at a time (1024 leaves) before the batch is checked for size.
	treeZeroPiece = 1024 * blocktree.LeafSize
	// rootsKept is how many barriers' roots the journal remembers.
	rootsKept = 256
)

// openTree opens the block tree in the cycle store's database for the
// journal's disks. A tree that was reset (missing, in-memory store, dirty,
// other sizes) is built from the images by the background goroutine.
func (j *Journal) openTree() error {
	j.mu.tree.roots = make(map[uint64][]blocktree.Root)
	if j.cfg.NoBlockTree && j.cfg.IndexDir == "" {
		return nil
	}
	sizes := make([]int64, len(j.cfg.Disks))
	for i, d := range j.cfg.Disks {
		sizes[i] = d.Size
	}
	t, reset, err := blocktree.Open(j.cycles.db, treePrefix, sizes)
	if err != nil {
		return fmt.Errorf("journal: open block tree: %w", err)
	}
	if j.cfg.NoBlockTree {
		// The images change from now on without the tree: the next
		// Open with a tree finds it dirty and rebuilds it.
		if err := t.Begin(); err != nil {
			return fmt.Errorf("journal: mark block tree dirty: %w", err)
		}
		return nil
	}
	if reset {
		j.log.Info("journal: block tree reset; it is rebuilt from the images")
	}
	j.tree, j.treeReset = t, reset
	return nil
}

// treeBatch gathers the tree changes of one write-back batch (or of
// recovery's replay) and commits them in pieces of at most treeBatchLeaves
// leaves. Without a tree (Config.NoBlockTree) it does nothing.
type treeBatch struct {
	t *blocktree.Tree
	b *blocktree.Batch
}

func newTreeBatch(t *blocktree.Tree) *treeBatch {
	if t == nil {
		return &treeBatch{}
	}
	return &treeBatch{t: t, b: t.Batch()}
}

// data records data written (or, for a block a newer durable record
// rewrites, due) at off of disk.
func (tb *treeBatch) data(disk int, off int64, p []byte) error {
	if tb.t == nil {
		return nil
	}
	tb.b.Data(disk, off, p)
	return tb.commitIfFull()
}

// zero records that [off, off+n) of disk reads as zeroes.
func (tb *treeBatch) zero(disk int, off, n int64) error {
	if tb.t == nil {
		return nil
	}
	for n > 0 {
		k := min(n, treeZeroPiece)
		tb.b.Zero(disk, off, k)
		if err := tb.commitIfFull(); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// recordHashes returns the block hashes of write record q for the tree:
// those taken when it was appended (see appendWriteVia), which every
// write record queued while the journal keeps a tree carries. payload is
// the data the write-back writes from, hashed only should they be missing,
// so that the tree never takes fewer hashes than the record has blocks.
func recordHashes(q *queued, payload []byte) []blocktree.Hash {
	if uint64(len(q.hashes)) == q.h.Length/BlockSize {
		return q.hashes
	}
	return blocktree.HashBlocks(nil, payload)
}

// set records the hashes of consecutive blocks of disk from off.
func (tb *treeBatch) set(disk int, off int64, hs []blocktree.Hash) error {
	if tb.t == nil {
		return nil
	}
	tb.b.Set(disk, off, hs)
	return tb.commitIfFull()
}

// invalidate makes the blocks touching [off, off+n) of disk Unknown.
func (tb *treeBatch) invalidate(disk int, off, n int64) error {
	if tb.t == nil {
		return nil
	}
	for n > 0 {
		k := min(n, treeZeroPiece)
		tb.b.Invalidate(disk, off, k)
		if err := tb.commitIfFull(); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (tb *treeBatch) commitIfFull() error {
	if tb.b.Len() < treeBatchLeaves {
		return nil
	}
	return tb.commit()
}

func (tb *treeBatch) commit() error {
	if tb.t == nil || tb.b.Len() == 0 {
		return nil
	}
	if err := tb.b.Commit(); err != nil {
		return err
	}
	tb.b = tb.t.Batch()
	return nil
}

// BlockTree returns the block-hash tree of the images (internal/blocktree),
// kept by the write-back; nil with Config.NoBlockTree, else the journal
// always keeps one (see the package doc, "Block tree"). Callers read it,
// only the journal changes it.
func (j *Journal) BlockTree() *blocktree.Tree { return j.tree }

// WaitWrittenBack returns once every record of cycles up to c is in the
// images and in the block tree, so that the tree describes the images at
// c's barrier or later. c must be sealed for that to happen: it waits for
// the seal too. It fails with ctx's error, ErrClosed once the journal is
// closing, or the journal's failure.
func (j *Journal) WaitWrittenBack(ctx context.Context, c uint64) error {
	stop := context.AfterFunc(ctx, func() {
		j.mu.Lock()
		j.mu.cond.Broadcast()
		j.mu.Unlock()
	})
	defer stop()
	j.mu.Lock()
	defer j.mu.Unlock()
	for j.mu.tree.through < c {
		switch {
		case j.mu.failed != nil:
			return j.mu.failed
		case j.mu.closed:
			return ErrClosed
		case ctx.Err() != nil:
			return ctx.Err()
		}
		j.kickWriteBack()
		j.mu.cond.Wait()
	}
	return nil
}

// RootsAt returns the block tree's roots of the images at cycle c's
// barrier, one per disk, waiting for the write-back to pass it. Nil (and
// no error) when the tree did not know them: it was being built, held an
// Unknown block, or c is older than the last rootsKept barriers or than
// the last Open (whose barrier it knows only if no record followed it).
func (j *Journal) RootsAt(ctx context.Context, c uint64) ([]blocktree.Root, error) {
	if err := j.WaitWrittenBack(ctx, c); err != nil {
		return nil, err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.mu.tree.roots[c], nil
}

// recordRootsLocked records the tree's roots r (taken by the caller, which
// holds wb, so the tree is still) as the roots at every barrier after the
// last one recorded, up to c: no record of a cycle after the barriers
// passed, and every record of a cycle up to them is in the tree. Caller
// holds mu.
func (j *Journal) recordRootsLocked(c uint64, r []blocktree.Root) {
	if c <= j.mu.tree.through {
		return
	}
	for k := max(j.mu.tree.through+1, c-min(c, rootsKept-1)); k <= c; k++ {
		if r != nil {
			j.mu.tree.roots[k] = r
		}
	}
	for k := range j.mu.tree.roots {
		if k+rootsKept <= c {
			delete(j.mu.tree.roots, k)
		}
	}
	j.mu.tree.through = c
	j.mu.tree.atBarrier = true
	j.mu.cond.Broadcast()
}

// barrierRoots records the tree's roots as those of every barrier up to
// c not yet recorded. The caller holds wb (the tree is still) and knows
// that every record of cycles <= c is in the tree and none after: the
// write-back about to apply the first record of cycle c+1, or finding no
// record of cycles <= c left in its queue with c sealed.
func (j *Journal) barrierRoots(c uint64) {
	j.mu.Lock()
	due := c > j.mu.tree.through
	j.mu.Unlock()
	if !due {
		return
	}
	var r []blocktree.Root
	if j.tree != nil {
		r = j.tree.Roots()
	}
	j.mu.Lock()
	j.recordRootsLocked(c, r)
	j.mu.Unlock()
}

// buildTree hashes one step of the images into a tree that is not built
// yet, holding wb so that nothing changes the images meanwhile. It reads
// the image files, not the journal's pending data: the tree describes the
// images as the write-back leaves them.
//
// A step is put off while a queued record touches its range. Such a
// record is where the image and the tree's journal-order view part: a
// trim or zero already applied to the image that the tree takes only
// when the write-back passes it, or a newer write for whose sake the
// write-back skipped a block of an older one that the tree took (see the
// package doc). Hashing the image there would put a later state into the
// tree before the records ahead of it, and into a barrier's roots. A
// record queued after the check cannot be passed while wb is held.
// It returns whether more steps remain.
func (j *Journal) buildTree() (bool, error) {
	if j.tree == nil {
		return false, nil
	}
	j.wb.Lock()
	defer j.wb.Unlock()
	states, _ := j.tree.State()
	disk := -1
	for i, s := range states {
		if s.Built < s.Size {
			disk = i
			break
		}
	}
	if disk < 0 {
		return j.repairTree(states)
	}
	from := states[disk].Built
	if !j.treeRangeStill(disk, from, from+treeBuildStep) {
		// Not more: the sync or write-back that clears the range kicks
		// the background again, and spinning here would not.
		return false, nil
	}
	if j.wb.treeBuf == nil {
		j.wb.treeBuf = vfs.AlignedBuffer(treeBuildStep)
	}
	done, err := j.tree.BuildStep(disk, scanReader{j.images[disk]}, treeBuildStep, j.wb.treeBuf)
	if err != nil {
		return false, err
	}
	if !done {
		return true, nil
	}
	states, _ = j.tree.State()
	for _, s := range states {
		if s.Built < s.Size {
			return true, nil
		}
	}
	j.wb.treeBuf = nil
	j.log.Info("journal: block tree built", "complete", j.treeKnown())
	return true, nil // a repair step may follow
}

// treeRangeStill says whether [from, to) of disk may be hashed from the
// image into the tree: the journal is open and no queued record touches
// the range (see buildTree). Caller holds wb.
func (j *Journal) treeRangeStill(disk int, from, to int64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.mu.closed || j.mu.failed != nil {
		return false
	}
	for i := range j.mu.queue {
		h := &j.mu.queue[i].h
		if int(h.Disk) == disk && int64(h.Offset) < to && int64(h.Offset+h.Length) > from {
			return false
		}
	}
	return true
}

// treeKnown is called when the tree may have become complete (a build or
// repair step ended): standing at a barrier, its roots are that
// barrier's. It says whether the tree has roots. Caller holds wb.
func (j *Journal) treeKnown() bool {
	r := j.tree.Roots()
	if r == nil {
		return false
	}
	j.mu.Lock()
	if j.mu.tree.atBarrier && j.mu.tree.through > 0 && j.mu.tree.roots[j.mu.tree.through] == nil {
		j.mu.tree.roots[j.mu.tree.through] = r
		j.mu.cond.Broadcast()
	}
	j.mu.Unlock()
	return true
}

// repairScan is how many leaves' digests one repair step looks at.
const repairScan = 4096

// treeRepairOff turns repairTree off, for tests that look at the Unknown
// leaves a recovery cut leaves.
var treeRepairOff atomic.Bool

// repairTree re-hashes from the images the leaves the tree holds as
// Unknown (a recovery cut's range), one step of at most treeBuildStep
// bytes, with the build's rule about queued records: the tree describes
// what the image holds, which is for the resync that the cut asked for to
// compare with the replica. A cursor (wb.repair) walks each disk; a disk
// walked whole without finding an Unknown leaf (which the tree's count
// should make impossible) is left alone until that count changes, so a
// miscount never keeps the background busy. It returns whether more
// steps remain.
func (j *Journal) repairTree(states []blocktree.DiskState) (more bool, err error) {
	if treeRepairOff.Load() {
		j.wb.treeBuf = nil
		return false, nil
	}
	c := &j.wb.repair
	if c.stuck == nil {
		c.stuck = make(map[int]int64)
	}
	defer func() {
		if !more {
			j.wb.treeBuf = nil
		}
	}()
	for range len(states) {
		d := c.disk % len(states)
		ds := states[d]
		leaves := (ds.Size + blocktree.LeafSize - 1) / blocktree.LeafSize
		if c.idle >= leaves {
			c.stuck[d] = ds.Unknown
		}
		if ds.Unknown == 0 || c.stuck[d] == ds.Unknown {
			c.disk, c.leaf, c.idle = d+1, 0, 0
			continue
		}
		if c.leaf >= leaves {
			c.leaf = 0
		}
		n := min(leaves-c.leaf, repairScan)
		ds2, err := j.tree.Leaves(d, c.leaf, n)
		if err != nil {
			return false, err
		}
		i := slices.Index(ds2, 0)
		if i < 0 {
			c.leaf += n
			c.idle += n
			return true, nil
		}
		from := (c.leaf + int64(i)) * blocktree.LeafSize
		to := min(from+treeBuildStep, ds.Size)
		if !j.treeRangeStill(d, from, to) {
			return false, nil
		}
		if j.wb.treeBuf == nil {
			j.wb.treeBuf = vfs.AlignedBuffer(treeBuildStep)
		}
		buf := j.wb.treeBuf[:to-from]
		if _, err := (scanReader{j.images[d]}).ReadAt(buf, from); err != nil {
			return false, fmt.Errorf("read disk %d: %w", d, err)
		}
		b := j.tree.Batch()
		b.Data(d, from, buf)
		if err := b.Commit(); err != nil {
			return false, err
		}
		c.leaf, c.idle = to/blocktree.LeafSize, 0
		if j.treeKnown() {
			j.log.Info("journal: block tree repaired: every block known again")
			return false, nil
		}
		return true, nil
	}
	return false, nil
}

// scanReader reads an image for the tree around the page cache where it
// can (vfs.DirectReader; the build's buffer and offsets are aligned): a
// scan of the whole disk would otherwise evict the guest's working set,
// and it left the page cache full of clean image pages that made the
// write-back's small writes several times slower (bench_test.go). An
// O_DIRECT read sees every write that returned before it.
type scanReader struct{ f vfs.File }

func (r scanReader) ReadAt(p []byte, off int64) (int, error) {
	if dr, ok := r.f.(vfs.DirectReader); ok && vfs.DirectAligned(p, off) {
		return dr.ReadDirectAt(p, off)
	}
	return r.f.ReadAt(p, off)
}

// treeStats fills the tree's part of Stats. It is called without mu: the
// tree's State waits for a Commit in progress.
func (j *Journal) treeStats(s *Stats) {
	if j.tree == nil {
		return
	}
	states, _ := j.tree.State()
	built := true
	for _, d := range states {
		s.TreeSize += d.Size
		s.TreeBuiltBytes += min(d.Built, d.Size)
		s.TreeUnknownLeaves += d.Unknown
		built = built && d.Built >= d.Size
	}
	s.TreeBuilt = built
	s.TreeComplete = j.tree.Roots() != nil
}
