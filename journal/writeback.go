package journal

import (
	"fmt"
	"path"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// background syncs the journal when clients do not, writes synced records back
// to the images, checkpoints, and switches to dirty tracking past the cap.
func (j *Journal) background() {
	defer j.wg.Done()
	tick := min(j.cfg.SyncInterval, j.cfg.CheckpointInterval) / 2
	t := time.NewTicker(max(tick, time.Millisecond))
	defer t.Stop()
	lastCkpt := j.cfg.Now()
	for {
		select {
		case <-j.stop:
			return
		case <-j.kick:
		case <-t.C:
		}
		if err := j.backgroundStep(&lastCkpt); err != nil {
			j.mu.Lock()
			j.failLocked(err)
			j.mu.Unlock()
		}
	}
}

// stepBytes bounds the write-back of one background step, so that a stream
// that never lets the queue run dry still gets its checkpoints (which free
// journal segments) and its switch to dirty tracking.
const stepBytes = 256 << 20

func (j *Journal) backgroundStep(lastCkpt *time.Time) error {
	now := j.cfg.Now()
	j.mu.Lock()
	if j.mu.failed != nil {
		j.mu.Unlock()
		return nil
	}
	cut := j.mu.cutting && j.mu.dirty == nil
	reason := j.mu.cutReason
	if reason == "" {
		reason = fmt.Sprintf("journal passed its cap of %d bytes", j.cfg.Cap)
	}
	j.mu.Unlock()
	more := true
	for done := int64(0); more && done < stepBytes; {
		n, m, err := j.writeBackBatch()
		if err != nil {
			return err
		}
		done += n
		more = m
	}
	if cut {
		if err := j.enterDirty(reason); err != nil {
			return err
		}
	}
	// One build step per background step, whatever the write-back has
	// left: a stream that keeps it busy does not stop the build, and the
	// build never holds it up for more than a step.
	building, err := j.buildTree()
	if err != nil {
		return fmt.Errorf("build block tree: %w", err)
	}
	more = more || building
	j.mu.Lock()
	due := now.Sub(*lastCkpt) >= j.cfg.CheckpointInterval || j.mu.applied-j.mu.ckpt.Applied >= checkpointBytes
	j.mu.Unlock()
	if due && j.ckptBusy.CompareAndSwap(false, true) {
		// The checkpoint's fsync of the images can take seconds: it runs
		// beside the syncs and the write-back, not in their way.
		*lastCkpt = now
		j.wg.Add(1)
		go func() {
			defer j.wg.Done()
			defer j.ckptBusy.Store(false)
			if err := j.checkpoint(false); err != nil {
				j.mu.Lock()
				j.failLocked(err)
				j.mu.Unlock()
			}
		}()
	}
	if more {
		j.kickWriteBack()
	}
	return nil
}

// syncIfDue syncs the journal when the sync interval is up, syncEarly bytes
// are unsynced or appends wait for the write-back (waitRetainLocked). It is
// false if the sync failed (the journal is failed).
func (j *Journal) syncIfDue() bool {
	now := j.cfg.Now()
	j.mu.Lock()
	due := j.mu.failed == nil && j.mu.head > j.mu.synced &&
		(now.Sub(j.mu.lastSync) >= j.cfg.SyncInterval || j.mu.head-j.mu.synced >= syncEarly || j.mu.retainWaiters > 0)
	j.mu.Unlock()
	return !due || j.syncTo(j.headLSN()) == nil
}

// writeBack copies every synced record to the images, oldest first. A block
// that a newer record has rewritten is skipped: that record will carry it.
func (j *Journal) writeBack() error {
	for {
		_, more, err := j.writeBackBatch()
		if err != nil || !more {
			return err
		}
	}
}

// Bounds of one write-back batch.
const (
	batchRecords = 1024
	batchBytes   = 32 << 20
)

// writeBackBatch writes back the oldest synced records, up to batchRecords
// and batchBytes of journal. It returns the journal bytes it covered and
// more, false when no record was ready.
//
// It first syncs the journal if a sync is due: a long write-back (a backlog
// of small random writes) must not hold the sync back, or every append after
// it waits unsynced, its buffer past the retainMax budget, and is later read
// back from the journal.
func (j *Journal) writeBackBatch() (int64, bool, error) {
	j.wb.Lock()
	defer j.wb.Unlock()
	if !j.syncIfDue() {
		return 0, false, j.failedErr()
	}
	j.mu.Lock()
	n, size := 0, int64(0)
	for n < len(j.mu.queue) && n < batchRecords && size < batchBytes {
		q := &j.mu.queue[n]
		if q.h.LSN+uint64(q.h.Size()) > j.mu.synced || (q.eager && !q.applied) {
			break
		}
		// A batch never mixes two cycles: the tree's roots at a barrier
		// are taken between batches (barrierRoots).
		if q.h.Cycle != j.mu.queue[0].h.Cycle {
			break
		}
		size += q.h.Size()
		n++
	}
	batch := append([]queued(nil), j.mu.queue[:n]...)
	if n == 0 {
		if len(j.mu.queue) == 0 && j.mu.synced > j.mu.applied {
			j.mu.applied = j.mu.synced
		}
		c := j.mu.tree.sealed
		if len(j.mu.queue) > 0 {
			c = min(c, j.mu.queue[0].h.Cycle-1)
		}
		j.mu.Unlock()
		j.barrierRoots(c)
		return 0, false, nil
	}
	j.mu.Unlock()
	// The batch's records are synced, so the seals before them are: every
	// cycle before this one is closed and already in the tree.
	j.barrierRoots(batch[0].h.Cycle - 1)
	tb := newTreeBatch(j.tree)
	for i := 0; i < len(batch); {
		h := &batch[i].h
		var err error
		k := 1
		switch {
		case h.Kind == KindWrite:
			var order []int
			if k, order = j.directRun(batch[i:]); k > 1 {
				k, err = j.writeBackRun(batch[i:i+k], order, tb)
			} else {
				err = j.writeBackRecord(&batch[i], tb)
			}
		default:
			// A trim or zero reaches the tree here, in journal order,
			// even when its caller applied it to the image earlier.
			if !batch[i].eager {
				err = j.applyRange(h)
			}
			if err == nil {
				err = tb.zero(int(h.Disk), int64(h.Offset), int64(h.Length))
			}
		}
		if err != nil {
			return 0, false, fmt.Errorf("write back LSN %#x: %w", h.LSN, err)
		}
		i += k
	}
	// The tree takes the batch after its image writes returned and before
	// applied passes them: a checkpoint that covers them syncs it too.
	if err := tb.commit(); err != nil {
		return 0, false, fmt.Errorf("write back: block tree: %w", err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.mu.tree.atBarrier = false
	for i := range batch {
		j.releaseKeptLocked(batch[i].buf)
	}
	clear(j.mu.queue[:n])
	j.mu.queue = j.mu.queue[n:]
	last := batch[n-1].h
	j.mu.applied = max(j.mu.applied, last.LSN+uint64(last.Size()))
	return size, true, nil
}

// releaseKeptLocked gives back an append buffer kept for the write-back
// (nil: none was kept). Called with mu held.
func (j *Journal) releaseKeptLocked(b []byte) {
	if b == nil {
		return
	}
	j.mu.retained -= cap(b)
	putAligned(b)
	j.mu.cond.Broadcast() // appends waiting for retainMax room
}

// writeBackRecord writes the blocks of a write record that are still the
// newest copy to the image, from q.buf (the buffer of its direct append)
// if not nil, else read back from the journal, and adds the hashes of all
// its blocks (q.hashes, taken at append) to tb: see the package doc,
// "Block tree", for why the blocks it skips are in the tree too.
func (j *Journal) writeBackRecord(q *queued, tb *treeBatch) error {
	h, retained := &q.h, q.buf
	disk := int(h.Disk)
	first := h.Offset / BlockSize
	nblk := h.Length / BlockSize
	data := func(i uint64) uint64 { return h.LSN + HeaderSize + i*BlockSize }
	type run struct{ from, to uint64 }
	var runs []run
	j.mu.Lock()
	for i := uint64(0); i < nblk; i++ {
		// A block rewritten by a newer record is skipped only if that
		// record is durable: it will be written back or replayed. If it
		// is not, a crash loses it, and this (synced, maybe flushed) copy
		// must be in the image before the checkpoint passes this record.
		if p := j.mu.pending[blockKey(disk, first+i)]; p != data(i) && (p == 0 || p < j.mu.synced) {
			continue
		}
		if k := len(runs) - 1; k >= 0 && runs[k].to == i {
			runs[k].to++
		} else {
			runs = append(runs, run{i, i + 1})
		}
	}
	j.mu.Unlock()
	// Without the append buffer the data is read back from the journal:
	// the whole payload, so that its checksum is verified before any of it
	// reaches the image (a damaged payload fails the journal instead).
	dw, canDirect := j.images[disk].(vfs.DirectWriter)
	payload := retained
	if payload != nil {
		payload = payload[vfs.DirectAlign : vfs.DirectAlign+int(h.Length)]
	} else {
		var err error
		if payload, err = j.readPayload(h, canDirect && h.Length >= directMin); err != nil {
			return err
		}
		if !canDirect || h.Length < directMin {
			defer j.putBuf(payload)
		}
	}
	for _, r := range runs {
		n := int((r.to - r.from) * BlockSize)
		off := int64((first + r.from) * BlockSize)
		// Large runs go around the page cache: on a sequential stream the
		// second copy into fresh page-cache pages is what costs most CPU.
		// Small ones stay buffered, where the kernel batches them.
		direct := canDirect && n >= directMin
		from := int(r.from * BlockSize)
		buf := payload[from : from+n]
		var err error
		if direct {
			_, err = dw.WriteDirectAt(buf, off)
		} else {
			_, err = j.images[disk].WriteAt(buf, off)
		}
		if err != nil {
			return err
		}
		j.mu.Lock()
		for i := r.from; i < r.to; i++ {
			key := blockKey(disk, first+i)
			if j.mu.pending[key] == data(i) {
				delete(j.mu.pending, key)
				j.npending.Add(-1)
			}
		}
		j.mu.Unlock()
	}
	if j.tree == nil {
		return nil
	}
	return tb.set(disk, int64(h.Offset), recordHashes(q, payload))
}

// directMin is the smallest write-back run written with O_DIRECT.
const directMin = 256 << 10

// readPayload reads the payload of write record h back from the journal and
// verifies it against the header's CRC32C: into the write-back's aligned
// buffer if aligned (the caller holds wb), else into a pooled buffer the
// caller gives back with putBuf. A mismatch is a *DamageError.
func (j *Journal) readPayload(h *Header, aligned bool) ([]byte, error) {
	var buf []byte
	var err error
	j.segMu.RLock()
	if aligned {
		buf = j.alignedBuf(int(h.Length))
		err = j.readJournalDirect(buf, h.LSN+HeaderSize)
	} else {
		buf = j.getBuf(int(h.Length))
		err = j.readJournal(buf, h.LSN+HeaderSize)
	}
	j.segMu.RUnlock()
	if err == nil {
		err = j.checkWritePayload(h, buf)
	}
	if err != nil {
		if !aligned {
			j.putBuf(buf)
		}
		return nil, err
	}
	return buf, nil
}

// checkWritePayload is checkPayload of a write record read back from the
// journal, failing with a *DamageError.
func (j *Journal) checkWritePayload(h *Header, p []byte) error {
	if got := crc(p); got != h.DCRC {
		return j.damage(refOf(h), int(h.Disk), int64(h.Offset), fmt.Sprintf("payload checksum %#x, want %#x", got, h.DCRC))
	}
	return nil
}

// alignedBuf returns a DirectAlign-aligned buffer of n bytes, reused by the
// single write-back goroutine.
func (j *Journal) alignedBuf(n int) []byte {
	if cap(j.wb.buf) < n {
		j.wb.buf = vfs.AlignedBuffer(max(n, 1<<20))
	}
	return j.wb.buf[:n]
}

// retainFromLocked is the oldest LSN an unreleased cycle still needs.
func (j *Journal) retainFromLocked() uint64 {
	if !j.mu.retain || j.mu.dirty != nil {
		return j.mu.head
	}
	if len(j.mu.closedC) > 0 {
		return j.mu.closedC[0].Start
	}
	return j.mu.cycleStart
}

// checkpoint syncs the images and records how far they are applied; then the
// segments nobody needs any more are removed.
//
// It does not stop the write-back: applied only passes a record once its
// image writes returned, so the fsync that follows covers everything below
// the Applied it records, whatever the write-back adds meanwhile. (Holding
// the write-back through an fsync of images full of dirty pages stalled it
// for seconds, and the journal behind it.)
func (j *Journal) checkpoint(force bool) error {
	j.ckptMu.Lock()
	defer j.ckptMu.Unlock()
	j.mu.Lock()
	ck := checkpoint{Applied: j.mu.applied, Head: j.mu.head, Released: j.mu.released, Cycle: j.mu.cycle}
	j.mu.Unlock()
	if !force && ck == j.mu.ckpt {
		return nil
	}
	for i, f := range j.images {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync disk %s: %w", j.cfg.Disks[i].Name, err)
		}
	}
	// The tree holds every record below ck.Applied (the write-back commits
	// before applied passes a record); durable before the checkpoint says
	// replay may start there.
	if j.tree != nil {
		if err := j.tree.Sync(); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	if err := j.writeDirtyMap(); err != nil {
		return err
	}
	if err := vfs.WriteFileAtomic(j.fs, path.Join(j.cfg.Dir, checkpointFile), ck.encode(), 0o600); err != nil {
		return fmt.Errorf("write checkpoint: %w", err)
	}
	j.mu.Lock()
	j.mu.ckpt = ck
	keep := min(ck.Applied, j.retainFromLocked())
	j.mu.Unlock()
	return j.removeSegments(keep)
}

// removeSegments deletes segments whose every record lies below keep. The
// active segment always stays.
func (j *Journal) removeSegments(keep uint64) error {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	j.mu.Lock()
	var gone []*segment
	for len(j.mu.segs) > 1 && j.mu.segs[1].base <= keep {
		gone = append(gone, j.mu.segs[0])
		j.mu.segs = j.mu.segs[1:]
	}
	j.mu.Unlock()
	for _, s := range gone {
		s.f.Close()
		j.mu.Lock()
		recycle := len(j.mu.free) < maxFree
		j.mu.freeSeq++
		free := path.Join(j.cfg.Dir, fmt.Sprintf("%s%d", freePrefix, j.mu.freeSeq))
		j.mu.Unlock()
		if recycle {
			if err := j.fs.Rename(s.name, free); err != nil {
				return fmt.Errorf("recycle %s: %w", s.name, err)
			}
			j.mu.Lock()
			j.mu.free = append(j.mu.free, free)
			j.mu.Unlock()
			continue
		}
		if err := j.fs.Remove(s.name); err != nil {
			return fmt.Errorf("remove %s: %w", s.name, err)
		}
	}
	if len(gone) > 0 {
		return j.fs.SyncDir(j.cfg.Dir)
	}
	return nil
}

// checkCapLocked asks for the switch to dirty tracking once the journal kept
// for unshipped cycles passes its cap. Called with mu held on every write.
func (j *Journal) checkCapLocked() {
	if j.mu.cutting || j.mu.dirty != nil || !j.mu.retain {
		return
	}
	if j.mu.head-j.retainFromLocked() > uint64(j.cfg.Cap) {
		j.mu.cutting = true
		j.kickWriteBack()
	}
}

// enterDirty replaces every unreleased cycle by a dirty-block map and marks
// the VM "resync required". The map is durable before any cycle is dropped,
// and writes keep flowing throughout.
func (j *Journal) enterDirty(reason string) error {
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	dm := newDirtyMap(j.diskSizes())
	mark := func(e Extent) {
		dm.setRange(e.Disk, e.Offset, e.Length)
	}
	j.mu.Lock()
	closed := append([]CycleInfo(nil), j.mu.closedC...)
	j.mu.Unlock()
	for _, c := range closed {
		if err := j.cycles.extents(c.Cycle, func(e Extent) error { mark(e); return nil }); err != nil {
			return err
		}
	}
	j.mu.Lock()
	for _, ci := range j.mu.open {
		for k := range ci.blocks {
			dm.set(int(k>>48), k&(1<<48-1))
		}
		for _, r := range ci.ranges {
			mark(r)
		}
	}
	dm.lsn = j.mu.head
	dm.released = j.mu.cycle - 1
	j.mu.dirty = dm
	resyncing := j.mu.resyncBase != 0
	j.mu.resyncBase = 0 // a resync under way starts again
	j.mu.open = make(map[uint64]*cycleIndex)
	j.mu.closedC = nil
	j.mu.released = max(j.mu.released, j.mu.cycle-1)
	j.mu.cutting, j.mu.cutReason = false, ""
	j.mu.resyncReason = reason
	nDirty := dm.count() // writes mark the map under mu from now on
	j.mu.Unlock()
	if err := j.writeDirtyMap(); err != nil {
		return err
	}
	if resyncing {
		if err := j.removeState(resyncFile); err != nil {
			return fmt.Errorf("remove resync marker: %w", err)
		}
	}
	for _, c := range closed {
		if err := j.cycles.drop(c.Cycle); err != nil {
			return err
		}
	}
	j.log.Warn("resync required", "reason", reason, "dirty_blocks", nDirty)
	return nil
}

// writeDirtyMap writes the dirty map as it is now, if there is one. Every
// write or removal of the file happens under dirtyMu with the map read
// inside it, so a slow writer never puts back an older map (or one that a
// resync has since removed).
func (j *Journal) writeDirtyMap() error {
	j.dirtyMu.Lock()
	defer j.dirtyMu.Unlock()
	j.mu.Lock()
	var b []byte
	if j.mu.dirty != nil {
		j.mu.dirty.released = j.mu.released
		b = j.mu.dirty.encode()
	}
	j.mu.Unlock()
	if b == nil {
		return nil
	}
	if err := vfs.WriteFileAtomic(j.fs, path.Join(j.cfg.Dir, dirtyFile), b, 0o600); err != nil {
		return fmt.Errorf("write dirty map: %w", err)
	}
	return nil
}

// removeDirtyMap removes the dirty map file; see writeDirtyMap.
func (j *Journal) removeDirtyMap() error {
	j.dirtyMu.Lock()
	defer j.dirtyMu.Unlock()
	return j.removeState(dirtyFile)
}

// Stats is a snapshot of the journal's state for status and metrics.
type Stats struct {
	Head          uint64 `json:"head_lsn"`
	Synced        uint64 `json:"synced_lsn"`
	Applied       uint64 `json:"applied_lsn"`
	Checkpointed  uint64 `json:"checkpoint_lsn"`
	OpenCycle     uint64 `json:"open_cycle"`
	ClosedCycles  int    `json:"closed_cycles"`
	Released      uint64 `json:"released_cycle"`
	Segments      int    `json:"segments"`
	JournalBytes  int64  `json:"journal_bytes"`  // on disk
	RetainedBytes int64  `json:"retained_bytes"` // needed by unshipped cycles, the open one included
	// OpenBytes is what guests wrote into the open cycle so far (as a
	// seal's CycleInfo.Bytes counts it, trims and zeroes not included);
	// OpenChanged is true when the open cycle will ship something: it is
	// kept for shipping and holds a write, a trim or a zero.
	OpenBytes     int64 `json:"open_cycle_bytes"`
	OpenChanged   bool  `json:"open_cycle_changed"`
	Cap           int64 `json:"cap_bytes"`
	PendingBlocks int64 `json:"pending_blocks"` // newer in journal than image
	// ResyncRequired: the journal passed its cap (or cannot prove the replica
	// is complete); DirtyBlocks need a resync.
	ResyncRequired bool  `json:"resync_required"`
	DirtyBlocks    int64 `json:"dirty_blocks"`
	// ResyncReason says why, when the journal knows: "" after a restart
	// that found the dirty map alone.
	ResyncReason string `json:"resync_reason,omitempty"`
	// ResyncBase is non-zero while a resync or initial copy that began at
	// this barrier cycle is under way (BeginResync until EndResync).
	ResyncBase uint64 `json:"resync_base,omitempty"`
	Failed     string `json:"failed,omitempty"`
	// The block tree (tree.go): TreeBuilt once every disk was hashed
	// (TreeBuiltBytes of TreeSize so far); TreeComplete when it also
	// knows every block, so that it has roots; TreeUnknownLeaves counts
	// the leaves holding a block it cannot vouch for (a recovery cut).
	// TreeRootsThrough is the newest barrier the tree has passed.
	TreeBuilt         bool   `json:"tree_built"`
	TreeComplete      bool   `json:"tree_complete"`
	TreeBuiltBytes    int64  `json:"tree_built_bytes"`
	TreeSize          int64  `json:"tree_size_bytes"`
	TreeUnknownLeaves int64  `json:"tree_unknown_leaves"`
	TreeRootsThrough  uint64 `json:"tree_roots_through"`
}

// Stats returns a snapshot of the journal's state.
func (j *Journal) Stats() Stats {
	var s Stats
	j.treeStats(&s)
	j.mu.Lock()
	defer j.mu.Unlock()
	s = Stats{
		Head: j.mu.head, Synced: j.mu.synced, Applied: j.mu.applied, Checkpointed: j.mu.ckpt.Applied,
		OpenCycle: j.mu.cycle, ClosedCycles: len(j.mu.closedC), Released: j.mu.released,
		Segments: len(j.mu.segs), Cap: j.cfg.Cap, PendingBlocks: j.npending.Load(),
		ResyncRequired: j.mu.dirty != nil,
		ResyncBase:     j.mu.resyncBase,

		TreeBuilt: s.TreeBuilt, TreeComplete: s.TreeComplete, TreeBuiltBytes: s.TreeBuiltBytes,
		TreeSize: s.TreeSize, TreeUnknownLeaves: s.TreeUnknownLeaves,
		TreeRootsThrough: j.mu.tree.through,
	}
	if len(j.mu.segs) > 0 {
		s.JournalBytes = int64(j.mu.head - j.mu.segs[0].base)
	}
	s.RetainedBytes = int64(j.mu.head - min(j.mu.head, j.retainFromLocked()))
	s.OpenBytes = j.mu.written[j.mu.cycle]
	if ci := j.mu.open[j.mu.cycle]; ci != nil {
		s.OpenChanged = len(ci.recs) > 0 || len(ci.ranges) > 0
	}
	if j.mu.dirty != nil {
		s.DirtyBlocks = j.mu.dirty.count()
		s.ResyncReason = j.mu.resyncReason
	}
	if j.mu.failed != nil {
		s.Failed = j.mu.failed.Error()
	}
	return s
}
