package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

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

func encodeSegmentHeader(base uint64, created int64) []byte {
	b := make([]byte, segmentHeaderSize)
	binary.LittleEndian.PutUint32(b[0:], segmentMagic)
	b[4] = segmentVersion
	binary.LittleEndian.PutUint64(b[8:], base)
	binary.LittleEndian.PutUint64(b[16:], uint64(created))
	binary.LittleEndian.PutUint32(b[28:], crc(b[:28]))
	return b
}

func decodeSegmentHeader(b []byte) (base uint64, err error) {
	if len(b) < segmentHeaderSize {
		return 0, fmt.Errorf("%w: short segment header", ErrInvalid)
	}
	if binary.LittleEndian.Uint32(b[0:]) != segmentMagic {
		return 0, fmt.Errorf("%w: bad segment magic", ErrInvalid)
	}
	if binary.LittleEndian.Uint32(b[28:]) != crc(b[:28]) {
		return 0, fmt.Errorf("%w: segment header checksum", ErrInvalid)
	}
	if b[4] != segmentVersion {
		return 0, fmt.Errorf("%w: segment version %d (supported: %d)", ErrVersion, b[4], segmentVersion)
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
}

// scanSegment reads the records of seg in order, calling fn for each valid one
// (pads excepted) with its payload when withPayload(h) says so (nil payload otherwise; the
// payload checksum is verified either way when read). It stops at the end of
// the file or at the first record that does not verify; that is not an error
// here, the caller decides with recoverTail whether it was a torn tail or
// corruption. An error from fn or from reading the file is returned.
func scanSegment(seg *segment, size int64, withPayload func(*Header) bool, fn func(Header, []byte) error) (scanResult, error) {
	res := scanResult{end: seg.base + segmentHeaderSize}
	pos := int64(segmentHeaderSize)
	hdr := make([]byte, HeaderSize)
	var payload []byte
	for pos < size {
		if size-pos < HeaderSize {
			res.torn = fmt.Errorf("%w: %d stray bytes at end", ErrInvalid, size-pos)
			return res, nil
		}
		if _, err := seg.f.ReadAt(hdr, pos); err != nil {
			return res, fmt.Errorf("journal: read %s: %w", seg.name, err)
		}
		h, err := decodeHeader(hdr)
		if err == nil && h.LSN != seg.base+uint64(pos) {
			err = fmt.Errorf("%w: record says LSN %#x at %#x", ErrInvalid, h.LSN, seg.base+uint64(pos))
		}
		if err == nil && pos+h.Size() > size {
			err = fmt.Errorf("%w: record runs past end of file", ErrInvalid)
		}
		if err != nil {
			if errors.Is(err, ErrVersion) {
				return res, err
			}
			res.torn = err
			return res, syncedBeyond(seg, pos+1, size, &res)
		}
		var p []byte
		if n := h.PayloadLen(); n > 0 && (h.Kind == KindSeal || h.Kind == KindPad || withPayload(&h)) {
			if int64(cap(payload)) < n {
				payload = make([]byte, n)
			}
			p = payload[:n]
			if _, err := seg.f.ReadAt(p, pos+HeaderSize); err != nil && !errors.Is(err, io.EOF) {
				return res, fmt.Errorf("journal: read %s: %w", seg.name, err)
			}
			if err := checkPayload(&h, p); err != nil {
				res.torn = err
				res.maxSynced = max(res.maxSynced, h.Synced)
				return res, syncedBeyond(seg, pos+1, size, &res)
			}
		}
		if h.Kind != KindPad {
			if err := fn(h, p); err != nil {
				return res, err
			}
		}
		res.maxSynced = max(res.maxSynced, h.Synced)
		pos += h.Size()
		res.end = seg.base + uint64(pos)
	}
	return res, nil
}

var recordMagicBytes = []byte("VDJR")

// syncedBeyond looks past a record that does not verify for any valid record
// header further on and raises res.maxSynced to the largest Synced it finds:
// if a later record says a sync covered the damaged spot, the damage is in
// durable data. Only damaged journals pay for this byte-by-byte search.
func syncedBeyond(seg *segment, from, size int64, res *scanResult) error {
	const chunk = 1 << 20
	buf := make([]byte, chunk+HeaderSize)
	for off := from; off < size; off += chunk {
		n, err := seg.f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("journal: read %s: %w", seg.name, err)
		}
		b := buf[:n]
		for i := 0; i+HeaderSize <= len(b) && i < chunk; i++ {
			k := bytes.Index(b[i:], recordMagicBytes)
			if k < 0 {
				break
			}
			if i += k; i+HeaderSize > len(b) || i >= chunk {
				break
			}
			h, err := decodeHeader(b[i : i+HeaderSize])
			if err == nil && h.LSN == seg.base+uint64(off)+uint64(i) {
				res.maxSynced = max(res.maxSynced, h.Synced)
			}
		}
	}
	return nil
}

// recoverTail decides what a scan that stopped early means. A record that does
// not verify at or beyond the durable watermark (the largest Synced any valid
// record carried) is the torn tail of a crash: nothing there was ever promised
// durable, so the segment is cut back to its last valid record. One below the
// watermark sits in data a sync had covered: that is corruption, and the
// journal refuses to guess.
func recoverTail(seg *segment, res scanResult, durable uint64) error {
	if res.torn == nil {
		return nil
	}
	if res.end < durable {
		return fmt.Errorf("%w: segment %s at LSN %#x (durable through %#x): %v",
			ErrCorrupt, seg.name, res.end, durable, res.torn)
	}
	if err := seg.f.Truncate(int64(res.end - seg.base)); err != nil {
		return fmt.Errorf("journal: truncate torn tail of %s: %w", seg.name, err)
	}
	if err := seg.f.Sync(); err != nil {
		return fmt.Errorf("journal: sync %s: %w", seg.name, err)
	}
	return nil
}
