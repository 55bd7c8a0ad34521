package recordlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Errors of the decoders and of the torn-tail cut.
var (
	// ErrZeroed is an all-zero record header: what the unwritten end of a
	// log looks like, normally after a crash.
	ErrZeroed = errors.New("recordlog: zeroed record")
	// ErrInvalid is a header or payload that does not verify: a torn write,
	// or damage if CutTornTail finds it below the durable offset.
	ErrInvalid = errors.New("recordlog: invalid record")
	// ErrVersion is a header written by an unsupported format version.
	ErrVersion = errors.New("recordlog: unsupported format version")
	// ErrCorrupt is a record that does not verify in the part of a log that
	// was synced: data loss the log cannot repair on its own.
	ErrCorrupt = errors.New("recordlog: corrupt record in synced region")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum is the CRC32C (Castagnoli) of b, the checksum of every frame.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Format describes one fixed-size frame (see the package doc): a segment
// header, a record header or a small state file.
type Format struct {
	Name    string // what the frame is, for errors ("record", "segment header")
	Magic   uint32 // bytes 0..3, little endian
	Version uint8  // byte 4: the one version written and accepted
	Size    int    // the whole frame, checksum included; at least 9
	// ZeroedEnd says an all-zero frame is the unwritten end of a log
	// (ErrZeroed) rather than a bad magic (ErrInvalid): set for record
	// headers.
	ZeroedEnd bool
}

// Put frames the fields the caller wrote in b[5:f.Size-4]: it writes the
// magic, the version and, last, the checksum.
func (f Format) Put(b []byte) {
	_ = b[f.Size-1]
	binary.LittleEndian.PutUint32(b[0:], f.Magic)
	b[4] = f.Version
	n := f.Size - 4
	binary.LittleEndian.PutUint32(b[n:], Checksum(b[:n]))
}

// Check verifies the frame at the start of b: its length, magic, checksum
// and version. The caller then decodes and checks its own fields.
func (f Format) Check(b []byte) error {
	if len(b) < f.Size {
		return fmt.Errorf("%w: short %s (%d bytes)", ErrInvalid, f.Name, len(b))
	}
	b = b[:f.Size]
	if f.ZeroedEnd && AllZero(b) {
		return ErrZeroed
	}
	if m := binary.LittleEndian.Uint32(b[0:]); m != f.Magic {
		return fmt.Errorf("%w: %s magic %#x", ErrInvalid, f.Name, m)
	}
	n := f.Size - 4
	if got, want := binary.LittleEndian.Uint32(b[n:]), Checksum(b[:n]); got != want {
		return fmt.Errorf("%w: %s checksum %#x, want %#x", ErrInvalid, f.Name, got, want)
	}
	if v := b[4]; v != f.Version {
		return fmt.Errorf("%w: %s version %d (supported: %d)", ErrVersion, f.Name, v, f.Version)
	}
	return nil
}

// CheckPayload verifies a record's payload: size bytes whose CRC32C is sum.
func CheckPayload(payload []byte, size int64, sum uint32) error {
	if int64(len(payload)) != size {
		return fmt.Errorf("%w: payload %d bytes, want %d", ErrInvalid, len(payload), size)
	}
	if got := Checksum(payload); got != sum {
		return fmt.Errorf("%w: payload checksum %#x, want %#x", ErrInvalid, got, sum)
	}
	return nil
}

// AllZero reports whether every byte of b is zero: an unwritten header, or
// reserved bytes as they must be.
func AllZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
