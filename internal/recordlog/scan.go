package recordlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// A Scanner reads the records of one log format from a segment. H is the
// format's decoded header.
type Scanner[H any] struct {
	// HeaderSize is the size of a record header.
	HeaderSize int
	// ReadAhead, if positive, reads the segment in pieces of up to that
	// many bytes and takes headers and payloads from them: for logs of small
	// records read whole. At 0 each header and each wanted payload is read
	// on its own, so payloads not wanted are never read.
	ReadAhead int
	// Header decodes and checks the header b found at offset at. It returns
	// the header, the size of the payload that follows it and whether Scan
	// should read that payload.
	Header func(b []byte, at int64) (h H, payload int64, read bool, err error)
	// Record takes a record whose header verified, with its payload if it
	// was read (nil otherwise; valid only during the call). It checks the
	// payload (CheckPayload) and consumes the record.
	Record func(h *H, at int64, payload []byte) error
}

// Result is where a scan of a segment stopped.
type Result struct {
	End  int64 // offset just past the last record that verified
	Torn error // why the scan stopped before its end; nil if it reached it
}

// torn reports whether err says a record does not verify, as a torn tail
// would (or damage, which CutTornTail tells apart).
func torn(err error) bool {
	return errors.Is(err, ErrZeroed) || errors.Is(err, ErrInvalid) || errors.Is(err, ErrVersion)
}

// Scan reads the records in [start, end) of r in order. It stops at end, or
// at the first record that does not verify: an error from Header or Record
// that wraps ErrZeroed, ErrInvalid or ErrVersion, a header cut short by end,
// or a record running past it. That is not an error here: the Result says
// where and why, and the caller decides with CutTornTail (or its own rules
// for ErrVersion) whether it is a torn tail. Any other error, from reading r
// or from the callbacks, ends Scan and is returned as it is.
func (s *Scanner[H]) Scan(r io.ReaderAt, start, end int64) (Result, error) {
	res := Result{End: start}
	rd := reader{r: r, end: end}
	if s.ReadAhead > 0 {
		rd.buf = make([]byte, s.ReadAhead)
	}
	hs := int64(s.HeaderSize)
	hdr := make([]byte, hs)
	var buf []byte
	for pos := start; pos < end; {
		if end-pos < hs {
			res.Torn = fmt.Errorf("%w: %d stray bytes at end", ErrInvalid, end-pos)
			return res, nil
		}
		if err := rd.readAt(hdr, pos); err != nil {
			return res, err
		}
		h, n, read, err := s.Header(hdr, pos)
		if err == nil && (n < 0 || n > end-pos-hs) {
			err = fmt.Errorf("%w: record of %d payload bytes runs past the end", ErrInvalid, n)
		}
		if err != nil {
			if torn(err) {
				res.Torn = err
				return res, nil
			}
			return res, err
		}
		var payload []byte
		if read && n > 0 {
			if int64(cap(buf)) < n {
				buf = make([]byte, n)
			}
			payload = buf[:n]
			if err := rd.readAt(payload, pos+hs); err != nil {
				return res, err
			}
		}
		if err := s.Record(&h, pos, payload); err != nil {
			if torn(err) {
				res.Torn = err
				return res, nil
			}
			return res, err
		}
		pos += hs + n
		res.End = pos
	}
	return res, nil
}

// reader reads a segment below end for Scan, through a read-ahead window
// when buf is set.
type reader struct {
	r   io.ReaderAt
	end int64
	buf []byte // the window; nil for none
	off int64  // offset of buf[0]
	n   int    // bytes of buf that hold data
}

// readAt fills p from offset at; at+len(p) is at most end.
func (rd *reader) readAt(p []byte, at int64) error {
	if len(p) > len(rd.buf) {
		return readFull(rd.r, p, at)
	}
	if at < rd.off || at+int64(len(p)) > rd.off+int64(rd.n) {
		rd.off, rd.n = at, int(min(int64(len(rd.buf)), rd.end-at))
		if err := readFull(rd.r, rd.buf[:rd.n], at); err != nil {
			rd.n = 0
			return err
		}
	}
	copy(p, rd.buf[at-rd.off:])
	return nil
}

func readFull(r io.ReaderAt, p []byte, at int64) error {
	n, err := r.ReadAt(p, at)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// searchChunk is how much Search reads at a time.
const searchChunk = 1 << 20

// Search looks in r past offset after, below end, for every offset where
// f's magic begins and a whole header fits, in order, and calls fn with the
// offset and the Size bytes there until fn returns false. After a record
// that does not verify the next record boundary is unknown, so this is how
// a log finds the records that follow damage (and what they say was
// synced). It reads every byte once; only damaged logs pay for it.
func (f Format) Search(r io.ReaderAt, after, end int64, fn func(at int64, hdr []byte) bool) error {
	var magic [4]byte
	binary.LittleEndian.PutUint32(magic[:], f.Magic)
	size := int64(f.Size)
	buf := make([]byte, searchChunk+size)
	for off := after + 1; off+size <= end; off += searchChunk {
		n, err := r.ReadAt(buf[:min(int64(len(buf)), end-off)], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		b := buf[:n]
		for i := 0; i < searchChunk; i++ {
			k := bytes.Index(b[i:], magic[:])
			if k < 0 {
				break
			}
			if i += k; i >= searchChunk || i+f.Size > len(b) {
				break
			}
			if !fn(off+int64(i), b[i:i+f.Size]) {
				return nil
			}
		}
	}
	return nil
}

// Truncater is what CutTornTail needs of a segment file.
type Truncater interface {
	Truncate(size int64) error
	Sync() error
}

// CutTornTail is torn-tail recovery: it ends a segment whose scan stopped
// at good, the end of its last record that verifies, because of why (a
// Result's End and Torn). durable is the offset of the segment known
// synced: the largest synced offset any record that verifies says, before
// good or after it (see Search). Below durable, the bad record sat in data
// a sync had covered: CutTornTail returns ErrCorrupt (wrapping why) and
// changes nothing. At or past it, what follows good is a torn tail, written
// after the last sync and kept in part by a crash: the file is truncated at
// good and synced. With why nil the scan reached its end and there is
// nothing to cut.
func CutTornTail(f Truncater, good, durable int64, why error) error {
	if why == nil {
		return nil
	}
	if good < durable {
		return fmt.Errorf("%w: at %d, synced through %d: %w", ErrCorrupt, good, durable, why)
	}
	if err := f.Truncate(good); err != nil {
		return fmt.Errorf("recordlog: cut torn tail at %d: %w", good, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("recordlog: sync after cutting torn tail at %d: %w", good, err)
	}
	return nil
}
