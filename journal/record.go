package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/vdrepl/vdrepl/internal/recordlog"
)

// Record kinds.
const (
	KindWrite     uint8 = 1 // payload is the data written at Offset
	KindTrim      uint8 = 2 // [Offset, Offset+Length) discarded, reads as zeroes
	KindZero      uint8 = 3 // zeroes written, the range may be deallocated
	KindZeroAlloc uint8 = 4 // zeroes written, the range stays allocated (NBD NO_HOLE)
	KindSeal      uint8 = 5 // closes cycle Cycle; payload is a sealPayload
	// KindPad fills the gap before a write appended with O_DIRECT, so that
	// its payload starts on a DirectAlign boundary of the segment file. Its
	// payload is Length zero bytes; it changes nothing on any disk.
	KindPad uint8 = 6
)

// maxPad bounds a pad record: it fills less than two DirectAlign blocks.
const maxPad = 2 * 4096

const (
	recordMagic   = 0x524a4456 // "VDJR" little endian
	recordVersion = 1
	// HeaderSize is the size of a record header; the payload follows it.
	HeaderSize = 56
	// MaxPayload bounds one record's payload (an NBD request is at most 32 MiB).
	MaxPayload = 32 << 20
)

// recordFormat frames a record header: magic, version and the CRC32C of
// bytes 0..51 at 52 (see doc.go and internal/recordlog).
var recordFormat = recordlog.Format{Name: "record", Magic: recordMagic, Version: recordVersion, Size: HeaderSize, ZeroedEnd: true}

// castagnoli is the CRC32C table, for the checksums direct.go computes piece
// by piece; crc is recordlog's, the checksum of every record.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return recordlog.Checksum(b) }

// Errors of the record decoder, recordlog's under the journal's names. A
// zeroed header is what the end of a segment looks like after a crash;
// anything else is damage (or a torn write).
var (
	ErrZeroed  = recordlog.ErrZeroed
	ErrInvalid = recordlog.ErrInvalid
	// ErrVersion is a record or file written by an unsupported format version.
	ErrVersion = recordlog.ErrVersion
)

// ErrCorrupt is damage inside the part of the journal that was synced: data
// loss the journal cannot repair on its own. Where the record framing finds
// it, it wraps recordlog.ErrCorrupt too.
var ErrCorrupt = errors.New("journal: corrupt record in synced region")

// ErrDamaged is a journaled payload that does not match the CRC32C its
// record header carries: damage at rest, found when the data is read to be
// shipped or written back. It is never returned with data; a DamageError
// names the record and the range of the disk it covers.
var ErrDamaged = errors.New("journal: damaged record")

// DamageError is ErrDamaged for one write record: the disk range its payload
// covers, where it lies in the journal, and what the check found.
type DamageError struct {
	Disk     int    // the disk's index within the VM
	DiskName string // and its name
	Off, Len int64  // the record's range of the disk: [Off, Off+Len)
	LSN      uint64 // the record's LSN
	Segment  string // the segment file holding it
	Why      string // what the check found
}

func (e *DamageError) Error() string {
	return fmt.Sprintf("journal record at LSN %#x in segment %s damaged: disk %s bytes [%d,%d): %s",
		e.LSN, e.Segment, e.DiskName, e.Off, e.Off+e.Len, e.Why)
}

// Unwrap makes errors.Is(err, ErrDamaged) hold.
func (e *DamageError) Unwrap() error { return ErrDamaged }

// Header is a decoded record header. See doc.go for the byte layout.
type Header struct {
	Kind   uint8
	Disk   uint16
	LSN    uint64 // journal position of this record's first byte
	Cycle  uint64
	Offset uint64 // byte offset on the disk
	Length uint64 // bytes covered on the disk
	Synced uint64 // journal position known durable when the record was written
	DCRC   uint32 // CRC32C of the payload
}

// PayloadLen is the number of payload bytes that follow the header.
func (h *Header) PayloadLen() int64 {
	switch h.Kind {
	case KindWrite, KindPad:
		return int64(h.Length)
	case KindSeal:
		return sealPayloadSize
	}
	return 0
}

// Size is the record's total size in the journal.
func (h *Header) Size() int64 { return HeaderSize + h.PayloadLen() }

// encodeHeader writes h into b[:HeaderSize].
func encodeHeader(b []byte, h *Header) {
	_ = b[HeaderSize-1]
	b[5] = h.Kind
	binary.LittleEndian.PutUint16(b[6:], h.Disk)
	binary.LittleEndian.PutUint64(b[8:], h.LSN)
	binary.LittleEndian.PutUint64(b[16:], h.Cycle)
	binary.LittleEndian.PutUint64(b[24:], h.Offset)
	binary.LittleEndian.PutUint64(b[32:], h.Length)
	binary.LittleEndian.PutUint64(b[40:], h.Synced)
	binary.LittleEndian.PutUint32(b[48:], h.DCRC)
	recordFormat.Put(b)
}

// decodeHeader parses and checks a record header. It does not check the
// payload; verify that with checkPayload.
func decodeHeader(b []byte) (Header, error) {
	var h Header
	if err := recordFormat.Check(b); err != nil {
		return h, err
	}
	h.Kind = b[5]
	h.Disk = binary.LittleEndian.Uint16(b[6:])
	h.LSN = binary.LittleEndian.Uint64(b[8:])
	h.Cycle = binary.LittleEndian.Uint64(b[16:])
	h.Offset = binary.LittleEndian.Uint64(b[24:])
	h.Length = binary.LittleEndian.Uint64(b[32:])
	h.Synced = binary.LittleEndian.Uint64(b[40:])
	h.DCRC = binary.LittleEndian.Uint32(b[48:])
	switch h.Kind {
	case KindWrite:
		if h.Length == 0 || h.Length > MaxPayload {
			return h, fmt.Errorf("%w: write length %d", ErrInvalid, h.Length)
		}
	case KindTrim, KindZero, KindZeroAlloc:
		if h.Length == 0 {
			return h, fmt.Errorf("%w: empty range", ErrInvalid)
		}
	case KindSeal:
	case KindPad:
		if h.Length > maxPad || h.Disk != 0 || h.Offset != 0 {
			return h, fmt.Errorf("%w: pad of %d bytes", ErrInvalid, h.Length)
		}
	default:
		return h, fmt.Errorf("%w: unknown kind %d", ErrInvalid, h.Kind)
	}
	if h.Offset+h.Length < h.Offset {
		return h, fmt.Errorf("%w: range overflows", ErrInvalid)
	}
	return h, nil
}

// checkPayload verifies a payload against its header.
func checkPayload(h *Header, payload []byte) error {
	return recordlog.CheckPayload(payload, h.PayloadLen(), h.DCRC)
}

// Seal payload: | unix nanos u64 | flags u64 |
const (
	sealPayloadSize = 16
	// SealAppConsistent marks a barrier taken while the guest was quiesced.
	SealAppConsistent uint64 = 1 << 0
	// SealPoint asks the replica to make the cycle a recovery point: an
	// application-consistent barrier whose quiesce failed.
	SealPoint uint64 = 1 << 1
)

type sealPayload struct {
	UnixNano int64
	Flags    uint64
}

func (s sealPayload) encode() []byte {
	b := make([]byte, sealPayloadSize)
	binary.LittleEndian.PutUint64(b[0:], uint64(s.UnixNano))
	binary.LittleEndian.PutUint64(b[8:], s.Flags)
	return b
}

func decodeSeal(b []byte) sealPayload {
	return sealPayload{
		UnixNano: int64(binary.LittleEndian.Uint64(b[0:])),
		Flags:    binary.LittleEndian.Uint64(b[8:]),
	}
}
