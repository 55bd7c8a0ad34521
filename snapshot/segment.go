package snapshot

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/vdrepl/vdrepl/internal/recordlog"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// maxBlock is the largest block index a record or the index can hold: index
// keys pack the disk in the top 16 bits and the block in the low 48 (disks
// up to 1 EiB).
const maxBlock = 1<<48 - 1

func blockKey(disk int, block int64) uint64 { return uint64(disk)<<48 | uint64(block) }

func splitKey(k uint64) (disk int, block int64) { return int(k >> 48), int64(k & maxBlock) }

// A location is where a block's record is in its segment: the record's
// offset shifted left by one, with bit 0 set for a zero record (the block
// read as zeroes; nothing to read).
func dataLoc(off int64) int64 { return off << 1 }
func zeroLoc(off int64) int64 { return off<<1 | 1 }
func isZeroLoc(l int64) bool  { return l&1 == 1 }
func locOffset(l int64) int64 { return l >> 1 }

// entry is one block of a segment's index.
type entry struct {
	key uint64
	loc int64
}

// index maps the blocks a segment holds to their records. A closed segment
// keeps a sorted slice (16 bytes a block); blocks added since the segment
// was loaded or last frozen go to a map until it is closed.
type index struct {
	sorted []entry
	add    map[uint64]int64
}

func (x *index) get(k uint64) (int64, bool) {
	if l, ok := x.add[k]; ok {
		return l, true
	}
	i, ok := slices.BinarySearchFunc(x.sorted, k, func(e entry, k uint64) int { return cmp.Compare(e.key, k) })
	if ok {
		return x.sorted[i].loc, true
	}
	return 0, false
}

func (x *index) put(k uint64, l int64) {
	if x.add == nil {
		x.add = map[uint64]int64{}
	}
	x.add[k] = l
}

func (x *index) len() int { return len(x.sorted) + len(x.add) }

// frozen returns the index with the map merged into the sorted slice. x is
// not changed, so readers may keep using it while this runs.
func (x *index) frozen() index {
	if len(x.add) == 0 {
		return index{sorted: x.sorted}
	}
	s := make([]entry, 0, x.len())
	s = append(s, x.sorted...)
	for k, l := range x.add {
		s = append(s, entry{k, l})
	}
	slices.SortFunc(s, func(a, b entry) int { return cmp.Compare(a.key, b.key) })
	return index{sorted: s}
}

// each calls fn for every block the index holds, in no particular order.
func (x *index) each(fn func(key uint64, loc int64) error) error {
	for _, e := range x.sorted {
		if err := fn(e.key, e.loc); err != nil {
			return err
		}
	}
	for k, l := range x.add {
		if err := fn(k, l); err != nil {
			return err
		}
	}
	return nil
}

// sortedIndex builds an index from entries in file order. A block recorded
// twice keeps its first record: that one holds the content at the point.
func sortedIndex(es []entry) index {
	slices.SortStableFunc(es, func(a, b entry) int { return cmp.Compare(a.key, b.key) })
	es = slices.CompactFunc(es, func(a, b entry) bool { return a.key == b.key })
	return index{sorted: slices.Clip(es)}
}

// segment is one undo segment file: the content, at its point, of every
// block changed after that point and before the next one.
type segment struct {
	no    uint64
	cycle uint64 // the cycle of the point the segment starts at
	salt  uint32
	path  string
	f     vfs.File
	// size is the end of the last record. Written under Store.writeMu and
	// Store.mu, read under either.
	size int64
	idx  index // guarded like size
}

func segName(no uint64) string { return fmt.Sprintf("%016x.undo", no) }

// parseSegName returns the number of a segment file name.
func parseSegName(name string) (uint64, bool) {
	var no uint64
	if len(name) != 16+len(".undo") || name[16:] != ".undo" {
		return 0, false
	}
	if _, err := fmt.Sscanf(name[:16], "%016x", &no); err != nil || segName(no) != name {
		return 0, false
	}
	return no, true
}

// createSegment makes a new, empty segment file durable: header written and
// synced, its name synced in dir.
func createSegment(fsys vfs.FS, dir string, no, cycle uint64, disks int, salt uint32) (*segment, error) {
	path := join(dir, segName(no))
	f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	b := make([]byte, segHeaderSize)
	encodeSegHeader(b, segHeader{Disks: uint16(disks), No: no, Cycle: cycle, Salt: salt})
	if _, err := f.WriteAt(b, 0); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	if err := fsys.SyncDir(dir); err != nil {
		f.Close()
		return nil, err
	}
	return &segment{no: no, cycle: cycle, salt: salt, path: path, f: f, size: segHeaderSize}, nil
}

// loadSegment opens segment no of the point at cycle and rebuilds its index,
// verifying every record. closed is the segment's size from the manifest, or
// 0 for the open segment, whose torn tail (the unsynced records a crash left
// half written) is cut by cutTornTail. Damage anywhere else is ErrCorrupt.
func (s *Store) loadSegment(no, cycle uint64, closed int64) (*segment, error) {
	path := join(s.dir, segName(no))
	f, err := s.fs.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: the manifest lists it but it is missing", ErrCorrupt, path)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	seg, err := s.scanSegment(f, path, no, cycle, closed)
	if err != nil {
		f.Close()
		return nil, err
	}
	return seg, nil
}

func (s *Store) scanSegment(f vfs.File, path string, no, cycle uint64, closed int64) (*segment, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("snapshot: %s: %w", path, err)
	}
	hb := make([]byte, segHeaderSize)
	if _, err := f.ReadAt(hb, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("snapshot: %s: %w", path, err)
	}
	// The header was synced before the manifest named the file.
	h, err := decodeSegHeader(hb)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, path, err)
	}
	if h.No != no || h.Cycle != cycle || int(h.Disks) != len(s.disks) {
		return nil, fmt.Errorf("%w: %s: header says segment %d at cycle %d of %d disks, the manifest segment %d at cycle %d of %d disks",
			ErrCorrupt, path, h.No, h.Cycle, h.Disks, no, cycle, len(s.disks))
	}
	end := size
	if closed > 0 {
		if size < closed {
			return nil, fmt.Errorf("%w: %s: %d bytes, closed at %d", ErrCorrupt, path, size, closed)
		}
		end = closed
	}
	seg := &segment{no: no, cycle: cycle, salt: h.Salt, path: path, f: f}
	es, good, maxSynced, bad, err := s.scanRecords(f, h.Salt, end)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %s: %w", path, err)
	}
	if bad != nil {
		if closed > 0 {
			return nil, fmt.Errorf("%w: %s: closed segment damaged at %d: %w", ErrCorrupt, path, good, bad)
		}
		if err := cutTornTail(f, h.Salt, good, size, maxSynced, bad); err != nil {
			return nil, fmt.Errorf("snapshot: %s: %w", path, err)
		}
		s.log.Warn("cut the torn tail of the open undo segment", "segment", path, "at", good, "size", size, "err", bad)
	}
	seg.size = good
	seg.idx = sortedIndex(es)
	return seg, nil
}

// scanRecords reads the records of a segment from its header to end. It
// returns the records in file order, the end of the last good one, the
// largest synced watermark among them and, if a record does not verify,
// why (bad). err is an I/O error or damage no crash explains (a record that
// claims to be synced past its own start, or outside the disks).
func (s *Store) scanRecords(f vfs.File, salt uint32, end int64) (es []entry, good, maxSynced int64, bad, err error) {
	maxSynced = segHeaderSize
	sc := recordlog.Scanner[recHeader]{
		HeaderSize: recHeaderSize,
		ReadAhead:  1 << 20,
		Header: func(b []byte, _ int64) (recHeader, int64, bool, error) {
			h, err := decodeRecHeader(b, salt)
			return h, h.size() - recHeaderSize, true, err
		},
		Record: func(h *recHeader, at int64, payload []byte) error {
			if h.Kind == kindData {
				if err := checkRecPayload(h, payload); err != nil {
					return err
				}
			}
			switch {
			case h.Synced > at:
				return fmt.Errorf("%w: record at %d claims %d bytes synced", ErrCorrupt, at, h.Synced)
			case int(h.Disk) >= len(s.disks) || int64(h.Block) >= blocks(s.disks[h.Disk].Size):
				return fmt.Errorf("%w: record at %d for disk %d block %d", ErrCorrupt, at, h.Disk, h.Block)
			}
			l := dataLoc(at)
			if h.Kind == kindZero {
				l = zeroLoc(at)
			}
			es = append(es, entry{blockKey(int(h.Disk), int64(h.Block)), l})
			maxSynced = max(maxSynced, h.Synced)
			return nil
		},
	}
	res, err := sc.Scan(f, segHeaderSize, end)
	if err != nil {
		return nil, 0, 0, nil, err
	}
	return es, res.End, maxSynced, res.Torn, nil
}

// cutTornTail ends the open segment at good, the end of its last record that
// verifies, when what follows is a torn tail: records written after the last
// Sync, which a crash may keep in part and in any order. It is one only if
// nothing shows that a Sync covered it. Every record carries the segment
// size known durable when it was written (synced), so damage at good is in
// the synced part, and ErrCorrupt, when a good record before it claims more
// (maxSynced > good) or any record after it that verifies does (found by
// its magic and salt). Otherwise recordlog.CutTornTail truncates the file at
// good and syncs it.
func cutTornTail(f vfs.File, salt uint32, good, size, maxSynced int64, bad error) error {
	durable := maxSynced
	if durable <= good {
		err := recFormat.Search(f, good, size, func(_ int64, b []byte) bool {
			h, err := decodeRecHeader(b, salt)
			if err == nil && h.Synced > good {
				durable = h.Synced
				return false
			}
			return true
		})
		if err != nil {
			return err
		}
	}
	err := recordlog.CutTornTail(f, good, durable, bad)
	if errors.Is(err, recordlog.ErrCorrupt) {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return err
}

// blocks is the number of blocks of a disk of size bytes (the last may be
// partial).
func blocks(size int64) int64 { return (size + BlockSize - 1) / BlockSize }

// readBlock reads the content a segment holds for block key at loc into
// rec[recHeaderSize:] (rec is dataRecordSize bytes), verifying the record,
// and returns that block.
func (seg *segment) readBlock(key uint64, loc int64, rec []byte) ([]byte, error) {
	b := rec[recHeaderSize:dataRecordSize]
	if isZeroLoc(loc) {
		clear(b)
		return b, nil
	}
	off := locOffset(loc)
	if _, err := seg.f.ReadAt(rec[:dataRecordSize], off); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: %s: record at %d cut short", ErrCorrupt, seg.path, off)
		}
		return nil, fmt.Errorf("snapshot: %s: %w", seg.path, err)
	}
	h, err := decodeRecHeader(rec, seg.salt)
	if err == nil && h.Kind != kindData {
		err = fmt.Errorf("%w: a zero record where the index has data", ErrInvalid)
	}
	if err == nil {
		if d, blk := splitKey(key); int(h.Disk) != d || int64(h.Block) != blk {
			err = fmt.Errorf("%w: record of disk %d block %d where disk %d block %d belongs", ErrInvalid, h.Disk, h.Block, d, blk)
		}
	}
	if err == nil {
		err = checkRecPayload(&h, b)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: record at %d: %w", ErrCorrupt, seg.path, off, err)
	}
	return b, nil
}
