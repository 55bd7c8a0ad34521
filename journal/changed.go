package journal

import (
	"encoding/binary"
	"errors"
	"fmt"

	badger "github.com/dgraph-io/badger/v4"
)

// ErrTooOld is returned by ChangedSince for a cycle the journal can no
// longer answer for: cycles after it were released, or writes are only
// tracked as dirty blocks.
var ErrTooOld = errors.New("journal: the journal no longer holds every cycle after that one")

// ChangedSince says, for each BlockSize block of disk that [off, off+n)
// touches, whether a write, trim or zero after barrier a changed it: whether
// the block lies in a cycle after a, closed (the cycle index) or open. A
// scrub compares the live disk with a replica image at cycle a only where
// it says false.
//
// Writes that the write-back has not yet put in the image (the pending
// map) need no look of their own: every write is indexed in its cycle in
// the same step that makes it pending (appendWriteVia), and a reader sees
// it at once through the pending map, so a pending write after a is in a
// cycle after a, and one of a cycle up to a is part of what a reader sees
// of the image at a. Trims and zeroes are the cycles' ranges, indexed when
// they are appended, but a reader sees them only once the image is punched
// (rangeOp does it after the record is durable): every trim or zero still
// in the write-back queue counts as changed, whatever its cycle. It may
// then report a block changed that is not (it is never compared), never
// one unchanged that a reader sees differently from the image at a.
//
// A write the journal has not indexed yet when ChangedSince runs is not
// visible to a reader of the disk either (the index and the pending map
// change together under mu, and the image only later), so a caller that
// reads the disk first and asks ChangedSince after it learns of every
// write its read could have seen.
//
// It returns ErrTooOld when a cycle after a may be gone: released, sealed
// while writes were only tracked as dirty blocks, or while replication was
// off.
func (j *Journal) ChangedSince(a uint64, disk int, off, n int64) ([]bool, error) {
	if disk < 0 || disk >= len(j.disks) || off < 0 || n <= 0 || off+n > j.disks[disk].size {
		return nil, fmt.Errorf("%w: disk %d range [%d, +%d)", ErrOutOfRange, disk, off, n)
	}
	first, last := uint64(off)/BlockSize, uint64(off+n-1)/BlockSize
	out := make([]bool, last-first+1)
	mark := func(from, to uint64) { // blocks [from, to], clipped
		for b := max(from, first); b <= min(to, last); b++ {
			out[b-first] = true
		}
	}
	// A seal moves a cycle's index from memory to the cycle store with mu
	// released in between; holding sealMu keeps every cycle in one of them.
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	j.mu.Lock()
	if err := j.mu.failed; err != nil {
		j.mu.Unlock()
		return nil, err
	}
	tracked := j.mu.dirty == nil || (j.mu.resyncBase != 0 && a >= j.mu.resyncBase)
	if !j.mu.retain || j.mu.cutting || !tracked || a < j.mu.released {
		j.mu.Unlock()
		return nil, fmt.Errorf("%w: cycle %d (released up to %d)", ErrTooOld, a, j.mu.released)
	}
	for c, ci := range j.mu.open {
		if c <= a {
			continue
		}
		forEachKeyInRange(ci.blocks, disk, int64(first)*BlockSize, int64(last-first+1)*BlockSize, func(k, _ uint64) {
			b := k & (1<<48 - 1)
			mark(b, b)
		})
		for _, r := range ci.ranges {
			if r.Disk == disk && r.Length > 0 {
				mark(uint64(r.Offset)/BlockSize, uint64(r.Offset+r.Length-1)/BlockSize)
			}
		}
	}
	// A trim or zero is in the image only once the record is applied
	// (rangeOp punches it after the sync; the write-back applies one
	// replayed or received): before that a reader sees the old data, in
	// the image or pending, whatever the record's cycle. Until the
	// write-back drops it from the queue it counts as changed.
	for _, q := range j.mu.queue {
		if h := q.h; int(h.Disk) == disk && h.Length > 0 && (h.Kind == KindTrim || h.Kind == KindZero || h.Kind == KindZeroAlloc) {
			mark(h.Offset/BlockSize, (h.Offset+h.Length-1)/BlockSize)
		}
	}
	var closed []uint64
	for _, ci := range j.mu.closedC {
		if ci.Cycle > a {
			closed = append(closed, ci.Cycle)
		}
	}
	j.mu.Unlock()
	for _, c := range closed {
		if err := j.cycles.touched(c, disk, first, last, mark); err != nil {
			return nil, err
		}
	}
	if j.scanned != nil {
		j.scanned()
	}
	// Release drops closed cycles from the store without sealMu: one
	// released during the scan may have been missed.
	j.mu.Lock()
	released := j.mu.released
	j.mu.Unlock()
	if a < released {
		return nil, fmt.Errorf("%w: cycle %d (released up to %d during the look)", ErrTooOld, a, released)
	}
	return out, nil
}

// touched calls mark(from, to) for every block run and trim/zero range of
// closed cycle c on disk that may overlap blocks [first, last]. A run starts
// at most MaxPayload/BlockSize blocks before the first block it covers (it
// never spans records), so the scan seeks that far back.
func (s *cycleStore) touched(c uint64, disk int, first, last uint64, mark func(from, to uint64)) error {
	const maxRun = MaxPayload / BlockSize
	return s.db.View(func(txn *badger.Txn) error {
		prefix := binary.BigEndian.AppendUint16(cycleKey('b', c, 8), uint16(disk))
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		seek := binary.BigEndian.AppendUint64(cycleKey('b', c, 8), blockKey(disk, first-min(first, maxRun)))
		for it.Seek(seek); it.Valid(); it.Next() {
			item := it.Item()
			key := item.Key()
			val, err := item.ValueCopy(nil)
			if err != nil || len(key) != 17 || len(val) != 28 {
				it.Close()
				if err == nil {
					err = fmt.Errorf("%w: key %x", errBadIndex, key)
				}
				return err
			}
			b := binary.BigEndian.Uint64(key[9:]) & (1<<48 - 1)
			if b > last {
				break
			}
			if n := uint64(binary.LittleEndian.Uint32(val)); n > 0 && b+n-1 >= first {
				mark(b, b+n-1)
			}
		}
		it.Close()
		it = txn.NewIterator(badger.IteratorOptions{Prefix: cycleKey('r', c, 0), PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			val, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			if len(val) != 19 {
				return fmt.Errorf("%w: key %x", errBadIndex, it.Item().Key())
			}
			off, n := binary.LittleEndian.Uint64(val[2:]), binary.LittleEndian.Uint64(val[10:])
			if int(binary.LittleEndian.Uint16(val)) == disk && n > 0 {
				mark(off/BlockSize, (off+n-1)/BlockSize)
			}
		}
		return nil
	})
}
