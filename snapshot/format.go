package snapshot

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/internal/recordlog"
)

// BlockSize is the unit of undo data: a recovery point saves whole 4 KiB
// blocks of a disk.
const BlockSize = 4096

const (
	segMagic      = 0x53554456 // "VDUS" little endian
	recMagic      = 0x52554456 // "VDUR"
	manMagic      = 0x4d504456 // "VDPM"
	intentMagic   = 0x42524456 // "VDRB"
	formatVersion = 1

	segHeaderSize = 32
	recHeaderSize = 40
	// dataRecordSize is the size of a record that carries a block.
	dataRecordSize = recHeaderSize + BlockSize
	intentSize     = 40

	manHeaderSize = 32
	manPointSize  = 40
	// maxDisks and maxPoints bound what the manifest decoder accepts.
	maxDisks  = 1 << 16
	maxPoints = 1 << 16
)

// Record kinds.
const (
	kindData uint8 = 1 // the payload is the block's content at the point
	kindZero uint8 = 2 // the block read as zeroes at the point; no payload
)

// The frames of the segment header, the record header and the rollback
// intent: magic, version and, in the last 4 bytes, the CRC32C of the bytes
// before (see doc.go and internal/recordlog).
var (
	segFormat    = recordlog.Format{Name: "segment header", Magic: segMagic, Version: formatVersion, Size: segHeaderSize}
	recFormat    = recordlog.Format{Name: "record header", Magic: recMagic, Version: formatVersion, Size: recHeaderSize, ZeroedEnd: true}
	intentFormat = recordlog.Format{Name: "rollback intent", Magic: intentMagic, Version: formatVersion, Size: intentSize}
)

func crc(b []byte) uint32 { return recordlog.Checksum(b) }

// Errors of the decoders, recordlog's under snapshot's names. A zeroed
// record header is what the unsynced end of a segment looks like after a
// crash; anything else that fails to decode is ErrInvalid. Whether either
// is a torn tail or damage is decided by where it lies (see cutTornTail),
// and damage is reported as ErrCorrupt.
var (
	ErrZeroed  = recordlog.ErrZeroed
	ErrInvalid = recordlog.ErrInvalid
	// ErrVersion is a file or record of an unsupported format version.
	ErrVersion = recordlog.ErrVersion
)

// segHeader is the header of a segment file. See doc.go.
type segHeader struct {
	Disks uint16
	No    uint64 // segment number, also in the file name
	Cycle uint64 // the cycle of the point the segment starts at
	Salt  uint32 // repeated in every record of the segment
}

func encodeSegHeader(b []byte, h segHeader) {
	_ = b[segHeaderSize-1]
	b[5] = 0
	binary.LittleEndian.PutUint16(b[6:], h.Disks)
	binary.LittleEndian.PutUint64(b[8:], h.No)
	binary.LittleEndian.PutUint64(b[16:], h.Cycle)
	binary.LittleEndian.PutUint32(b[24:], h.Salt)
	segFormat.Put(b)
}

func decodeSegHeader(b []byte) (segHeader, error) {
	var h segHeader
	if err := segFormat.Check(b); err != nil {
		return h, err
	}
	if b[5] != 0 {
		return h, fmt.Errorf("%w: segment header reserved byte %#x", ErrInvalid, b[5])
	}
	h.Disks = binary.LittleEndian.Uint16(b[6:])
	h.No = binary.LittleEndian.Uint64(b[8:])
	h.Cycle = binary.LittleEndian.Uint64(b[16:])
	h.Salt = binary.LittleEndian.Uint32(b[24:])
	return h, nil
}

// recHeader is the header of an undo record. See doc.go.
type recHeader struct {
	Kind   uint8
	Disk   uint16
	Block  uint64 // block index on the disk
	Synced int64  // segment bytes known durable when the record was written
	Salt   uint32 // the segment's salt
	DCRC   uint32 // CRC32C of the payload (0 for a zero record)
}

// size is the record's total size in the segment.
func (h *recHeader) size() int64 {
	if h.Kind == kindData {
		return dataRecordSize
	}
	return recHeaderSize
}

func encodeRecHeader(b []byte, h *recHeader) {
	_ = b[recHeaderSize-1]
	b[5] = h.Kind
	binary.LittleEndian.PutUint16(b[6:], h.Disk)
	binary.LittleEndian.PutUint64(b[8:], h.Block)
	binary.LittleEndian.PutUint64(b[16:], uint64(h.Synced))
	binary.LittleEndian.PutUint32(b[24:], h.Salt)
	binary.LittleEndian.PutUint32(b[28:], h.DCRC)
	binary.LittleEndian.PutUint32(b[32:], 0)
	recFormat.Put(b)
}

// decodeRecHeader parses and checks a record header of the segment with the
// given salt. It does not check the payload: see checkRecPayload.
func decodeRecHeader(b []byte, salt uint32) (recHeader, error) {
	var h recHeader
	if err := recFormat.Check(b); err != nil {
		return h, err
	}
	h.Kind = b[5]
	h.Disk = binary.LittleEndian.Uint16(b[6:])
	h.Block = binary.LittleEndian.Uint64(b[8:])
	h.Synced = int64(binary.LittleEndian.Uint64(b[16:]))
	h.Salt = binary.LittleEndian.Uint32(b[24:])
	h.DCRC = binary.LittleEndian.Uint32(b[28:])
	switch {
	case h.Kind != kindData && h.Kind != kindZero:
		return h, fmt.Errorf("%w: record kind %d", ErrInvalid, h.Kind)
	case h.Kind == kindZero && h.DCRC != 0:
		return h, fmt.Errorf("%w: zero record with a payload checksum", ErrInvalid)
	case binary.LittleEndian.Uint32(b[32:]) != 0:
		return h, fmt.Errorf("%w: record reserved bytes set", ErrInvalid)
	case h.Salt != salt:
		// A record of another segment (copied, or inside a payload).
		return h, fmt.Errorf("%w: record salt %#x, segment's is %#x", ErrInvalid, h.Salt, salt)
	case h.Synced < 0:
		return h, fmt.Errorf("%w: synced watermark %d", ErrInvalid, h.Synced)
	case h.Block > maxBlock:
		return h, fmt.Errorf("%w: block %d", ErrInvalid, h.Block)
	}
	return h, nil
}

// checkRecPayload verifies the payload of a data record.
func checkRecPayload(h *recHeader, payload []byte) error {
	return recordlog.CheckPayload(payload, BlockSize, h.DCRC)
}

// manPoint is one point in the manifest.
type manPoint struct {
	Seg    uint64    // segment number
	Cycle  uint64    // the cycle whose barrier the point is
	Sealed time.Time // the barrier's time
	App    bool      // application-consistent
	Closed int64     // final size of the segment; 0 for the open one (the newest)
}

// manifest is the decoded manifest file. See doc.go.
type manifest struct {
	Seq     uint64 // incremented on every write
	NextSeg uint64 // the number the next segment gets
	Disks   []int64
	Points  []manPoint // oldest first
}

func encodeManifest(m *manifest) []byte {
	b := make([]byte, manHeaderSize+8*len(m.Disks)+manPointSize*len(m.Points)+4)
	binary.LittleEndian.PutUint32(b[0:], manMagic)
	b[4] = formatVersion
	binary.LittleEndian.PutUint64(b[8:], m.Seq)
	binary.LittleEndian.PutUint64(b[16:], m.NextSeg)
	binary.LittleEndian.PutUint32(b[24:], uint32(len(m.Disks)))
	binary.LittleEndian.PutUint32(b[28:], uint32(len(m.Points)))
	p := b[manHeaderSize:]
	for _, size := range m.Disks {
		binary.LittleEndian.PutUint64(p, uint64(size))
		p = p[8:]
	}
	for _, pt := range m.Points {
		var flags uint64
		if pt.App {
			flags |= 1
		}
		binary.LittleEndian.PutUint64(p[0:], pt.Seg)
		binary.LittleEndian.PutUint64(p[8:], pt.Cycle)
		binary.LittleEndian.PutUint64(p[16:], uint64(unixNano(pt.Sealed)))
		binary.LittleEndian.PutUint64(p[24:], flags)
		binary.LittleEndian.PutUint64(p[32:], uint64(pt.Closed))
		p = p[manPointSize:]
	}
	binary.LittleEndian.PutUint32(p, crc(b[:len(b)-4]))
	return b
}

// decodeManifest parses and checks a manifest. Every error wraps ErrInvalid
// or ErrVersion.
func decodeManifest(b []byte) (*manifest, error) {
	if len(b) < manHeaderSize+4 {
		return nil, fmt.Errorf("%w: manifest of %d bytes", ErrInvalid, len(b))
	}
	if m := binary.LittleEndian.Uint32(b[0:]); m != manMagic {
		return nil, fmt.Errorf("%w: manifest magic %#x", ErrInvalid, m)
	}
	if got, want := binary.LittleEndian.Uint32(b[len(b)-4:]), crc(b[:len(b)-4]); got != want {
		return nil, fmt.Errorf("%w: manifest checksum %#x, want %#x", ErrInvalid, got, want)
	}
	if v := b[4]; v != formatVersion {
		return nil, fmt.Errorf("%w: manifest version %d (supported: %d)", ErrVersion, v, formatVersion)
	}
	if !allZero(b[5:8]) {
		return nil, fmt.Errorf("%w: manifest reserved bytes set", ErrInvalid)
	}
	m := &manifest{
		Seq:     binary.LittleEndian.Uint64(b[8:]),
		NextSeg: binary.LittleEndian.Uint64(b[16:]),
	}
	nd := int64(binary.LittleEndian.Uint32(b[24:]))
	np := int64(binary.LittleEndian.Uint32(b[28:]))
	if nd > maxDisks || np > maxPoints {
		return nil, fmt.Errorf("%w: manifest of %d disks, %d points", ErrInvalid, nd, np)
	}
	if want := manHeaderSize + 8*nd + manPointSize*np + 4; int64(len(b)) != want {
		return nil, fmt.Errorf("%w: manifest of %d bytes, want %d", ErrInvalid, len(b), want)
	}
	p := b[manHeaderSize:]
	for range nd {
		size := int64(binary.LittleEndian.Uint64(p))
		if size < 0 || size/BlockSize > maxBlock {
			return nil, fmt.Errorf("%w: manifest disk size %d", ErrInvalid, size)
		}
		m.Disks = append(m.Disks, size)
		p = p[8:]
	}
	for i := range np {
		pt := manPoint{
			Seg:    binary.LittleEndian.Uint64(p[0:]),
			Cycle:  binary.LittleEndian.Uint64(p[8:]),
			Sealed: fromUnixNano(int64(binary.LittleEndian.Uint64(p[16:]))),
			Closed: int64(binary.LittleEndian.Uint64(p[32:])),
		}
		flags := binary.LittleEndian.Uint64(p[24:])
		if flags&^1 != 0 {
			return nil, fmt.Errorf("%w: manifest point flags %#x", ErrInvalid, flags)
		}
		pt.App = flags&1 != 0
		last := i == np-1
		switch {
		case pt.Seg >= m.NextSeg:
			return nil, fmt.Errorf("%w: manifest segment %d not below next %d", ErrInvalid, pt.Seg, m.NextSeg)
		case i > 0 && (pt.Cycle <= m.Points[i-1].Cycle || pt.Seg <= m.Points[i-1].Seg):
			return nil, fmt.Errorf("%w: manifest points out of order", ErrInvalid)
		case last && pt.Closed != 0:
			return nil, fmt.Errorf("%w: manifest's newest point has a closed segment", ErrInvalid)
		case !last && pt.Closed < segHeaderSize:
			return nil, fmt.Errorf("%w: manifest closed segment of %d bytes", ErrInvalid, pt.Closed)
		}
		m.Points = append(m.Points, pt)
		p = p[manPointSize:]
	}
	return m, nil
}

// intent is the rollback intent file: a rollback to point Seg/Cycle began
// against the manifest of sequence Seq. See doc.go.
type intent struct {
	Seq   uint64
	Seg   uint64
	Cycle uint64
}

func encodeIntent(in intent) []byte {
	b := make([]byte, intentSize)
	binary.LittleEndian.PutUint64(b[8:], in.Seq)
	binary.LittleEndian.PutUint64(b[16:], in.Seg)
	binary.LittleEndian.PutUint64(b[24:], in.Cycle)
	intentFormat.Put(b)
	return b
}

func decodeIntent(b []byte) (intent, error) {
	var in intent
	if len(b) != intentSize {
		return in, fmt.Errorf("%w: rollback intent of %d bytes", ErrInvalid, len(b))
	}
	if err := intentFormat.Check(b); err != nil {
		return in, err
	}
	if !allZero(b[5:8]) || !allZero(b[32:36]) {
		return in, fmt.Errorf("%w: rollback intent reserved bytes set", ErrInvalid)
	}
	in.Seq = binary.LittleEndian.Uint64(b[8:])
	in.Seg = binary.LittleEndian.Uint64(b[16:])
	in.Cycle = binary.LittleEndian.Uint64(b[24:])
	return in, nil
}

func allZero(b []byte) bool { return recordlog.AllZero(b) }

// unixNano is t in Unix nanoseconds, with the zero Time as 0.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns).UTC()
}
