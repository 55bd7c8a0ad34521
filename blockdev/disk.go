// Package blockdev holds vdrepl's front ends: the NBD export and the FUSE file
// view. Both translate client requests into calls on a Disk and know nothing of
// journals or replication. A Disk may offer more through optional
// interfaces, which front ends look for and wrappers must forward: Receiver
// (writes received straight into the Disk's buffers) and Mapper (where the
// holes are: NBD block status and sparse reads, SEEK_HOLE on the FUSE file).
package blockdev

import (
	"errors"
	"fmt"
	"io"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Disk is the block device a front end serves. Implementations must be safe for
// concurrent use: a front end issues many requests at once.
type Disk interface {
	io.ReaderAt
	io.WriterAt
	// Size is the disk size in bytes; it does not change while served.
	Size() int64
	// Flush makes every write, trim and zero that returned before Flush was
	// called durable. Concurrent flushes may share one sync.
	Flush() error
	// Trim discards [off, off+length); the range reads back as zeroes.
	Trim(off, length int64) error
	// Zero writes zeroes to [off, off+length). With punch, the disk may
	// deallocate the range; without, it must stay allocated (NBD NO_HOLE).
	Zero(off, length int64, punch bool) error
}

// A Receiver is a Disk that takes large write payloads straight from the
// client's stream into memory of its own (the journal's append buffers),
// sparing the front end's buffer and a copy. Front ends use it for writes of
// at least ReceiveMin bytes.
type Receiver interface {
	ReceiveMin() int
	// ReceiveWrite reads a write's n-byte payload from r and returns the
	// function that writes it at off, as WriteAt would; the front end calls
	// it exactly once, from any goroutine. An error is the stream's. A
	// wrapper that refuses the write still calls it once, with a negative
	// off: that writes nothing and gives the payload's buffer back (the
	// journal's come from a bounded pool, not only the garbage collector).
	ReceiveWrite(r io.Reader, n int) (write func(off int64) error, err error)
}

// Extent is a run of a disk in one allocation state: Hole (nothing stored)
// and Zero (reads as zeroes). It is vfs.Extent, so that a Disk that does not
// import this package (the journal's) can still be a Mapper.
type Extent = vfs.Extent

// A Mapper is a Disk that knows where its holes are. Front ends use it to
// skip holes (NBD block status and sparse reads, SEEK_HOLE on the FUSE
// file); a Disk without it is all data.
type Mapper interface {
	// Extents describes [off, off+length), which lies within the disk, as
	// consecutive extents from off. It may end short of off+length, but
	// not before covering at least one byte. Reporting a hole as data is
	// always allowed; data as a hole or a non-zero run as Zero never is.
	// The answer is a snapshot: a write that overlaps it concurrently may
	// or may not be in it.
	Extents(off, length int64) ([]Extent, error)
}

// errBadMap is for a Mapper whose answer does not describe the range asked
// about.
var errBadMap = errors.New("blockdev: disk map does not cover the range")

// diskMap describes [off, off+length) of d: from its Mapper, checked and with
// neighbours of one state merged, or as one data extent. Its extents start at
// off and end at or before off+length.
func diskMap(d Disk, off, length int64) ([]Extent, error) {
	m, ok := d.(Mapper)
	if !ok || length <= 0 {
		return []Extent{{Offset: off, Length: length}}, nil
	}
	ext, err := m.Extents(off, length)
	if err != nil {
		return nil, err
	}
	end := off + length
	out := make([]Extent, 0, len(ext))
	pos := off
	for _, e := range ext {
		if e.Offset != pos || e.Length <= 0 {
			return nil, fmt.Errorf("%w: extent [%d, +%d) where %d was expected", errBadMap, e.Offset, e.Length, pos)
		}
		if pos >= end {
			break
		}
		e.Length = min(e.Length, end-pos)
		e.Zero = e.Zero || e.Hole
		pos += e.Length
		if k := len(out) - 1; k >= 0 && out[k].Hole == e.Hole && out[k].Zero == e.Zero {
			out[k].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no extent at %d", errBadMap, off)
	}
	return out, nil
}

// Export is one named disk offered to clients.
type Export struct {
	// Name is "VM/DISK".
	Name     string
	Disk     Disk
	ReadOnly bool
	// Description is shown to NBD clients that ask for it.
	Description string
}

// Exports is the live catalogue of disks; VMs come and go while serving.
type Exports interface {
	Lookup(name string) (Export, bool)
	List() []Export
}

// Errors a Disk may return that front ends translate to a specific client error.
var (
	// ErrOutOfRange is for a request beyond the end of the disk.
	ErrOutOfRange = errors.New("blockdev: request out of range")
	// ErrReadOnly is for a write to a read-only disk.
	ErrReadOnly = errors.New("blockdev: disk is read-only")
)
