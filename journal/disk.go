package journal

import (
	"fmt"
	"io"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Disk is one disk of a journaled VM, the block device the front ends serve.
// It satisfies blockdev.Disk.
type Disk struct {
	j    *Journal
	idx  int
	size int64
}

func (d *Disk) check(off int64, n int) error {
	if off < 0 || n < 0 || off+int64(n) > d.size || off+int64(n) < off {
		return fmt.Errorf("%w: [%d, +%d) on a %d-byte disk", ErrOutOfRange, off, n, d.size)
	}
	return nil
}

// Name is the disk's name.
func (d *Disk) Name() string { return d.j.cfg.Disks[d.idx].Name }

// Size is the disk size in bytes.
func (d *Disk) Size() int64 { return d.size }

// ReadAt reads the newest data, journaled or written back.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, len(p)); err != nil {
		return 0, err
	}
	if err := d.j.readAt(d.idx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt journals p; it returns once the record is in the journal (not yet
// durable: see Flush).
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(off, len(p)); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := d.j.write(d.idx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// ReceiveMin is the smallest write ReceiveWrite takes without a copy: the
// smallest appended with O_DIRECT.
func (d *Disk) ReceiveMin() int { return d.j.directMin }

// ReceiveWrite reads the n-byte payload of a write from r straight into the
// buffer the journal will append it from, checksumming it as it arrives,
// and returns the function that journals it at off, like WriteAt. A front
// end calls it where it would read the payload into a buffer of its own,
// and the function once, from any goroutine; with a negative off it only
// gives the buffer back. (It saves a copy of every byte, and a pass of
// CRC32C over memory no longer in the CPU cache.)
func (d *Disk) ReceiveWrite(r io.Reader, n int) (func(off int64) error, error) {
	buf := getAligned(vfs.DirectAlign + n)
	data := buf[vfs.DirectAlign:]
	// The block hashes are taken as the payload arrives, where it may be
	// appended as it is (whole blocks); a write that is not is hashed on
	// the path that journals it.
	var hs []blocktree.Hash
	var hp *[]blocktree.Hash
	if d.j.tree != nil && n%BlockSize == 0 && n >= d.j.directMin && n <= MaxPayload {
		hs = make([]blocktree.Hash, 0, n/BlockSize)
		hp = &hs
	}
	sum, err := receiveCRC(r, data, hp)
	if err != nil {
		putAligned(buf)
		return nil, err
	}
	return func(off int64) error {
		if err := d.check(off, n); err != nil {
			putAligned(buf)
			return err
		}
		return d.j.writeReceived(d.idx, buf, sum, hs, off)
	}, nil
}

// writeReceived journals a write received into an append buffer (see
// ReceiveWrite) and takes buf. A write that cannot be appended from it as it
// is (appendPathFor: not on block boundaries, small, or larger than a
// record) is journaled like any other write, from a copy.
// hs are the block hashes of the payload, nil without a tree.
func (j *Journal) writeReceived(disk int, buf []byte, sum uint32, hs []blocktree.Hash, off int64) error {
	p := buf[vfs.DirectAlign:]
	if j.appendPathFor(off, len(p), true) != appendReceived {
		defer putAligned(buf)
		return j.write(disk, p, off)
	}
	unlock := j.lockRange(disk, off, int64(len(p)))
	defer unlock()
	return j.appendWriteVia(appendReceived, disk, p, off, buf, sum, hs)
}

// Flush makes every write of every disk of the VM that returned before it
// durable.
func (d *Disk) Flush() error { return d.j.Flush() }

// Trim discards the range; it reads back as zeroes.
func (d *Disk) Trim(off, n int64) error {
	if err := d.check(off, int(n)); err != nil || n == 0 {
		return err
	}
	return d.j.rangeOp(d.idx, KindTrim, off, n)
}

// Zero writes zeroes; with punch the range may be deallocated.
func (d *Disk) Zero(off, n int64, punch bool) error {
	if err := d.check(off, int(n)); err != nil || n == 0 {
		return err
	}
	kind := KindZeroAlloc
	if punch {
		kind = KindZero
	}
	return d.j.rangeOp(d.idx, kind, off, n)
}
