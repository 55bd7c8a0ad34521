package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/vdrepl/vdrepl/internal/recordlog"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

const (
	segmentMagic   = 0x534a4456 // "VDJS" little endian
	segmentVersion = 1
	// segmentHeaderSize is the size of the header at the start of every segment.
	segmentHeaderSize = 32
	segmentSuffix     = ".seg"
)

// segment is one journal file. Its records occupy LSNs [base+header, end).
type segment struct {
	base uint64 // LSN of the segment's first byte (its header)
	f    vfs.File
	name string
	dw   vfs.DirectWriter // f's O_DIRECT writes, nil if it has none
	dr   vfs.DirectReader // f's O_DIRECT reads, nil if it has none
}

func newSegment(base uint64, f vfs.File, name string) *segment {
	s := &segment{base: base, f: f, name: name}
	s.dw, _ = f.(vfs.DirectWriter)
	s.dr, _ = f.(vfs.DirectReader)
	return s
}

func segmentName(dir string, base uint64) string {
	return path.Join(dir, fmt.Sprintf("%016x%s", base, segmentSuffix))
}

func parseSegmentName(name string) (uint64, bool) {
	s, ok := strings.CutSuffix(name, segmentSuffix)
	if !ok || len(s) != 16 {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 16, 64)
	return v, err == nil
}

// segmentFormat frames a segment header: magic, version and the CRC32C of
// bytes 0..27 at 28 (see doc.go).
var segmentFormat = recordlog.Format{Name: "segment header", Magic: segmentMagic, Version: segmentVersion, Size: segmentHeaderSize}

func encodeSegmentHeader(base uint64, created int64) []byte {
	b := make([]byte, segmentHeaderSize)
	binary.LittleEndian.PutUint64(b[8:], base)
	binary.LittleEndian.PutUint64(b[16:], uint64(created))
	segmentFormat.Put(b)
	return b
}

func decodeSegmentHeader(b []byte) (base uint64, err error) {
	if err := segmentFormat.Check(b); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[8:]), nil
}

// freePrefix names segment files kept for reuse. Writing over a file whose
// pages are already in the page cache is many times cheaper than filling new
// pages, so removed segments are recycled (as RocksDB recycles logs). A
// recycled file keeps its old records past the new header; they carry LSNs of
// their old position, so a scan takes the first of them for the end.
const freePrefix = "free-"

// createSegment makes a new, durable segment starting at base whose records
// area is empty: the header is written to a temporary (or recycled) file,
// synced, renamed into place and the directory synced, so a crash leaves
// either no segment or a valid empty one.
//
// A new file (not a recycled one) is first preallocated to size bytes where
// the filesystem can: appends then overwrite allocated blocks inside the file
// instead of extending it, which ext4 serialises for O_DIRECT writes. It is
// best effort: a journal in a file that is not preallocated works the same.
func createSegment(fsys vfs.FS, dir string, base uint64, now int64, recycled string, size int64) (*segment, error) {
	name := segmentName(dir, base)
	tmp := name + ".tmp"
	flags := os.O_RDWR | os.O_CREATE | os.O_TRUNC
	if recycled != "" {
		tmp, flags = recycled, os.O_RDWR
	}
	f, err := fsys.OpenFile(tmp, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("journal: create segment: %w", err)
	}
	fail := func(err error) (*segment, error) {
		f.Close()
		fsys.Remove(tmp)
		return nil, fmt.Errorf("journal: create segment %s: %w", name, err)
	}
	if a, ok := f.(vfs.Allocator); ok && recycled == "" {
		a.Allocate(0, size) // best effort, see above
	}
	if _, err := f.WriteAt(encodeSegmentHeader(base, now), 0); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return fail(err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fail(err)
	}
	return newSegment(base, f, name), nil
}

func openSegment(fsys vfs.FS, dir string, base uint64) (*segment, error) {
	name := segmentName(dir, base)
	f, err := fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("journal: open segment: %w", err)
	}
	hdr := make([]byte, segmentHeaderSize)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("journal: segment %s: %w: %v", name, ErrInvalid, err)
	}
	got, err := decodeSegmentHeader(hdr)
	if err == nil && got != base {
		err = fmt.Errorf("%w: segment %s says base %#x", ErrInvalid, name, got)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("journal: segment %s: %w", name, err)
	}
	return newSegment(base, f, name), nil
}

// listFree returns the recycled segment files in dir.
func listFree(fsys vfs.FS, dir string) ([]string, error) {
	names, err := fsys.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var free []string
	for _, n := range names {
		if strings.HasPrefix(n, freePrefix) {
			free = append(free, path.Join(dir, n))
		}
	}
	return free, nil
}

// listSegments returns the bases of the segments in dir, ascending, and removes
// leftover temporary files of interrupted segment creation.
func listSegments(fsys vfs.FS, dir string) ([]uint64, error) {
	names, err := fsys.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var bases []uint64
	for _, n := range names {
		if strings.HasPrefix(n, freePrefix) {
			continue
		}
		if strings.HasSuffix(n, segmentSuffix+".tmp") {
			if err := fsys.Remove(path.Join(dir, n)); err != nil {
				return nil, err
			}
			continue
		}
		if b, ok := parseSegmentName(n); ok {
			bases = append(bases, b)
		}
	}
	return bases, nil // ReadDir is sorted and names are fixed-width hex
}

// scanResult is what scanning one segment found.
type scanResult struct {
	end       uint64 // LSN just past the last valid record
	maxSynced uint64 // largest Synced field among valid records
	torn      error  // why scanning stopped before the file's end (nil at a clean end)
	// tornHeader is the header of the record at end when that header
	// verified (magic, version, LSN, header CRC) but its payload did not, or
	// was cut short: a record that was written, maybe synced and written
	// back, and damaged or torn since. Nil for any other stop.
	tornHeader *Header
	// beyond are the write records whose headers verify at their own LSN
	// past the one that stopped the scan (syncedBeyond found them).
	beyond []Header
}

// scanSegment reads the records of seg in order, calling fn for each valid one
// (pads excepted) with its payload when withPayload(h) says so (nil payload otherwise; the
// payload checksum is verified either way when read). It stops at the end of
// the file or at the first record that does not verify; that is not an error
// here, the caller decides with recoverTail whether it was a torn tail or
// corruption. An error from fn or from reading the file is returned, and so
// is a record of an unsupported version.
func scanSegment(seg *segment, size int64, withPayload func(*Header) bool, fn func(Header, []byte) error) (scanResult, error) {
	var (
		res    scanResult
		fnErr  error
		last   Header // the last header that verified
		lastAt int64  // and where, -1 for none
	)
	lastAt = -1
	sc := recordlog.Scanner[Header]{
		HeaderSize: HeaderSize,
		Header: func(b []byte, at int64) (Header, int64, bool, error) {
			h, err := decodeHeader(b)
			if err == nil && h.LSN != seg.base+uint64(at) {
				err = fmt.Errorf("%w: record says LSN %#x at %#x", ErrInvalid, h.LSN, seg.base+uint64(at))
			}
			if err != nil {
				return h, 0, false, err
			}
			last, lastAt = h, at
			n := h.PayloadLen()
			return h, n, n > 0 && (h.Kind == KindSeal || h.Kind == KindPad || withPayload(&h)), nil
		},
		Record: func(h *Header, _ int64, p []byte) error {
			if p != nil {
				if err := checkPayload(h, p); err != nil {
					res.maxSynced = max(res.maxSynced, h.Synced)
					return err
				}
			}
			if h.Kind != KindPad {
				if fnErr = fn(*h, p); fnErr != nil {
					return fnErr
				}
			}
			res.maxSynced = max(res.maxSynced, h.Synced)
			return nil
		},
	}
	r, err := sc.Scan(seg.f, segmentHeaderSize, size)
	res.end = seg.base + uint64(r.End)
	switch {
	case fnErr != nil:
		return res, fnErr
	case err != nil:
		return res, fmt.Errorf("journal: read %s: %w", seg.name, err)
	case errors.Is(r.Torn, ErrVersion):
		return res, r.Torn
	case r.Torn != nil:
		res.torn = r.Torn
		if lastAt == r.End {
			res.tornHeader = &last
		}
		return res, syncedBeyond(seg, r.End, size, &res)
	}
	return res, nil
}

// syncedBeyond looks past the record at bad, which does not verify, for any
// valid record header further on and raises res.maxSynced to the largest
// Synced it finds: if a later record says a sync covered the damaged spot,
// the damage is in durable data. The write records it finds go to
// res.beyond. Only damaged journals pay for this search.
func syncedBeyond(seg *segment, bad, size int64, res *scanResult) error {
	err := recordFormat.Search(seg.f, bad, size, func(at int64, b []byte) bool {
		h, err := decodeHeader(b)
		if err == nil && h.LSN == seg.base+uint64(at) {
			res.maxSynced = max(res.maxSynced, h.Synced)
			if h.Kind == KindWrite {
				res.beyond = append(res.beyond, h)
			}
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("journal: read %s: %w", seg.name, err)
	}
	return nil
}

// recoverTail decides what a scan that stopped early means, with
// recordlog.CutTornTail. A record that does not verify at or beyond the
// durable watermark (the largest Synced any valid record carried) is the
// torn tail of a crash: nothing there was ever promised durable, so the
// segment is cut back to its last valid record. One below the watermark sits
// in data a sync had covered: that is corruption, and the journal refuses to
// guess.
func recoverTail(seg *segment, res scanResult, durable uint64) error {
	good := int64(res.end - seg.base)
	synced := int64(max(durable, seg.base) - seg.base)
	err := recordlog.CutTornTail(seg.f, good, synced, res.torn)
	if errors.Is(err, recordlog.ErrCorrupt) {
		return fmt.Errorf("%w: segment %s at LSN %#x (durable through %#x): %w", ErrCorrupt, seg.name, res.end, durable, err)
	}
	if err != nil {
		return fmt.Errorf("journal: %s: %w", seg.name, err)
	}
	return nil
}
