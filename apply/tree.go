package apply

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// The replica's block tree: see "Block tree" in the package documentation.

const (
	treeDir = "tree" // in a VM dir: the tree's BadgerDB
	// buildBytes is what one build step hashes while it holds the apply
	// lock: small enough that a commit waits for it no more than a few
	// milliseconds.
	buildBytes = 4 << 20
	// treeFlushLeaves bounds the leaves an apply gathers before it makes
	// the images durable and commits them to the tree: a resync's pieces
	// may cover a whole disk, whose changes would not fit in memory.
	treeFlushLeaves = 16384
	// maxTreeSums bounds the entries (leaf digests or block hashes) of
	// one tree sums answer: 8 MiB.
	maxTreeSums = 1 << 20
)

// ErrUnavailable: what was asked cannot be answered now (the block tree is
// being built, or the VM keeps none); the asker goes another way.
var ErrUnavailable = errors.New("apply: unavailable")

// openTree opens the VM's block tree: a BadgerDB of its own in the VM
// directory on the real filesystem, an in-memory one (rebuilt at every
// open) on any other. A tree that cannot be opened is logged and the VM
// runs without one: it is an index, the images do not depend on it. The
// caller owns v (it is not shared yet) or holds v.apply.
func (v *vm) openTree() {
	sizes := make([]int64, len(v.disks))
	for i, d := range v.disks {
		sizes[i] = d.Size
	}
	db, t, reset, err := v.loadTree(sizes)
	if err != nil && v.onDisk() {
		// An index that cannot be read is rebuilt from the images.
		v.s.log.Warn("block tree cannot be opened: it starts afresh", "vm", v.name, "err", err)
		if err = removeAll(v.s.fs, v.treePath()); err == nil {
			db, t, reset, err = v.loadTree(sizes)
		}
	}
	if err != nil {
		v.s.log.Error("block tree cannot be opened: the VM runs without one (no tree sums, no root check)", "vm", v.name, "err", err)
		return
	}
	v.tree, v.tdb = t, db
	if reset && v.onDisk() {
		v.s.log.Info("block tree reset: it is rebuilt from the images", "vm", v.name)
	}
	if v.snapshot().Failover != nil {
		// The images follow the failover (a revert, the failed-over VM's
		// writes, a rollback that snapshot.Open may just have finished):
		// the tree knows nothing of them until the failover is cancelled.
		if err := v.resetTree(nil); err != nil {
			v.s.log.Error("block tree", "vm", v.name, "err", err)
		}
		return
	}
	v.kickBuild()
}

func (v *vm) loadTree(sizes []int64) (*badger.DB, *blocktree.Tree, bool, error) {
	opts := blocktree.Options("").WithInMemory(true)
	if v.onDisk() {
		opts = blocktree.Options(v.treePath())
	}
	db, err := badger.Open(opts)
	if err != nil {
		return nil, nil, false, err
	}
	t, reset, err := blocktree.Open(db, nil, sizes)
	if err != nil {
		db.Close()
		return nil, nil, false, err
	}
	return db, t, reset, nil
}

func (v *vm) onDisk() bool {
	_, ok := v.s.fs.(vfs.OS)
	return ok
}

func (v *vm) treePath() string { return join(v.dir, treeDir) }

// close stops the background work of a VM that is going away and closes
// its tree. The caller holds v.apply.
func (v *vm) close() {
	v.mu.Lock()
	v.removed = true
	v.mu.Unlock()
	v.closeTree()
}

// closeTree closes the tree. The caller holds v.apply or owns v.
func (v *vm) closeTree() {
	if v.tdb != nil {
		if err := v.tdb.Close(); err != nil {
			v.s.log.Warn("close block tree", "vm", v.name, "err", err)
		}
	}
	v.tree, v.tdb = nil, nil
}

// dropTree gives up the tree after an error of its own: it is closed and
// its directory removed, so that no later open trusts what it claims. If
// the removal fails the images must not change (treeBegin tries again).
// The caller holds v.apply.
func (v *vm) dropTree(cause error) error {
	v.s.log.Error("block tree failed: dropped, the VM runs without one until the daemon restarts", "vm", v.name, "err", cause)
	v.closeTree()
	if !v.onDisk() {
		return nil
	}
	v.treeStale = true
	if err := removeAll(v.s.fs, v.treePath()); err != nil {
		return fmt.Errorf("apply: replica VM %q: remove its failed block tree: %w (after %w)", v.name, err, cause)
	}
	v.treeStale = false
	return nil
}

// resetTree makes the tree forget disks (nil: all of them), so that it
// claims nothing about images changed behind it, and starts the build.
// The caller holds v.apply.
func (v *vm) resetTree(disks []int) error {
	t := v.tree
	if t == nil {
		return nil
	}
	if disks == nil {
		for i := range v.disks {
			disks = append(disks, i)
		}
	}
	for _, d := range disks {
		if err := t.Reset(d); err != nil {
			return v.dropTree(err)
		}
	}
	// An empty commit cleans a tree left dirty by an apply that failed:
	// every disk that apply touched was just reset.
	if err := t.Batch().Commit(); err != nil {
		return v.dropTree(err)
	}
	if err := t.Sync(); err != nil {
		return v.dropTree(err)
	}
	v.kickBuild()
	return nil
}

// kickBuild starts the build of the tree in the background unless it
// runs. The builder owns nothing but its own image files: each step takes
// v.apply, so it reads images that no apply changes meanwhile.
func (v *vm) kickBuild() {
	s := v.s
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.building {
		return
	}
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.bg.Add(1)
	}
	s.mu.Unlock()
	if closed {
		return
	}
	v.building = true
	go v.build()
}

// kickBuildIfNeeded starts the build if some disk is not built: after a
// build stopped on an error, the next apply tries again. The caller holds
// v.apply.
func (v *vm) kickBuildIfNeeded() {
	if v.tree == nil {
		return
	}
	ds, _ := v.tree.State()
	if slices.ContainsFunc(ds, func(d blocktree.DiskState) bool { return d.Built < d.Size }) {
		v.kickBuild()
	}
}

// build hashes the images into the tree until every disk is built, the
// VM is closed, removed or failed over, or an error stops it (the next
// apply starts it again).
func (v *vm) build() {
	defer v.s.bg.Done()
	var imgs []vfs.File
	defer func() { closeImages(imgs) }()
	buf := make([]byte, buildBytes)
	start, steps := time.Now(), 0
	for {
		select {
		case <-v.s.stop:
			v.mu.Lock()
			v.building = false
			v.mu.Unlock()
			return
		default:
		}
		v.apply.Lock()
		st, err := v.buildStep(&imgs, buf)
		if st != buildMore {
			// Still under v.apply: a reset after this kicks a new builder.
			v.mu.Lock()
			v.building = false
			v.mu.Unlock()
		}
		v.apply.Unlock()
		switch {
		case err != nil:
			v.s.log.Warn("block tree build stopped; the next apply starts it again", "vm", v.name, "err", err)
			return
		case st == buildDone && steps > 0:
			v.s.log.Info("block tree built", "vm", v.name, "took", time.Since(start).Round(time.Millisecond))
			return
		case st != buildMore:
			return
		}
		steps++
	}
}

type buildState int

const (
	buildMore    buildState = iota // a step was taken
	buildDone                      // every disk is built
	buildStopped                   // no tree, or the VM was removed or failed over
)

// buildStep hashes the next part of the first disk not built. The caller
// holds v.apply.
func (v *vm) buildStep(imgs *[]vfs.File, buf []byte) (buildState, error) {
	t := v.tree
	v.mu.Lock()
	stop := v.removed || v.st.Failover != nil
	v.mu.Unlock()
	if t == nil || stop {
		return buildStopped, nil
	}
	ds, _ := t.State()
	disk := slices.IndexFunc(ds, func(d blocktree.DiskState) bool { return d.Built < d.Size })
	if disk < 0 {
		v.checkPending()
		return buildDone, nil
	}
	if *imgs == nil {
		files, err := v.openImages(os.O_RDONLY)
		if err != nil {
			return buildStopped, err
		}
		*imgs = files
	}
	if _, err := t.BuildStep(disk, (*imgs)[disk], buildBytes, buf); err != nil {
		return buildStopped, err
	}
	return buildMore, nil
}

// treeReady says whether the tree can answer for disk: built and clean.
// The caller holds v.apply.
func (v *vm) treeReady(disk int) error {
	if v.tree == nil {
		return fmt.Errorf("%w: replica VM %q keeps no block tree", ErrUnavailable, v.name)
	}
	ds, dirty := v.tree.State()
	switch {
	case v.snapshot().Failover != nil:
		return fmt.Errorf("%w: replica VM %q is failed over: its images follow the failover, not the tree", ErrUnavailable, v.name)
	case dirty:
		return fmt.Errorf("%w: the block tree of replica VM %q is being updated", ErrUnavailable, v.name)
	case ds[disk].Built < ds[disk].Size:
		return fmt.Errorf("%w: the block tree of disk %q of replica VM %q is being built (%d of %d bytes)", ErrUnavailable, v.disks[disk].Name, v.name, ds[disk].Built, ds[disk].Size)
	}
	return nil
}

// treeSums answers a SumsRequest with a Kind from the tree, without
// reading the images: 8 bytes, little endian, per leaf digest or block
// hash of the range. The range starts at a multiple of the kind's unit and
// ends at most at the disk's end rounded up to one.
func (v *vm) treeSums(req wire.SumsRequest) (sums []byte, at uint64, err error) {
	var unit int64
	switch req.Kind {
	case wire.SumsLeaves:
		unit = blocktree.LeafSize
	case wire.SumsBlocks:
		unit = blocktree.BlockSize
	default:
		return nil, 0, fmt.Errorf("%w: sums kind %q: want %q or %q", ErrInvalid, req.Kind, wire.SumsLeaves, wire.SumsBlocks)
	}
	if req.Disk < 0 || req.Disk >= len(v.disks) {
		return nil, 0, fmt.Errorf("%w: disk %d: the VM has %d", ErrInvalid, req.Disk, len(v.disks))
	}
	size := v.disks[req.Disk].Size
	limit := (size + unit - 1) / unit * unit
	if req.Offset < 0 || req.Offset%unit != 0 || req.Length <= 0 || req.Length > maxTreeSums*unit || req.Offset > limit-req.Length {
		return nil, 0, fmt.Errorf("%w: %s range [%d, +%d) of disk %q (%d bytes): want an offset that is a multiple of %d, and at most %d %s ending by %d",
			ErrInvalid, req.Kind, req.Offset, req.Length, v.disks[req.Disk].Name, size, unit, maxTreeSums, req.Kind, limit)
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.finishIntent(true); err != nil {
		return nil, 0, err
	}
	if err := v.treeReady(req.Disk); err != nil {
		return nil, 0, err
	}
	at = imagesAt(v.snapshot())
	n := (req.Length + unit - 1) / unit
	out := make([]byte, 0, n*8)
	if req.Kind == wire.SumsLeaves {
		ds, err := v.tree.Leaves(req.Disk, req.Offset/unit, n)
		if err != nil {
			return nil, 0, fmt.Errorf("apply: replica VM %q: %w", v.name, err)
		}
		for _, d := range ds {
			out = binary.LittleEndian.AppendUint64(out, d)
		}
		return out, at, nil
	}
	hs, err := v.tree.Blocks(req.Disk, req.Offset, req.Length)
	if err != nil {
		return nil, 0, fmt.Errorf("apply: replica VM %q: %w", v.name, err)
	}
	for _, h := range hs {
		out = binary.LittleEndian.AppendUint64(out, uint64(h))
	}
	return out, at, nil
}

// A treeWriter keeps the tree through one apply (applyFiles): the tree is
// marked dirty, durably, before the first image write; every frame goes
// into a batch as it is written; blocks a frame covers only in part are
// hashed from the image once the frames are written (so the tree does not
// go Unknown on unaligned writes); and the batch is committed and synced
// once the images are. A batch grown past treeFlushLeaves is committed
// midway, after the images are synced, and the tree marked dirty again
// before the next write. So whatever a crash leaves, a clean tree describes
// synced images, and a dirty one is reset at open. A nil treeWriter (no
// tree) does nothing.
type treeWriter struct {
	v       *vm
	t       *blocktree.Tree
	b       *blocktree.Batch
	touched []bool
	partial map[blockRef]struct{}
}

type blockRef struct {
	disk  int
	block int64
}

// treeBegin marks the tree dirty before an apply changes the images. The
// caller holds v.apply.
func (v *vm) treeBegin() (*treeWriter, error) {
	if v.tree == nil {
		if v.treeStale {
			// A dropped tree whose directory is still there may claim
			// what the images are about to stop holding.
			if err := removeAll(v.s.fs, v.treePath()); err != nil {
				return nil, fmt.Errorf("apply: replica VM %q: remove its failed block tree: %w", v.name, err)
			}
			v.treeStale = false
		}
		return nil, nil
	}
	if err := v.tree.Begin(); err != nil {
		return nil, v.dropTree(err)
	}
	return &treeWriter{v: v, t: v.tree, b: v.tree.Batch(), touched: make([]bool, len(v.disks)), partial: map[blockRef]struct{}{}}, nil
}

// note records a frame about to be written.
func (tw *treeWriter) note(fr wire.Frame) {
	if tw == nil || tw.t == nil {
		return
	}
	n := fr.Length
	switch fr.Type {
	case wire.FrameData:
		n = int64(len(fr.Data))
		tw.b.Data(fr.Disk, fr.Offset, fr.Data)
	case wire.FrameTrim, wire.FrameZero, wire.FrameZeroAlloc:
		tw.b.Zero(fr.Disk, fr.Offset, n)
	default:
		return
	}
	tw.touched[fr.Disk] = true
	size := tw.v.disks[fr.Disk].Size
	if n > 0 && fr.Offset%blocktree.BlockSize != 0 {
		tw.partial[blockRef{fr.Disk, fr.Offset / blocktree.BlockSize}] = struct{}{}
	}
	if end := fr.Offset + n; n > 0 && end%blocktree.BlockSize != 0 && end < size {
		tw.partial[blockRef{fr.Disk, end / blocktree.BlockSize}] = struct{}{}
	}
}

// hashPartial hashes, from the images, the blocks frames covered in part.
// The frames must be written (the gather flushed).
func (tw *treeWriter) hashPartial(imgs []vfs.File) error {
	if tw == nil || tw.t == nil || len(tw.partial) == 0 {
		return nil
	}
	buf := make([]byte, blocktree.BlockSize)
	for r := range tw.partial {
		off := r.block * blocktree.BlockSize
		n := min(blocktree.BlockSize, tw.v.disks[r.disk].Size-off)
		if n <= 0 {
			continue
		}
		if m, err := imgs[r.disk].ReadAt(buf[:n], off); err != nil && !(errors.Is(err, io.EOF) && int64(m) == n) {
			return fmt.Errorf("apply: read image %s at %d: %w", imgs[r.disk].Name(), off, err)
		}
		tw.b.Set(r.disk, off, []blocktree.Hash{blocktree.HashBlock(buf[:n])})
	}
	clear(tw.partial)
	return nil
}

// flushIfLarge commits a batch grown past treeFlushLeaves: the frames
// written, the images synced, the batch committed, the tree marked dirty
// again.
func (tw *treeWriter) flushIfLarge(g *gather, imgs []vfs.File) error {
	if tw == nil || tw.t == nil || tw.b.Len() < treeFlushLeaves {
		return nil
	}
	if err := g.flush(); err != nil {
		return err
	}
	if err := tw.hashPartial(imgs); err != nil {
		return err
	}
	for _, f := range imgs {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("apply: sync image %s: %w", f.Name(), err)
		}
	}
	if err := tw.b.Commit(); err != nil {
		return tw.lost(err)
	}
	if err := tw.t.Begin(); err != nil {
		return tw.lost(err)
	}
	tw.b = tw.t.Batch()
	return nil
}

// finish commits what the apply wrote and makes it durable; the images are
// synced.
func (tw *treeWriter) finish() error {
	if tw == nil || tw.t == nil {
		return nil
	}
	if err := tw.b.Commit(); err != nil {
		return tw.lost(err)
	}
	if err := tw.t.Sync(); err != nil {
		return tw.lost(err)
	}
	return nil
}

// fail undoes what a failed apply may have left the tree claiming: the
// disks it touched are reset (and rebuilt).
func (tw *treeWriter) fail() {
	if tw == nil || tw.t == nil {
		return
	}
	var disks []int
	for i, t := range tw.touched {
		if t {
			disks = append(disks, i)
		}
	}
	if err := tw.v.resetTree(disks); err != nil {
		tw.v.s.log.Error("block tree after a failed apply", "vm", tw.v.name, "err", err)
	}
}

func (tw *treeWriter) lost(err error) error {
	tw.t = nil
	return tw.v.dropTree(err)
}

// checkPending checks the roots of the cycle the images are at, once the
// tree is built, if its apply could not. The caller holds v.apply.
func (v *vm) checkPending() {
	h := v.pendingCheck
	if h == nil {
		return
	}
	v.pendingCheck = nil
	if imagesAt(v.snapshot()) != h.Cycle {
		return // they moved on (and that apply cleared the check), or left the primary's line
	}
	diverged, ok := v.checkRoots(*h)
	if !ok {
		return
	}
	now := v.s.now().UTC()
	err := v.update(func(st *replicaState) error {
		noteRoots(st, h.Cycle, diverged, now)
		return nil
	})
	if err != nil {
		v.s.log.Warn("record the root check of a cycle", "vm", v.name, "cycle", h.Cycle, "err", err)
		return
	}
	v.reportRoots(h.Cycle, diverged)
}

// reportRoots logs and reports a root check recorded in replica.json.
func (v *vm) reportRoots(cycle uint64, diverged []string) {
	if len(diverged) > 0 {
		v.s.log.Error("replica diverged: its block-tree roots after the cycle differ from the primary's at its barrier; the primary must resync",
			"vm", v.name, "cycle", cycle, "disks", diverged)
		if f := v.s.ev.Diverged; f != nil {
			f(v.name, cycle, diverged)
		}
		return
	}
	if f := v.s.ev.Verified; f != nil {
		f(v.name, cycle)
	}
}

// checkRoots compares the tree's roots, after a cycle was applied and
// committed, with the primary's at its barrier (the stream header's
// Roots). ok is false when there is nothing to compare: the header has no
// roots, or the tree does not know its own (being built). diverged names
// the disks whose roots differ. The caller holds v.apply.
func (v *vm) checkRoots(h wire.Header) (diverged []string, ok bool) {
	if len(h.Roots) == 0 || v.tree == nil {
		return nil, false
	}
	mine := v.tree.Roots()
	if mine == nil {
		return nil, false
	}
	if len(h.Roots) != len(mine) {
		v.s.log.Warn("cycle header carries roots for another number of disks: not checked", "vm", v.name, "cycle", h.Cycle, "roots", len(h.Roots), "disks", len(mine))
		return nil, false
	}
	for i, s := range h.Roots {
		r, err := blocktree.ParseRoot(s)
		if err != nil {
			v.s.log.Warn("cycle header carries a root that does not parse: not checked", "vm", v.name, "cycle", h.Cycle, "err", err)
			return nil, false
		}
		if r != mine[i] {
			diverged = append(diverged, v.disks[i].Name)
		}
	}
	return diverged, true
}
