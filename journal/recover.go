package journal

import (
	"errors"
	"fmt"
	"path"
	"time"
)

// recover brings the journal back after any shutdown, clean or not:
//
//  1. Scan every segment (scanSegments). Each valid record carries the LSN
//     that was durable when it was written; the largest such value says how
//     far the journal had certainly been synced.
//  2. The first gap or invalid record ends the journal (findEnd). At or past
//     the durable LSN it is a torn tail (a crash): cut it off, drop later
//     segments (cutEnd). Below it, synced data is damaged: refuse with
//     ErrCorrupt.
//  3. Rebuild the unreleased cycles' indexes and the dirty map from the
//     records, and replay into the images every record the last checkpoint
//     does not cover (rebuild). Replay is idempotent: a record already in the
//     image is written again with the same bytes.
//  4. Sync the images and write a checkpoint at the journal's head.
//
// It runs inside Open, before any other goroutine can reach the journal, so
// it touches mu's fields without taking mu.
func (j *Journal) recover() error {
	ck, err := j.readState()
	if err != nil {
		return err
	}
	bases, err := j.listSegmentFiles()
	if err != nil {
		return err
	}
	scans, durable, err := j.scanSegments(bases, ck.Applied)
	if err != nil {
		return err
	}
	keep, cut, err := j.findEnd(scans, durable)
	if err != nil {
		return err
	}
	cuts := j.cutWrites(scans, keep, cut)
	if err := j.cutEnd(keep, scans, ck); err != nil {
		return err
	}
	var headers []Header
	for _, sc := range scans[:keep] {
		headers = append(headers, sc.headers...)
	}
	if err := j.keepCutWrites(cuts, ck, headers); err != nil {
		return err
	}
	tb := newTreeBatch(j.tree)
	if err := j.invalidateCutWrites(cuts, tb); err != nil {
		return err
	}
	if err := j.rebuild(headers, ck, tb); err != nil {
		return err
	}
	if err := tb.commit(); err != nil {
		return fmt.Errorf("journal: block tree: %w", err)
	}
	j.recoverBarrier(headers)
	j.mu.ckpt = ck
	return j.checkpoint(true) // syncs the tree before the checkpoint file
}

// invalidateCutWrites makes the ranges of the cut write records Unknown
// in the block tree, whether or not replication is on: each may be in the
// image or not, and the tree may claim its hash or the one before (see
// the package doc, "Block tree"). The records replayed after (rebuild)
// set the hashes of the blocks they write again, which their replay puts
// in the image.
func (j *Journal) invalidateCutWrites(cuts []cutWrite, tb *treeBatch) error {
	for _, c := range cuts {
		h := &c.h
		disk, off, n := int(h.Disk), int64(h.Offset), int64(h.Length)
		if disk >= len(j.cfg.Disks) || off+n > j.cfg.Disks[disk].Size || off+n < off {
			continue // keepCutWrites logged it
		}
		if err := tb.invalidate(disk, off, n); err != nil {
			return fmt.Errorf("journal: block tree: %w", err)
		}
	}
	return nil
}

// recoverBarrier sets where the tree stands after recovery: past every
// closed cycle, and at the barrier of the last one when no record of the
// open cycle follows its seal, in which case its roots are the tree's.
func (j *Journal) recoverBarrier(headers []Header) {
	last := j.mu.cycle - 1
	j.mu.tree.sealed, j.mu.tree.through = last, last
	j.mu.tree.atBarrier = true
	for i := len(headers) - 1; i >= 0 && j.mu.tree.atBarrier; i-- {
		if headers[i].Kind != KindSeal && headers[i].Cycle > last {
			j.mu.tree.atBarrier = false
		}
		if headers[i].Cycle <= last {
			break
		}
	}
	if j.tree == nil {
		return
	}
	if r := j.tree.Roots(); r != nil && j.mu.tree.atBarrier && last > 0 {
		j.mu.tree.roots[last] = r
	}
}

// readState reads the checkpoint, the dirty map and the resync marker. A
// resync marker beside a dirty map is dropped: the dirty map wins.
func (j *Journal) readState() (checkpoint, error) {
	ck, _, err := readCheckpoint(j.fs, j.cfg.Dir)
	if err != nil {
		return ck, err
	}
	if ck.Cycle == 0 {
		ck.Cycle = 1
	}
	if j.mu.dirty, err = readDirty(j.fs, j.cfg.Dir, j.diskSizes()); err != nil {
		return ck, err
	}
	if j.mu.resyncBase, err = readResync(j.fs, j.cfg.Dir); err != nil {
		return ck, err
	}
	if j.mu.dirty != nil && j.mu.resyncBase != 0 {
		// A crash inside BeginResync, or the cap passed during a resync:
		// the dirty map wins and the resync starts again.
		j.mu.resyncBase = 0
		if err := j.removeState(resyncFile); err != nil {
			return ck, fmt.Errorf("journal: remove resync marker: %w", err)
		}
	}
	return ck, nil
}

// listSegmentFiles returns the base LSNs of the segments, oldest first, and
// picks up the recycled files kept for reuse.
func (j *Journal) listSegmentFiles() ([]uint64, error) {
	bases, err := listSegments(j.fs, j.cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("journal: list segments: %w", err)
	}
	if j.mu.free, err = listFree(j.fs, j.cfg.Dir); err != nil {
		return nil, fmt.Errorf("journal: list segments: %w", err)
	}
	j.mu.freeSeq = len(j.mu.free) + 1
	for _, f := range j.mu.free {
		var n int
		if _, err := fmt.Sscanf(path.Base(f), freePrefix+"%d", &n); err == nil {
			j.mu.freeSeq = max(j.mu.freeSeq, n+1)
		}
	}
	return bases, nil
}

// segmentScan is what scanSegments found in one segment: where its valid
// records end and why they stop, and their headers.
type segmentScan struct {
	res     scanResult
	headers []Header
}

// scanSegments opens every segment into mu.segs and reads its records; the
// payloads of those at or past applied (the ones replay will need) are
// checked. It returns one segmentScan per segment and the durable watermark:
// the largest Synced value of any valid record, at least applied.
func (j *Journal) scanSegments(bases []uint64, applied uint64) ([]segmentScan, uint64, error) {
	var scans []segmentScan
	durable := applied
	for _, b := range bases {
		seg, err := openSegment(j.fs, j.cfg.Dir, b)
		if err != nil {
			if errors.Is(err, ErrVersion) {
				return nil, 0, err
			}
			// Segments are created atomically; a bad header is damage, but
			// only matters if something durable could live there.
			scans = append(scans, segmentScan{res: scanResult{end: b, torn: err}})
			j.mu.segs = append(j.mu.segs, &segment{base: b, name: segmentName(j.cfg.Dir, b)})
			continue
		}
		j.mu.segs = append(j.mu.segs, seg)
		size, err := seg.f.Size()
		if err != nil {
			return nil, 0, fmt.Errorf("journal: %s: %w", seg.name, err)
		}
		var hs []Header
		res, err := scanSegment(seg, size,
			func(h *Header) bool { return h.LSN >= applied },
			func(h Header, _ []byte) error { hs = append(hs, h); return nil })
		if err != nil {
			return nil, 0, err
		}
		scans = append(scans, segmentScan{res: res, headers: hs})
		durable = max(durable, res.maxSynced)
	}
	return scans, durable, nil
}

// findEnd finds where the journal ends: the first gap between segments or
// record that does not verify, cutting a torn tail at or past durable
// (recoverTail) and failing with ErrCorrupt below it. It returns how many
// segments, from the first, hold the journal, and whether the last of them
// was cut back.
func (j *Journal) findEnd(scans []segmentScan, durable uint64) (int, bool, error) {
	for i, seg := range j.mu.segs {
		res := scans[i].res
		if i > 0 && seg.base != scans[i-1].res.end {
			if scans[i-1].res.end < durable {
				return 0, false, fmt.Errorf("%w: gap before segment %s (durable through %#x)", ErrCorrupt, seg.name, durable)
			}
			return i, false, nil
		}
		if seg.f == nil {
			if seg.base < durable {
				return 0, false, fmt.Errorf("%w: %v", ErrCorrupt, res.torn)
			}
			return i, false, nil
		}
		// A segment is only left for the next one when a record did not
		// fit: the next starts exactly where its last record ends. Past
		// that end lie bytes of the file's earlier life (a recycled
		// segment) or preallocated zeroes, not a torn record.
		if res.torn != nil && i+1 < len(j.mu.segs) && j.mu.segs[i+1].f != nil && j.mu.segs[i+1].base == res.end {
			j.log.Debug("journal: segment ends before its file does", "segment", seg.name, "lsn", res.end, "why", res.torn)
			continue
		}
		if res.torn != nil {
			if err := recoverTail(seg, res, durable); err != nil {
				return 0, false, err
			}
			j.log.Info("journal: cut torn tail", "segment", seg.name, "lsn", res.end, "why", res.torn)
			return i + 1, true, nil
		}
	}
	return len(j.mu.segs), false, nil
}

// cutWrite is a write record that recovery cuts although its header
// verifies at its own LSN: the record that stopped the scan (its payload
// damaged or cut short), or one past it.
type cutWrite struct {
	h       Header
	segment string
	why     string
}

// cutWrites lists the write records that a cut (findEnd cut the last kept
// segment) takes away although they may be in the image. Only a cut whose
// first record has a header that verifies can: that record was written
// whole once, and a sync may have covered it and the records after it.
// Then it lists that record (if a write) and every write record whose
// header verifies after it, in its segment and in the segments dropped
// after it. A cut that starts at a header that does not verify (zeroes,
// stale bytes of a recycled segment) is an ordinary torn tail: no sync can
// have covered what follows a record still in flight, so nothing after it
// was written back. Call it before cutEnd drops those segments.
func (j *Journal) cutWrites(scans []segmentScan, keep int, cut bool) []cutWrite {
	if !cut || keep == 0 || scans[keep-1].res.tornHeader == nil {
		return nil
	}
	var cuts []cutWrite
	add := func(seg *segment, res scanResult) {
		if h := res.tornHeader; h != nil && h.Kind == KindWrite {
			cuts = append(cuts, cutWrite{h: *h, segment: seg.name, why: res.torn.Error()})
		}
		for _, h := range res.beyond {
			cuts = append(cuts, cutWrite{h: h, segment: seg.name, why: "past the cut record"})
		}
	}
	add(j.mu.segs[keep-1], scans[keep-1].res)
	for i := keep; i < len(scans); i++ {
		for _, h := range scans[i].headers {
			if h.Kind == KindWrite {
				cuts = append(cuts, cutWrite{h: h, segment: j.mu.segs[i].name, why: "in a segment past the cut record"})
			}
		}
		add(j.mu.segs[i], scans[i].res)
	}
	return cuts
}

// keepCutWrites keeps what cut write records tell: each was appended, and
// may have been synced and written back into the image before the crash (a
// header that verifies at its own LSN is no leftover of a recycled
// segment), so the replica may lack data the image holds. With replication
// on, each one's range of its disk is marked dirty, which makes the VM
// resync required: the resync ships those ranges from the image. A dirty
// map made here replaces the cycles not yet released (rebuild marks their
// records, headers, as enterDirty does) and ends a resync under way, as
// readState's rule has it. Each cut record is logged at WARN.
func (j *Journal) keepCutWrites(cuts []cutWrite, ck checkpoint, headers []Header) error {
	var reason string
	for _, c := range cuts {
		h := &c.h
		disk, off, n := int(h.Disk), int64(h.Offset), int64(h.Length)
		if disk >= len(j.cfg.Disks) || off+n > j.cfg.Disks[disk].Size {
			j.log.Warn("journal: cut a record whose header verified, for a range outside the disks",
				"segment", c.segment, "lsn", h.LSN, "disk", disk, "offset", off, "length", n)
			continue
		}
		name := j.cfg.Disks[disk].Name
		rng := fmt.Sprintf("[%d,%d)", off, off+n)
		if !j.mu.retain {
			j.log.Warn("journal: cut a record whose data may be in the image; replication is off, so there is no replica to repair",
				"segment", c.segment, "lsn", h.LSN, "disk", name, "range", rng, "why", c.why)
			continue
		}
		if j.mu.dirty == nil {
			dm := newDirtyMap(j.diskSizes())
			dm.released = max(ck.Released, j.mu.resyncBase)
			dm.lsn = j.mu.head
			for _, h := range headers {
				if h.Cycle > dm.released {
					dm.lsn = h.LSN
					break
				}
			}
			j.mu.dirty = dm
			if j.mu.resyncBase != 0 {
				j.mu.resyncBase = 0
				if err := j.removeState(resyncFile); err != nil {
					return fmt.Errorf("journal: remove resync marker: %w", err)
				}
			}
		}
		j.mu.dirty.setRange(disk, off, n)
		if reason == "" {
			reason = fmt.Sprintf("journal record at LSN %#x in segment %s cut at recovery (header intact, payload damaged or short), its data may be in the image: disk %s bytes %s",
				h.LSN, c.segment, name, rng)
		}
		j.log.Warn("journal: cut a record whose data may be in the image; resync required for its range",
			"segment", c.segment, "lsn", h.LSN, "disk", name, "range", rng, "why", c.why)
	}
	if reason != "" {
		if len(cuts) > 1 {
			reason += fmt.Sprintf(", and %d more record(s) past it", len(cuts)-1)
		}
		j.mu.resyncReason = reason
	}
	return nil
}

// cutEnd removes the segments past the end findEnd found (keep segments
// stay), sets the head where the journal ends and makes what survived
// durable; with no segment left it starts one at the checkpoint's head.
func (j *Journal) cutEnd(keep int, scans []segmentScan, ck checkpoint) error {
	for _, seg := range j.mu.segs[keep:] {
		if seg.f != nil {
			seg.f.Close()
		}
		if err := j.fs.Remove(seg.name); err != nil {
			return fmt.Errorf("journal: remove segment past torn tail: %w", err)
		}
		j.log.Info("journal: dropped segment past torn tail", "segment", seg.name)
	}
	if keep < len(j.mu.segs) {
		if err := j.fs.SyncDir(j.cfg.Dir); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
	}
	j.mu.segs = j.mu.segs[:keep]
	if keep > 0 {
		j.mu.head = scans[keep-1].res.end
	} else {
		j.mu.head = ck.Head
	}
	if j.mu.head < ck.Applied {
		return fmt.Errorf("%w: journal ends at %#x before checkpoint %#x", ErrCorrupt, j.mu.head, ck.Applied)
	}
	// Whatever survived is now part of the journal for good.
	for _, seg := range j.mu.segs {
		if err := seg.f.Sync(); err != nil {
			return fmt.Errorf("journal: sync %s: %w", seg.name, err)
		}
	}
	if len(j.mu.segs) == 0 {
		seg, err := createSegment(j.fs, j.cfg.Dir, j.mu.head, j.cfg.Now().UnixNano(), j.popFreeLocked(), j.cfg.SegmentSize)
		if err != nil {
			return err
		}
		j.mu.segs = append(j.mu.segs, seg)
		j.mu.head += segmentHeaderSize
	}
	j.mu.synced = j.mu.head
	return nil
}

// rebuild rebuilds the cycles (closing those whose seal it meets), their
// indexes and the dirty map from the records, oldest first, and replays
// into the images every record at or past the checkpoint.
func (j *Journal) rebuild(headers []Header, ck checkpoint, tb *treeBatch) error {
	j.mu.released = max(ck.Released, j.mu.resyncBase)
	if j.mu.dirty != nil {
		j.mu.released = max(j.mu.released, j.mu.dirty.released)
	}
	j.mu.cycle = max(ck.Cycle, j.mu.released+1)
	j.mu.cycleStart = j.mu.segs[0].base
	j.mu.applied = ck.Applied
	for i := range headers {
		h := &headers[i]
		j.mu.cycle = max(j.mu.cycle, h.Cycle)
		if h.Kind == KindSeal {
			if err := j.recoverSeal(h); err != nil {
				return err
			}
			continue
		}
		if h.Kind == KindWrite {
			j.mu.written[h.Cycle] += int64(h.Length)
		}
		if ci := j.cycleIndexLocked(h.Cycle); ci != nil {
			j.indexRecovered(ci, h)
		} else if j.mu.dirty != nil && h.LSN >= j.mu.dirty.lsn {
			j.mu.dirty.setRange(int(h.Disk), int64(h.Offset), int64(h.Length))
		}
		if h.LSN >= ck.Applied {
			if err := j.replay(h, tb); err != nil {
				return fmt.Errorf("journal: replay LSN %#x: %w", h.LSN, err)
			}
		}
	}
	j.mu.applied = j.mu.head
	return nil
}

func (j *Journal) indexRecovered(ci *cycleIndex, h *Header) {
	if ci.info.Start == 0 {
		ci.info.Start = h.LSN
	}
	if h.Kind == KindWrite {
		for i := uint64(0); i < h.Length/BlockSize; i++ {
			ci.blocks[blockKey(int(h.Disk), h.Offset/BlockSize+i)] = h.LSN + HeaderSize + i*BlockSize
		}
		ci.addRecord(h)
		return
	}
	ci.dropRange(int(h.Disk), int64(h.Offset), int64(h.Length))
	ci.ranges = append(ci.ranges, Extent{Disk: int(h.Disk), Offset: int64(h.Offset), Length: int64(h.Length), Kind: h.Kind, lsn: h.LSN})
}

// recoverSeal closes a cycle found in the journal during recovery.
func (j *Journal) recoverSeal(h *Header) error {
	j.mu.cycle = max(j.mu.cycle, h.Cycle+1)
	end := h.LSN + uint64(h.Size())
	start := j.mu.cycleStart
	j.mu.cycleStart = end
	ci := j.mu.open[h.Cycle]
	delete(j.mu.open, h.Cycle)
	written := j.mu.written[h.Cycle]
	delete(j.mu.written, h.Cycle)
	if !j.mu.retain || j.mu.dirty != nil || h.Cycle <= j.mu.released {
		j.mu.released = max(j.mu.released, h.Cycle)
		return nil
	}
	if ci == nil {
		ci = &cycleIndex{info: CycleInfo{Cycle: h.Cycle}}
	}
	seg := j.segmentFor(h.LSN)
	buf := make([]byte, sealPayloadSize)
	if _, err := seg.f.ReadAt(buf, int64(h.LSN-seg.base)+HeaderSize); err != nil {
		return fmt.Errorf("journal: read seal of cycle %d: %w", h.Cycle, err)
	}
	sp := decodeSeal(buf)
	ci.info.Start = start
	ci.info.End = end
	ci.info.Bytes = written
	ci.info.Sealed = timeFromNano(sp.UnixNano)
	ci.info.AppConsistent = sp.Flags&SealAppConsistent != 0
	ci.info.Point = sp.Flags&SealPoint != 0
	if err := j.cycles.put(ci); err != nil {
		return err
	}
	j.mu.closedC = append(j.mu.closedC, ci.info)
	return nil
}

func timeFromNano(ns int64) time.Time { return time.Unix(0, ns).UTC() }

// replay applies one record to the image directly, and to the tree.
func (j *Journal) replay(h *Header, tb *treeBatch) error {
	if h.Kind != KindWrite {
		if err := j.applyRange(h); err != nil {
			return err
		}
		return tb.zero(int(h.Disk), int64(h.Offset), int64(h.Length))
	}
	buf := j.getBuf(int(h.Length))
	defer j.putBuf(buf)
	if err := j.readJournal(buf, h.LSN+HeaderSize); err != nil {
		return err
	}
	if err := checkPayload(h, buf); err != nil {
		return err
	}
	if _, err := j.images[h.Disk].WriteAt(buf, int64(h.Offset)); err != nil {
		return err
	}
	return tb.data(int(h.Disk), int64(h.Offset), buf)
}
