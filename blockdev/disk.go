// Package blockdev holds vdrepl's front ends: the NBD export and the FUSE file
// view. Both translate client requests into calls on a Disk and know nothing of
// journals or replication.
package blockdev

import (
	"errors"
	"io"
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
