// Package fakedisk is a test disk for the front ends: a plain file with no
// journal, plus fault injection so tests can make the next operations fail with
// a chosen error. Tests that import it live in external test packages
// (package blockdev_test), since it imports blockdev.
package fakedisk

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
)

var _ blockdev.Disk = (*Disk)(nil)

// Disk is a file-backed disk. Safe for concurrent use.
type Disk struct {
	f    *os.File
	size int64

	mu        sync.Mutex
	failErr   error
	failCount int

	Flushes atomic.Int64
	Trims   atomic.Int64
	Zeroes  atomic.Int64
}

// Create makes (or truncates) a sparse file of size bytes at path.
func Create(path string, size int64) (*Disk, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	return &Disk{f: f, size: size}, nil
}

// FailNext makes the next n operations (reads, writes, flushes, trims, zeroes)
// return err.
func (d *Disk) FailNext(n int, err error) {
	d.mu.Lock()
	d.failErr, d.failCount = err, n
	d.mu.Unlock()
}

func (d *Disk) fault() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failCount > 0 {
		d.failCount--
		return d.failErr
	}
	return nil
}

func (d *Disk) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > d.size {
		return fmt.Errorf("%w: [%d,+%d) size %d", blockdev.ErrOutOfRange, off, n, d.size)
	}
	return d.fault()
}

func (d *Disk) Size() int64 { return d.size }

func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.ReadAt(p, off)
}

func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.f.WriteAt(p, off)
}

func (d *Disk) Flush() error {
	if err := d.fault(); err != nil {
		return err
	}
	d.Flushes.Add(1)
	return unix.Fdatasync(int(d.f.Fd()))
}

func (d *Disk) Trim(off, length int64) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	d.Trims.Add(1)
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (d *Disk) Zero(off, length int64, punch bool) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	d.Zeroes.Add(1)
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if punch {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(int(d.f.Fd()), mode, off, length)
}

// Close closes the file.
func (d *Disk) Close() error { return d.f.Close() }
