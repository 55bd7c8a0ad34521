package snapshot

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// ErrViewClosed is a read of a closed View.
var ErrViewClosed = errors.New("snapshot: view closed")

// View is a read-only image of every disk at one recovery point. It stays
// exact while cycles keep being applied and points taken, and the point
// cannot be pruned while the View is open. Safe for concurrent use.
type View struct {
	s     *Store
	point Point
	seg   uint64 // the point's segment number

	mu     sync.Mutex
	closed bool
}

// View opens a view of point id.
func (s *Store) View(id string) (*View, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(); err != nil {
		return nil, err
	}
	if s.busy {
		return nil, fmt.Errorf("%w: a rollback is running", ErrBusy)
	}
	k := s.find(id)
	if k < 0 {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	p := s.points[k]
	s.views[p.seg.no]++
	return &View{
		s:     s,
		point: Point{ID: p.id(), Cycle: p.cycle, Time: p.sealed, AppConsistent: p.app},
		seg:   p.seg.no,
	}, nil
}

// OpenViews is the number of views open (Rollback refuses to run while
// there are any).
func (s *Store) OpenViews() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n := 0
	for _, k := range s.views {
		n += k
	}
	return n
}

// Point is the point the view shows (sizes not filled in).
func (v *View) Point() Point { return v.point }

// Disks is the number of disks.
func (v *View) Disks() int { return len(v.s.disks) }

// Disk returns disk i as it was at the point.
func (v *View) Disk(i int) *DiskView {
	return &DiskView{v: v, disk: i, size: v.s.disks[i].Size}
}

// Close releases the point. It is idempotent.
func (v *View) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	v.s.mu.Lock()
	if v.s.views[v.seg]--; v.s.views[v.seg] <= 0 {
		delete(v.s.views, v.seg)
	}
	v.s.mu.Unlock()
	return nil
}

func (v *View) isClosed() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.closed
}

// holder returns the segment whose record has block key's content at the
// view's point: the oldest segment at or after it that holds the block.
// None means the image still has it. Caller holds s.mu.
func (v *View) holder(key uint64) (*segment, int64) {
	for _, p := range v.s.points {
		if p.seg.no < v.seg {
			continue
		}
		if l, ok := p.seg.idx.get(key); ok {
			return p.seg, l
		}
	}
	return nil, 0
}

// testHookAfterLookup, when set by a test, runs between a view read's
// first lookup and its image read: where apply may slip in a write.
var testHookAfterLookup func()

// DiskView is one disk of a View, an io.ReaderAt.
type DiskView struct {
	v    *View
	disk int
	size int64
}

// Size is the disk's size in bytes.
func (d *DiskView) Size() int64 { return d.size }

// ReadAt reads the disk as it was at the point, with io.ReaderAt's
// semantics at the end of the disk.
//
// A block no segment holds is read from the image, while apply may be
// about to write it. BeforeWrite indexes a block before apply writes it, so
// the lookup is made again after the image read: a block still not held
// then was not yet written when it was read; one held now is read from
// its record, which has the content at the point.
func (d *DiskView) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: read at %d", ErrOutOfRange, off)
	}
	if off >= d.size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), d.size)
	q := p[:end-off]
	s := d.v.s
	if d.v.isClosed() {
		return 0, ErrViewClosed
	}
	first, last := off/BlockSize, (end-1)/BlockSize
	type source struct {
		seg *segment
		loc int64
	}
	src := make([]source, last-first+1)
	lookup := func(onlyMissing bool) error {
		s.mu.RLock()
		defer s.mu.RUnlock()
		if s.closed {
			return ErrClosed
		}
		for i := range src {
			if !onlyMissing || src[i].seg == nil {
				src[i].seg, src[i].loc = d.v.holder(blockKey(d.disk, first+int64(i)))
			}
		}
		return nil
	}
	if err := lookup(false); err != nil {
		return 0, err
	}
	if testHookAfterLookup != nil {
		testHookAfterLookup()
	}
	// bounds is the part of q that block first+i covers.
	bounds := func(i int64) (lo, hi int64) {
		b := (first + i) * BlockSize
		return max(b, off) - off, min(b+BlockSize, end) - off
	}
	for i := 0; i < len(src); {
		if src[i].seg != nil {
			i++
			continue
		}
		j := i + 1
		for j < len(src) && src[j].seg == nil {
			j++
		}
		lo, _ := bounds(int64(i))
		_, hi := bounds(int64(j - 1))
		if err := s.readImage(d.disk, q[lo:hi], off+lo); err != nil {
			return 0, err
		}
		i = j
	}
	if err := lookup(true); err != nil {
		return 0, err
	}
	rec := make([]byte, dataRecordSize)
	for i, sr := range src {
		if sr.seg == nil {
			continue
		}
		buf, err := sr.seg.readBlock(blockKey(d.disk, first+int64(i)), sr.loc, rec)
		if err != nil {
			return 0, err
		}
		lo, hi := bounds(int64(i))
		b := (first + int64(i)) * BlockSize
		copy(q[lo:hi], buf[off+lo-b:])
	}
	if len(q) < len(p) {
		return len(q), io.EOF
	}
	return len(q), nil
}

// Overlay is a writable, throw-away copy of a View, for a test failover:
// writes go to a sparse scratch file per disk and never reach the images,
// the View or the undo data. Nothing of it survives its process, so Flush
// has nothing to make durable. It does not own the View: close the Overlay,
// then the View.
type Overlay struct {
	disks []*OverlayDisk
	once  sync.Once
	err   error
}

// Writable makes an Overlay of v whose scratch files are
// scratchDir/disk<i>.scratch. A leftover file of that name (from a crash) is
// replaced.
func (v *View) Writable(scratchDir string) (*Overlay, error) {
	fsys := v.s.fs
	if err := fsys.MkdirAll(scratchDir, 0o700); err != nil {
		return nil, fmt.Errorf("snapshot: scratch directory: %w", err)
	}
	o := &Overlay{}
	for i := range v.Disks() {
		dv := v.Disk(i)
		path := join(scratchDir, fmt.Sprintf("disk%d.scratch", i))
		f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err == nil {
			err = f.Truncate(dv.size)
			if err != nil {
				f.Close()
				fsys.Remove(path)
			}
		}
		if err != nil {
			o.Close()
			return nil, fmt.Errorf("snapshot: scratch file: %w", err)
		}
		o.disks = append(o.disks, &OverlayDisk{
			fs: fsys, view: dv, f: f, path: path, size: dv.size,
			written: make([]uint64, (blocks(dv.size)+63)/64),
		})
	}
	return o, nil
}

// Disk returns disk i of the overlay.
func (o *Overlay) Disk(i int) *OverlayDisk { return o.disks[i] }

// Close closes and removes the scratch files. It is idempotent.
func (o *Overlay) Close() error {
	o.once.Do(func() {
		var errs []error
		for _, d := range o.disks {
			d.mu.Lock()
			d.closed = true
			errs = append(errs, d.f.Close(), d.fs.Remove(d.path))
			d.mu.Unlock()
		}
		o.err = errors.Join(errs...)
		if o.err != nil {
			o.err = fmt.Errorf("snapshot: remove overlay: %w", o.err)
		}
	})
	return o.err
}

// OverlayDisk is one disk of an Overlay. It has the method set of
// blockdev.Disk and is safe for concurrent use. Blocks written since the
// Overlay was made (a bitmap, one bit a block) are read from the scratch
// file, the others from the View.
type OverlayDisk struct {
	fs   vfs.FS
	view *DiskView
	f    vfs.File
	path string
	size int64

	mu      sync.RWMutex // writers exclusive; guards written, closed
	written []uint64
	closed  bool
}

func (d *OverlayDisk) check(off int64, n int64) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("%w: [%d, +%d) on a %d-byte disk", ErrOutOfRange, off, n, d.size)
	}
	return nil
}

func (d *OverlayDisk) isWritten(b int64) bool { return d.written[b/64]&(1<<(b%64)) != 0 }
func (d *OverlayDisk) setWritten(b int64)     { d.written[b/64] |= 1 << (b % 64) }

// Size is the disk size in bytes.
func (d *OverlayDisk) Size() int64 { return d.size }

// Flush does nothing: see Overlay.
func (d *OverlayDisk) Flush() error { return nil }

// ReadAt reads what was written through the overlay, else the point.
func (d *OverlayDisk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return 0, ErrViewClosed
	}
	end := off + int64(len(p))
	for pos := off; pos < end; {
		b := pos / BlockSize
		w := d.isWritten(b)
		next := (b + 1) * BlockSize
		for next < end && d.isWritten(next/BlockSize) == w {
			next += BlockSize
		}
		next = min(next, end)
		var err error
		if w {
			_, err = d.f.ReadAt(p[pos-off:next-off], pos)
		} else {
			_, err = d.view.ReadAt(p[pos-off:next-off], pos)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		pos = next
	}
	return len(p), nil
}

// WriteAt writes p to the scratch file.
func (d *OverlayDisk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.change(off, int64(len(p)), p, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Trim discards a range: it reads back as zeroes.
func (d *OverlayDisk) Trim(off, n int64) error { return d.change(off, n, nil, true) }

// Zero writes zeroes to a range, deallocating it in the scratch file only
// with punch.
func (d *OverlayDisk) Zero(off, n int64, punch bool) error { return d.change(off, n, nil, punch) }

// change writes data (or zeroes, when data is nil) to [off, off+n). A block
// written for the first time and not wholly covered is first filled from
// the View.
func (d *OverlayDisk) change(off, n int64, data []byte, punch bool) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrViewClosed
	}
	end := off + n
	// covered: block b is wholly replaced, or already in the scratch file.
	covered := func(b int64) bool {
		return d.isWritten(b) || (off <= b*BlockSize && end >= min((b+1)*BlockSize, d.size))
	}
	first, last := off/BlockSize, (end-1)/BlockSize
	for b := first; b <= last; {
		if !covered(b) {
			if err := d.fillAndChange(b, off, end, data); err != nil {
				return err
			}
			b++
			continue
		}
		e := b + 1
		for e <= last && covered(e) {
			e++
		}
		lo, hi := max(off, b*BlockSize), min(end, e*BlockSize)
		var err error
		switch {
		case data != nil:
			_, err = d.f.WriteAt(data[lo-off:hi-off], lo)
		case punch:
			err = d.f.PunchHole(lo, hi-lo)
		default:
			err = d.f.ZeroRange(lo, hi-lo)
		}
		if err != nil {
			return fmt.Errorf("snapshot: overlay scratch: %w", err)
		}
		for i := b; i < e; i++ {
			d.setWritten(i)
		}
		b = e
	}
	return nil
}

// fillAndChange copies block b from the View into the scratch file with the
// part of [off, end) it covers changed to data (or zeroes).
func (d *OverlayDisk) fillAndChange(b, off, end int64, data []byte) error {
	bs := b * BlockSize
	buf := make([]byte, min(BlockSize, d.size-bs))
	if _, err := d.view.ReadAt(buf, bs); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	lo, hi := max(off, bs), min(end, bs+int64(len(buf)))
	if data != nil {
		copy(buf[lo-bs:hi-bs], data[lo-off:hi-off])
	} else {
		clear(buf[lo-bs : hi-bs])
	}
	if _, err := d.f.WriteAt(buf, bs); err != nil {
		return fmt.Errorf("snapshot: overlay scratch: %w", err)
	}
	d.setWritten(b)
	return nil
}
