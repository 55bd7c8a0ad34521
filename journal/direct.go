package journal

import (
	"cmp"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sync"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Direct appends.
//
// A write of at least directAppendMin bytes goes into the segment file with
// O_DIRECT when the file can (vfs.DirectWriter): the journal copy then moves
// from the caller's buffer to the disk instead of into fresh page-cache pages,
// which on a sequential stream was the largest single CPU cost of the write
// path (bench/RESULTS.md). O_DIRECT wants the file range and the buffer
// aligned to vfs.DirectAlign, so the record is placed with its payload on a
// boundary of the file, behind a pad record:
//
//	o (head)     blk = o rounded up             blk+4096-56   blk+4096
//	| pad header | pad zeroes ...                | header      | payload ...
//	|<-plain--->|<---------------------- one O_DIRECT write -------------->|
//
// The pad runs from the head to the record header; the part of it before
// blk (only when the head was not on a boundary: after a small or a plain
// record) is written with a plain WriteAt. A stream of direct appends stays
// on boundaries, so each costs one O_DIRECT write and 4040 bytes of padding.
//
// Nothing else changes: the record is the same record, reserved under mu and
// in flight until both writes returned, so a sync still covers it only once
// it is whole; a crash in between leaves a pad or record that does not verify
// past the durable watermark, a torn tail like any other.
//
// The write-back takes the data of a direct append from the buffer it was
// written from, kept with the queued record while the retainMax budget
// allows; it is the very bytes the journal holds, and they are written back
// only once synced, as always. Past the budget it reads the payload back
// with O_DIRECT (readJournalDirect), as the page cache does not hold it.

// directAppendMin is the smallest write payload appended with O_DIRECT.
const directAppendMin = 128 << 10

var zeroPad [maxPad]byte

// directLayout places a direct append at file offset head of its segment.
type directLayout struct {
	pad int64 // the pad record: the head
	blk int64 // start of the O_DIRECT write, the first boundary >= pad
}

func layoutAt(head int64) directLayout {
	return directLayout{pad: head, blk: (head + vfs.DirectAlign - 1) &^ (vfs.DirectAlign - 1)}
}

// rec is the file offset of the write record's header.
func (l directLayout) rec() int64 { return l.blk + vfs.DirectAlign - HeaderSize }

// end is the file offset just past a payload of n bytes.
func (l directLayout) end(n int64) int64 { return l.blk + vfs.DirectAlign + n }

// reserveDirectLocked reserves room for a direct append of an n-byte payload,
// starting a new segment when the active one is too full. ok is false when
// the segment cannot take direct writes (or is too small for one): then the
// caller appends the plain way.
func (j *Journal) reserveDirectLocked(n int64) (seg *segment, l directLayout, ok bool, err error) {
	if j.mu.failed != nil {
		return nil, l, false, j.mu.failed
	}
	if j.mu.closed {
		return nil, l, false, ErrClosed
	}
	if layoutAt(segmentHeaderSize).end(n) > j.cfg.SegmentSize {
		return nil, l, false, nil
	}
	seg = j.mu.segs[len(j.mu.segs)-1]
	l = layoutAt(int64(j.mu.head - seg.base))
	if l.end(n) > j.cfg.SegmentSize {
		if seg, err = j.newSegmentLocked(); err != nil {
			return nil, l, false, err
		}
		l = layoutAt(int64(j.mu.head - seg.base))
	}
	if seg.dw == nil {
		return nil, l, false, nil
	}
	j.mu.head = seg.base + uint64(l.end(n))
	j.mu.inflight[seg.base+uint64(l.pad)] = struct{}{}
	return seg, l, true, nil
}

// appendDirect appends a write record with O_DIRECT (see above), or the plain
// way where that is not possible. Like appendRecord, the caller holds the
// stripe locks and index runs under mu once the record is written.
// If hs is not nil, the payload's block hashes are appended to it.
func (j *Journal) appendDirect(h Header, payload []byte, hs *[]blocktree.Hash, index func(h *Header)) (Header, error) {
	buf := getAligned(vfs.DirectAlign + len(payload))
	h.DCRC = copyCRC(buf[vfs.DirectAlign:], payload, hs)
	return j.appendDirectBuf(h, buf, index)
}

// appendDirectBuf is appendDirect of a payload already in an append buffer
// (getAligned), at buf[DirectAlign:], with h.Length and h.DCRC set. It takes
// buf: kept for the write-back or given back to the pool.
func (j *Journal) appendDirectBuf(h Header, buf []byte, index func(h *Header)) (Header, error) {
	n := int64(h.Length)
	kept := false
	defer func() {
		if !kept {
			putAligned(buf)
		}
	}()
	j.mu.Lock()
	j.waitRetainLocked(cap(buf))
	seg, l, ok, err := j.reserveDirectLocked(n)
	if err != nil || !ok {
		j.mu.Unlock()
		if err != nil {
			return h, err
		}
		return j.appendRecord(h, buf[vfs.DirectAlign:vfs.DirectAlign+n], index)
	}
	start := seg.base + uint64(l.pad)
	h.Cycle, h.LSN, h.Synced = j.mu.cycle, seg.base+uint64(l.rec()), j.mu.synced
	pad := Header{Kind: KindPad, LSN: start, Cycle: j.mu.cycle, Synced: j.mu.synced,
		Length: uint64(l.rec() - l.pad - HeaderSize)}
	j.mu.Unlock()

	encodeHeader(buf[vfs.DirectAlign-HeaderSize:], &h)
	pad.DCRC = crc(zeroPad[:pad.Length])
	var werr error
	if l.blk == l.pad {
		encodeHeader(buf, &pad)
		clear(buf[HeaderSize : vfs.DirectAlign-HeaderSize])
	} else {
		// The pad starts before the boundary: its first bytes go in
		// with a plain write, the rest ride at the head of buf.
		rec := make([]byte, l.rec()-l.pad)
		encodeHeader(rec, &pad)
		split := l.blk - l.pad
		copy(buf, rec[split:])
		_, werr = seg.f.WriteAt(rec[:split], l.pad)
	}
	if werr == nil {
		_, werr = seg.dw.WriteDirectAt(buf, l.blk)
	}

	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.appendedLocked(start, seg, werr, &h, index); err != nil {
		return h, err
	}
	// Keep the buffer for the write-back while the budget allows.
	for q := len(j.mu.queue) - 1; q >= 0 && j.mu.retained+cap(buf) <= j.mu.retainLimit; q-- {
		if j.mu.queue[q].h.LSN == h.LSN {
			j.mu.queue[q].buf = buf
			j.mu.retained += cap(buf)
			kept = true
			break
		}
		if j.mu.queue[q].h.LSN < h.LSN {
			break
		}
	}
	if j.mu.head-j.mu.synced >= syncEarly {
		j.kickWriteBack() // the background syncs early: see syncEarly
	}
	return h, nil
}

// waitRetainLocked holds a direct append back while the buffers kept for the
// write-back would pass retainMax with its n bytes. This is the journal's
// back-pressure: a stream faster than the write-back would otherwise lose
// the kept buffers, and the write-back, now reading every byte back from
// the journal, would fall further behind (three transfers per byte instead
// of two). Waiting here holds the client to the rate the images take.
// Called with mu held; returns with it held.
// Only synced records are written back, so a waiter makes the journal sync
// (syncIfDue) however little is unsynced.
func (j *Journal) waitRetainLocked(n int) {
	for j.mu.failed == nil && !j.mu.closed && j.mu.retained > 0 && j.mu.retained+n > j.mu.retainLimit {
		j.mu.retainWaiters++
		j.kickWriteBack()
		j.mu.cond.Wait()
		j.mu.retainWaiters--
	}
}

// retainMax bounds the memory of append buffers kept for the write-back.
// syncEarly is how much unsynced journal makes the background sync before
// its interval is up: only synced records are written back, so without it
// a fast stream would hold a whole interval's worth of buffers (or, past
// retainMax, have the write-back read everything back from the journal).
const (
	retainMax = 64 << 20
	syncEarly = 32 << 20
)

// readJournalDirect is readJournal for the write-back's aligned buffer: where
// the journal position is aligned in its file (the payload of a direct
// append) it reads with O_DIRECT, around the page cache that does not hold
// it. Caller holds segMu for reading.
func (j *Journal) readJournalDirect(p []byte, lsn uint64) error {
	j.mu.Lock()
	seg := j.segmentFor(lsn)
	j.mu.Unlock()
	if seg == nil {
		return fmt.Errorf("journal: no segment holds LSN %#x", lsn)
	}
	off := int64(lsn - seg.base)
	if seg.dr == nil || !vfs.DirectAligned(p, off) {
		_, err := seg.f.ReadAt(p, off)
		return err
	}
	_, err := seg.dr.ReadDirectAt(p, off)
	return err
}

// crcPiece is how much copyCRC and receiveCRC move before they checksum it:
// small enough to be still in the CPU cache. CRC32C over a cold buffer ran at
// a third of its speed over a warm one, and was a fifth of the daemon's CPU
// on a sequential stream (bench/RESULTS.md). receiveCRC's pieces are larger
// than the buffered readers front ends use (128 KiB for NBD), which then
// read straight into dst instead of copying through their buffer.
const (
	crcPiece     = 64 << 10
	receivePiece = 256 << 10
)

// copyCRC copies src into dst, piece by piece, and returns the CRC32C of
// src. If hs is not nil, the block hashes of src (blocktree.HashBlocks) are
// appended to it, piece by piece too: XXH64 over the piece just copied
// reads it from the CPU cache, as the checksum does. Both pieces are whole
// blocks, so the hashes are those of HashBlocks over the whole of src.
func copyCRC(dst, src []byte, hs *[]blocktree.Hash) uint32 {
	var sum uint32
	for len(src) > 0 {
		k := copy(dst, src[:min(len(src), crcPiece)])
		sum = crc32.Update(sum, castagnoli, dst[:k])
		if hs != nil {
			*hs = blocktree.HashBlocks(*hs, dst[:k])
		}
		dst, src = dst[k:], src[k:]
	}
	return sum
}

// receiveCRC reads len(dst) bytes from r into dst, piece by piece, and
// returns their CRC32C; if hs is not nil, it appends their block hashes to
// it, as copyCRC does.
func receiveCRC(r io.Reader, dst []byte, hs *[]blocktree.Hash) (uint32, error) {
	var sum uint32
	for len(dst) > 0 {
		k := min(len(dst), receivePiece)
		if _, err := io.ReadFull(r, dst[:k]); err != nil {
			return 0, err
		}
		sum = crc32.Update(sum, castagnoli, dst[:k])
		if hs != nil {
			*hs = blocktree.HashBlocks(*hs, dst[:k])
		}
		dst = dst[k:]
	}
	return sum, nil
}

// Append buffers: those of a header block and up to 1 MiB of payload (every
// FUSE write, and NBD writes up to 1 MiB) come from hugeBufs, so that the
// disk gets each in one request (see vfs.HugePool: from ordinary pages a
// 1 MiB O_DIRECT write was two requests, and the grouped write-back of 16
// kept buffers seventeen). Larger ones, and any past hugeBufs' bound (one
// journal's retainMax and as much again in flight; the pool is shared by
// all journals and never shrinks), come from alignedPool.
var (
	hugeBufs    = vfs.NewHugePool(vfs.DirectAlign+1<<20, 2*retainMax)
	alignedPool sync.Pool
)

func getAligned(n int) []byte {
	if n <= hugeBufs.Size() {
		if b, ok := hugeBufs.Get(); ok {
			return b[:n]
		}
	}
	if b, ok := alignedPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return vfs.AlignedBuffer(max(n, vfs.DirectAlign+1<<20))[:n]
}

func putAligned(b []byte) {
	if hugeBufs.Put(b) {
		return
	}
	if cap(b) <= vfs.DirectAlign+4<<20 {
		alignedPool.Put(&b)
	}
}

// writeBackRunMax bounds the bytes one grouped write-back moves.
const writeBackRunMax = 16 << 20

// directRun finds the records at the start of q that the write-back can
// move as one: direct appends back to back in one segment (each payload 4 KiB
// after the previous one's end) whose data, taken in disk order, is back to
// back on one disk, as a sequential stream leaves them (concurrent requests
// reach the journal in any order). Their payloads go out with one vectored
// O_DIRECT write, from the retained append buffers or one O_DIRECT read of the
// journal, instead of a read and a write for each: the write-back is a single
// goroutine, and per-record round trips kept it behind a sequential stream.
// It returns how many records and their indexes in disk order.
func (j *Journal) directRun(q []queued) (int, []int) {
	first := &q[0].h
	if first.Length < uint64(j.directMin) {
		return 1, nil
	}
	if _, ok := j.images[first.Disk].(vfs.DirectVectorWriter); !ok {
		return 1, nil
	}
	j.mu.Lock()
	seg := j.segmentFor(first.LSN)
	j.mu.Unlock()
	if seg == nil || seg.dr == nil || (first.LSN+HeaderSize-seg.base)%vfs.DirectAlign != 0 {
		return 1, nil
	}
	k, bytes := 1, first.Length
	for k < len(q) {
		prev, h := &q[k-1].h, &q[k].h
		if h.Kind != KindWrite || h.Disk != first.Disk ||
			h.LSN+HeaderSize != prev.LSN+HeaderSize+prev.Length+vfs.DirectAlign ||
			h.LSN+uint64(h.Size()) > seg.base+uint64(j.cfg.SegmentSize) ||
			bytes+h.Length > writeBackRunMax {
			break
		}
		bytes += h.Length
		k++
	}
	for ; k > 1; k-- {
		order := make([]int, k)
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(a, b int) int { return cmp.Compare(q[a].h.Offset, q[b].h.Offset) })
		ok := true
		for i := 1; i < k && ok; i++ {
			prev, h := &q[order[i-1]].h, &q[order[i]].h
			ok = h.Offset == prev.Offset+prev.Length
		}
		if ok {
			return k, order
		}
	}
	return 1, nil
}

// writeBackRun writes back a run of records found by directRun. Every block of
// every record must be its newest durable copy (as writeBackRecord decides);
// if one is not, only the first record is written back, the plain way, and
// the count of records done says so.
func (j *Journal) writeBackRun(q []queued, order []int, tb *treeBatch) (int, error) {
	first, last := &q[0].h, &q[len(q)-1].h
	disk := int(first.Disk)
	all := true // every record's append buffer is retained
	for i := range q {
		all = all && q[i].buf != nil
	}
	// mu is taken per record, not for the whole run: a run of 16 MiB is
	// 4096 map lookups, and appends wait for mu. A block that a newer
	// record rewrites between this check and the image write is harmless:
	// that record is written back after this one, and reads take it from
	// the journal until then.
	for i := range q {
		h := &q[i].h
		base := h.Offset / BlockSize
		j.mu.Lock()
		for b := uint64(0); b < h.Length/BlockSize; b++ {
			data := h.LSN + HeaderSize + b*BlockSize
			if p := j.mu.pending[blockKey(disk, base+b)]; p != data && (p == 0 || p < j.mu.synced) {
				j.mu.Unlock()
				return 1, j.writeBackRecord(&q[0], tb)
			}
		}
		j.mu.Unlock()
	}
	iov := make([][]byte, len(q))
	if all {
		for i, k := range order {
			iov[i] = q[k].buf[vfs.DirectAlign : vfs.DirectAlign+int(q[k].h.Length)]
		}
	} else {
		start := first.LSN + HeaderSize
		n := int(last.LSN + HeaderSize + last.Length - start)
		buf := j.alignedBuf(n)
		j.segMu.RLock()
		err := j.readJournalDirect(buf, start)
		j.segMu.RUnlock()
		if err != nil {
			return 0, err
		}
		for i, k := range order {
			pos := int(q[k].h.LSN + HeaderSize - start)
			iov[i] = buf[pos : pos+int(q[k].h.Length)]
			// Read back, so verified before any of the run is written.
			if err := j.checkWritePayload(&q[k].h, iov[i]); err != nil {
				return 0, err
			}
		}
	}
	if _, err := j.images[disk].(vfs.DirectVectorWriter).WritevDirectAt(iov, int64(q[order[0]].h.Offset)); err != nil {
		return 0, err
	}
	for i, k := range order {
		if j.tree != nil {
			if err := tb.set(disk, int64(q[k].h.Offset), recordHashes(&q[k], iov[i])); err != nil {
				return 0, err
			}
		}
	}
	for i := range q {
		h := &q[i].h
		base := h.Offset / BlockSize
		j.mu.Lock()
		for b := uint64(0); b < h.Length/BlockSize; b++ {
			key, data := blockKey(disk, base+b), h.LSN+HeaderSize+b*BlockSize
			if j.mu.pending[key] == data {
				delete(j.mu.pending, key)
				j.npending.Add(-1)
			}
		}
		j.mu.Unlock()
	}
	return len(q), nil
}
