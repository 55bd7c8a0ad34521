package wire

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"sync"
	"unsafe"

	"github.com/klauspost/compress/zstd"
	"lukechampine.com/blake3"
)

// FrameType is the type of a stream frame.
type FrameType uint8

// Frame types. The first four equal the journal's record kinds.
const (
	FrameData      FrameType = 1
	FrameTrim      FrameType = 2
	FrameZero      FrameType = 3
	FrameZeroAlloc FrameType = 4
	FrameEnd       FrameType = 255
)

func (t FrameType) String() string {
	switch t {
	case FrameData:
		return "data"
	case FrameTrim:
		return "trim"
	case FrameZero:
		return "zero"
	case FrameZeroAlloc:
		return "zero-alloc"
	case FrameEnd:
		return "end"
	}
	return fmt.Sprintf("frame-type-%d", uint8(t))
}

const (
	streamMagic   = 0x53574456 // "VDWS" little endian
	streamVersion = 1
	// StreamHeaderSize is the fixed part of the stream header.
	StreamHeaderSize = 16
	// FrameHeaderSize is the size of a frame header.
	FrameHeaderSize = 32
	maxJSONHeader   = 1 << 20
	endPayloadSize  = 48
	flagZstd        = 1
	batchSize       = 256 << 10
)

// Errors of the stream reader.
var (
	ErrCorrupt   = errors.New("wire: corrupt stream")
	ErrTruncated = errors.New("wire: truncated stream")
	ErrVersion   = errors.New("wire: unsupported stream version")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// CRC is the CRC32C of b, the checksum of chunks and frames.
func CRC(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// UpdateCRC is the CRC32C of the bytes crc covers followed by b, so a
// chunk's checksum can be computed piece by piece while its bytes are hot.
func UpdateCRC(crc uint32, b []byte) uint32 { return crc32.Update(crc, castagnoli, b) }

// Frame is one decoded frame. Data is valid until the next call to Next.
type Frame struct {
	Type   FrameType
	Disk   int
	Offset int64
	Length int64
	Data   []byte
}

// zstd coders are expensive to make and safe for concurrent EncodeAll and
// DecodeAll, so the package shares one of each.
var (
	encOnce sync.Once
	enc     *zstd.Encoder
	decOnce sync.Once
	dec     *zstd.Decoder
)

func encoder() *zstd.Encoder {
	encOnce.Do(func() {
		// SpeedFastest: the wire is rarely slower than zstd's default level on
		// two cores, and fast keeps up with a guest writing at disk speed.
		enc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	})
	return enc
}

func decoder() *zstd.Decoder {
	decOnce.Do(func() {
		dec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxFrameData*2))
	})
	return dec
}

// Writer writes a stream. It is not safe for concurrent use.
type Writer struct {
	w        io.Writer
	h        hash.Hash
	compress bool
	frames   int64
	data     int64
	written  int64
	stored   int64
	hdr      [FrameHeaderSize]byte
	zbuf     []byte
	batch    []byte
	closed   bool
	disks    []Disk
}

// NewWriter writes the stream header for h to w. With compress, data frames
// are zstd-compressed where that makes them smaller.
func NewWriter(w io.Writer, h Header, compress bool) (*Writer, error) {
	js, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("wire: encode header: %w", err)
	}
	sw := &Writer{w: w, h: blake3.New(32, nil), compress: compress, disks: h.Disks}
	b := make([]byte, StreamHeaderSize+len(js))
	binary.LittleEndian.PutUint32(b[0:], streamMagic)
	b[4] = streamVersion
	binary.LittleEndian.PutUint32(b[8:], uint32(len(js)))
	binary.LittleEndian.PutUint32(b[12:], CRC(js))
	copy(b[StreamHeaderSize:], js)
	if err := sw.emit(b); err != nil {
		return nil, err
	}
	if err := sw.flush(); err != nil {
		return nil, err
	}
	return sw, nil
}

// emit adds b to the stream. Small frames are gathered into batches of
// batchSize: BLAKE3 hashes large inputs several times faster than a 32-byte
// header and a 4 KiB block at a time, and the writer sees fewer calls.
func (w *Writer) emit(b []byte) error {
	w.written += int64(len(b))
	if len(w.batch)+len(b) > batchSize {
		if err := w.flush(); err != nil {
			return err
		}
	}
	if len(b) >= batchSize {
		w.h.Write(b)
		if _, err := w.w.Write(b); err != nil {
			return fmt.Errorf("wire: write: %w", err)
		}
		return nil
	}
	w.batch = append(w.batch, b...)
	return nil
}

func (w *Writer) flush() error {
	if len(w.batch) == 0 {
		return nil
	}
	w.h.Write(w.batch)
	_, err := w.w.Write(w.batch)
	w.batch = w.batch[:0]
	if err != nil {
		return fmt.Errorf("wire: write: %w", err)
	}
	return nil
}

func (w *Writer) check(disk int, off, n int64) error {
	if w.closed {
		return errors.New("wire: write after Close")
	}
	if disk < 0 || disk >= len(w.disks) || off < 0 || n < 0 || off+n > w.disks[disk].Size {
		return fmt.Errorf("wire: frame disk %d [%d, +%d) outside the stream's disks", disk, off, n)
	}
	return nil
}

func (w *Writer) frame(t FrameType, flags uint8, disk int, off, n int64, payload []byte) error {
	b := w.hdr[:]
	b[0] = byte(t)
	b[1] = flags
	binary.LittleEndian.PutUint16(b[2:], uint16(disk))
	binary.LittleEndian.PutUint32(b[4:], uint32(len(payload)))
	binary.LittleEndian.PutUint64(b[8:], uint64(off))
	binary.LittleEndian.PutUint64(b[16:], uint64(n))
	binary.LittleEndian.PutUint32(b[24:], CRC(payload))
	binary.LittleEndian.PutUint32(b[28:], CRC(b[:28]))
	if err := w.emit(b); err != nil {
		return err
	}
	if len(payload) > 0 {
		if err := w.emit(payload); err != nil {
			return err
		}
	}
	if t != FrameEnd {
		w.frames++
	}
	return nil
}

// Data writes p, the content of disk at off, as one or more data frames.
func (w *Writer) Data(disk int, off int64, p []byte) error {
	if err := w.check(disk, off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		n := min(len(p), MaxFrameData)
		payload, flags := p[:n], uint8(0)
		if w.compress {
			w.zbuf = encoder().EncodeAll(payload, w.zbuf[:0])
			if len(w.zbuf) < n {
				payload, flags = w.zbuf, flagZstd
			}
		}
		if err := w.frame(FrameData, flags, disk, off, int64(n), payload); err != nil {
			return err
		}
		w.data += int64(n)
		w.stored += int64(len(payload))
		off += int64(n)
		p = p[n:]
	}
	return nil
}

// Range writes a trim or zero frame for [off, off+n) of disk.
func (w *Writer) Range(t FrameType, disk int, off, n int64) error {
	if t != FrameTrim && t != FrameZero && t != FrameZeroAlloc {
		return fmt.Errorf("wire: Range of a %s frame", t)
	}
	if err := w.check(disk, off, n); err != nil {
		return err
	}
	return w.frame(t, 0, disk, off, n, nil)
}

// Close writes the end frame. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.closed {
		return nil
	}
	if err := w.flush(); err != nil {
		return err
	}
	var p [endPayloadSize]byte
	binary.LittleEndian.PutUint64(p[0:], uint64(w.frames))
	binary.LittleEndian.PutUint64(p[8:], uint64(w.data))
	w.h.Sum(p[16:16])
	w.closed = true
	if err := w.frame(FrameEnd, 0, 0, 0, 0, p[:]); err != nil {
		return err
	}
	return w.flush()
}

// Stats reports the frames written (end frame excluded), the disk bytes their
// data frames carry, the data bytes as stored (after compression) and the
// stream bytes written so far (handed to the underlying writer by Close).
func (w *Writer) Stats() (frames, data, stored, written int64) {
	return w.frames, w.data, w.stored, w.written
}

// checker holds the checks of a stream reader, shared by Reader (which
// pulls bytes from an io.Reader) and Verifier (which is pushed them).
type checker struct {
	h      hash.Hash // nil: the stream hash is not checked (Reader.SkipHash)
	hdr    Header
	frames int64
	data   int64
	out    []byte
	pend   []byte // frame bytes not hashed yet
	sum    []byte // the hash of the bytes before the end frame, once seen
}

func newChecker() checker { return checker{h: blake3.New(32, nil)} }

// fixed checks the fixed part of the stream header and returns the length
// of the JSON header.
func (c *checker) fixed(b []byte) (int, error) {
	c.write(b)
	if binary.LittleEndian.Uint32(b[0:]) != streamMagic {
		return 0, fmt.Errorf("%w: bad magic", ErrCorrupt)
	}
	if b[4] != streamVersion {
		return 0, fmt.Errorf("%w: version %d (this vdrepl reads %d)", ErrVersion, b[4], streamVersion)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxJSONHeader {
		return 0, fmt.Errorf("%w: header of %d bytes", ErrCorrupt, n)
	}
	return int(n), nil
}

// json checks the JSON header js against the CRC in the fixed part.
func (c *checker) json(fixed, js []byte) error {
	c.write(js)
	if CRC(js) != binary.LittleEndian.Uint32(fixed[12:]) {
		return fmt.Errorf("%w: header checksum mismatch", ErrCorrupt)
	}
	if err := json.Unmarshal(js, &c.hdr); err != nil {
		return fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	return nil
}

func (c *checker) write(p []byte) {
	if c.h != nil {
		c.h.Write(p)
	}
}

// hash feeds frame bytes to the stream hash in batches (see Writer.emit).
func (c *checker) hash(p []byte) {
	if c.h == nil {
		return
	}
	if len(c.pend)+len(p) > batchSize {
		c.h.Write(c.pend)
		c.pend = c.pend[:0]
	}
	if len(p) >= batchSize {
		c.h.Write(p)
		return
	}
	c.pend = append(c.pend, p...)
}

// frameHeader checks a frame header and returns its stored payload length.
func (c *checker) frameHeader(b []byte) (int, error) {
	if CRC(b[:28]) != binary.LittleEndian.Uint32(b[28:]) {
		return 0, fmt.Errorf("%w: frame %d header checksum mismatch", ErrCorrupt, c.frames)
	}
	if FrameType(b[0]) == FrameEnd {
		if c.h != nil {
			c.h.Write(c.pend) // the hash covers everything before the end frame
			c.pend = c.pend[:0]
			c.sum = c.h.Sum(nil)
		}
	} else {
		c.hash(b)
	}
	stored := binary.LittleEndian.Uint32(b[4:])
	if stored > MaxStored {
		return 0, fmt.Errorf("%w: frame %d payload of %d bytes", ErrCorrupt, c.frames, stored)
	}
	return int(stored), nil
}

// frame checks the payload of the frame whose header is b. The end frame
// is returned as a Frame of type FrameEnd once its counts and hash check.
func (c *checker) frame(b, payload []byte) (Frame, error) {
	f := Frame{
		Type:   FrameType(b[0]),
		Disk:   int(binary.LittleEndian.Uint16(b[2:])),
		Offset: int64(binary.LittleEndian.Uint64(b[8:])),
		Length: int64(binary.LittleEndian.Uint64(b[16:])),
	}
	if f.Type != FrameEnd {
		c.hash(payload)
	}
	if CRC(payload) != binary.LittleEndian.Uint32(b[24:]) {
		return Frame{}, fmt.Errorf("%w: frame %d payload checksum mismatch", ErrCorrupt, c.frames)
	}
	if f.Type == FrameEnd {
		return f, c.end(payload)
	}
	if f.Disk >= len(c.hdr.Disks) || f.Offset < 0 || f.Length < 0 || f.Offset+f.Length > c.hdr.Disks[f.Disk].Size || f.Offset+f.Length < f.Offset {
		return Frame{}, fmt.Errorf("%w: frame %d: disk %d [%d, +%d) outside the stream's disks", ErrCorrupt, c.frames, f.Disk, f.Offset, f.Length)
	}
	switch f.Type {
	case FrameData:
		if f.Length > MaxFrameData {
			return Frame{}, fmt.Errorf("%w: frame %d: data frame of %d bytes", ErrCorrupt, c.frames, f.Length)
		}
		if b[1]&flagZstd != 0 {
			out, err := decoder().DecodeAll(payload, c.out[:0])
			if err != nil {
				return Frame{}, fmt.Errorf("%w: frame %d: %v", ErrCorrupt, c.frames, err)
			}
			c.out = out
			payload = out
		}
		if int64(len(payload)) != f.Length {
			return Frame{}, fmt.Errorf("%w: frame %d: %d data bytes for a length of %d", ErrCorrupt, c.frames, len(payload), f.Length)
		}
		f.Data = payload
		c.data += f.Length
	case FrameTrim, FrameZero, FrameZeroAlloc:
		if len(payload) != 0 {
			return Frame{}, fmt.Errorf("%w: frame %d: %s frame with a payload", ErrCorrupt, c.frames, f.Type)
		}
	default:
		return Frame{}, fmt.Errorf("%w: frame %d: unknown type %d", ErrCorrupt, c.frames, b[0])
	}
	c.frames++
	return f, nil
}

func (c *checker) end(p []byte) error {
	if len(p) != endPayloadSize {
		return fmt.Errorf("%w: end frame of %d bytes", ErrCorrupt, len(p))
	}
	if n := int64(binary.LittleEndian.Uint64(p[0:])); n != c.frames {
		return fmt.Errorf("%w: end frame counts %d frames, stream has %d", ErrCorrupt, n, c.frames)
	}
	if n := int64(binary.LittleEndian.Uint64(p[8:])); n != c.data {
		return fmt.Errorf("%w: end frame counts %d data bytes, stream has %d", ErrCorrupt, n, c.data)
	}
	if c.h != nil && string(p[16:]) != string(c.sum) {
		return fmt.Errorf("%w: stream hash mismatch", ErrCorrupt)
	}
	return nil
}

// Reader reads and verifies a stream. It is not safe for concurrent use.
type Reader struct {
	r    *bufio.Reader
	c    checker
	buf  []byte
	done bool
	err  error
}

// NewReader reads and checks the stream header from r.
func NewReader(r io.Reader) (*Reader, error) {
	sr := &Reader{r: bufio.NewReaderSize(r, 256<<10), c: newChecker()}
	var fixed [StreamHeaderSize]byte
	if err := sr.read(fixed[:]); err != nil {
		return nil, err
	}
	n, err := sr.c.fixed(fixed[:])
	if err != nil {
		return nil, err
	}
	js := make([]byte, n)
	if err := sr.read(js); err != nil {
		return nil, err
	}
	if err := sr.c.json(fixed[:], js); err != nil {
		return nil, err
	}
	return sr, nil
}

// SkipHash stops the reader from computing the stream's BLAKE3 hash: every
// frame's CRC32C and the end frame's counts are still checked, the hash in
// the end frame is not. For a stream a Verifier (or another Reader) already
// verified whole, when the end hash would only be checked after the frames
// it covers were used. Call it before the first Next.
func (r *Reader) SkipHash() { r.c.h = nil }

// read fills p from the stream; EOF is truncation. The caller hashes.
func (r *Reader) read(p []byte) error {
	if _, err := io.ReadFull(r.r, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return ErrTruncated
		}
		return fmt.Errorf("wire: read: %w", err)
	}
	return nil
}

// Header is the stream's header.
func (r *Reader) Header() Header { return r.c.hdr }

// Next returns the next frame. It returns io.EOF only after the end frame
// verified (frame count, data bytes and the hash of the whole stream).
func (r *Reader) Next() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.next()
	if err != nil {
		r.err = err
	}
	return f, err
}

func (r *Reader) next() (Frame, error) {
	if r.done {
		return Frame{}, io.EOF
	}
	var b [FrameHeaderSize]byte
	if err := r.read(b[:]); err != nil {
		return Frame{}, err
	}
	stored, err := r.c.frameHeader(b[:])
	if err != nil {
		return Frame{}, err
	}
	if cap(r.buf) < stored {
		r.buf = alignedBuffer(MaxStored)
	}
	payload := r.buf[:stored]
	if err := r.read(payload); err != nil {
		return Frame{}, err
	}
	f, err := r.c.frame(b[:], payload)
	if err != nil {
		return Frame{}, err
	}
	if f.Type == FrameEnd {
		// Nothing may follow the end frame.
		if _, err := r.r.ReadByte(); err == nil {
			return Frame{}, fmt.Errorf("%w: bytes after the end frame", ErrCorrupt)
		}
		r.done = true
		return Frame{}, io.EOF
	}
	return f, nil
}

// alignedBuffer returns n bytes starting at a 4096-aligned address, so the
// Data of an uncompressed data frame can be written with O_DIRECT as it is.
func alignedBuffer(n int) []byte {
	const align = 4096
	b := make([]byte, n+align)
	pad := (align - int(uintptr(unsafe.Pointer(&b[0]))%align)) % align
	return b[pad : pad+n : pad+n]
}

// Verifier checks a stream written to it piece by piece, as it arrives
// (the replica feeds it each staged chunk), with the same checks as a
// Reader: Done then tells whether what was written is a whole, valid
// stream. It keeps at most one frame in memory. It is not safe for
// concurrent use.
type Verifier struct {
	c       checker
	n       int64 // bytes written
	need    int   // bytes the current part still lacks
	part    []byte
	fixedb  [StreamHeaderSize]byte
	frameb  [FrameHeaderSize]byte
	state   int
	headerd bool
	err     error
}

// Verifier states: the part being gathered.
const (
	vFixed = iota
	vJSON
	vFrameHeader
	vPayload
	vDone
)

// NewVerifier returns a Verifier at the start of a stream.
func NewVerifier() *Verifier {
	return &Verifier{c: newChecker(), need: StreamHeaderSize}
}

// Written is the number of stream bytes written so far.
func (v *Verifier) Written() int64 { return v.n }

// Write takes the next bytes of the stream. It fails, and keeps failing,
// once they cannot be part of a valid stream.
func (v *Verifier) Write(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	total := len(p)
	for len(p) > 0 {
		if v.state == vDone {
			v.err = fmt.Errorf("%w: bytes after the end frame", ErrCorrupt)
			return 0, v.err
		}
		k := min(v.need, len(p))
		var part []byte
		if len(v.part) == 0 && k == v.need {
			part = p[:k] // the whole part is here: no copy
		} else {
			v.part = append(v.part, p[:k]...)
			if k == v.need {
				part = v.part
			}
		}
		v.need -= k
		v.n += int64(k)
		p = p[k:]
		if v.need > 0 {
			continue
		}
		err := v.step(part)
		v.part = v.part[:0]
		if err != nil {
			v.err = err
			return 0, err
		}
	}
	return total, nil
}

// step handles a complete part and sets up the next.
func (v *Verifier) step(part []byte) error {
	switch v.state {
	case vFixed:
		copy(v.fixedb[:], part)
		n, err := v.c.fixed(v.fixedb[:])
		if err != nil {
			return err
		}
		v.state, v.need = vJSON, n
		if n == 0 {
			return v.step(nil)
		}
	case vJSON:
		if err := v.c.json(v.fixedb[:], part); err != nil {
			return err
		}
		v.headerd = true
		v.state, v.need = vFrameHeader, FrameHeaderSize
	case vFrameHeader:
		copy(v.frameb[:], part)
		n, err := v.c.frameHeader(v.frameb[:])
		if err != nil {
			return err
		}
		v.state, v.need = vPayload, n
		if n == 0 {
			return v.step(nil)
		}
	case vPayload:
		f, err := v.c.frame(v.frameb[:], part)
		if err != nil {
			return err
		}
		v.state, v.need = vFrameHeader, FrameHeaderSize
		if f.Type == FrameEnd {
			v.state, v.need = vDone, 0
		}
	}
	return nil
}

// Header is the stream's header, once its bytes were written.
func (v *Verifier) Header() (Header, bool) { return v.c.hdr, v.headerd }

// Done returns the stream's header if the bytes written are one whole
// stream that verified (end frame included, nothing after it); otherwise
// the error a Reader would report (ErrTruncated for a stream that stops
// early).
func (v *Verifier) Done() (Header, error) {
	switch {
	case v.err != nil:
		return v.c.hdr, v.err
	case v.state != vDone:
		return v.c.hdr, ErrTruncated
	}
	return v.c.hdr, nil
}

// Verify reads a whole stream, checking every frame and the end frame, and
// returns its header.
func Verify(r io.Reader) (Header, error) {
	sr, err := NewReader(r)
	if err != nil {
		return Header{}, err
	}
	for {
		if _, err := sr.Next(); err == io.EOF {
			return sr.c.hdr, nil
		} else if err != nil {
			return sr.c.hdr, err
		}
	}
}
