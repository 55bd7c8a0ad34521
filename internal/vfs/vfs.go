// Package vfs is the filesystem seam of vdrepl's write path. The journal and the
// image writer do every open, write, sync, rename and remove through an FS, so
// tests can swap the real filesystem for one that injects errors (ErrorFS) or one
// that forgets everything not synced when it "crashes" (MemFS.CrashClone).
//
// Durability contract, the same for every implementation:
//   - File.Sync makes the file's data and size durable (fdatasync).
//   - A new, removed or renamed name becomes durable only after SyncDir on its
//     parent directory.
//   - Data written but not synced may survive a crash in part, in any order.
//
// Implementations are safe for concurrent use; a File is safe for concurrent
// ReadAt/WriteAt at distinct offsets, as os.File is.
package vfs

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrUnsupported is returned by optional operations an implementation lacks.
var ErrUnsupported = errors.New("vfs: operation not supported")

// File is an open file.
type File interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	// Sync makes written data durable (fdatasync).
	Sync() error
	Truncate(size int64) error
	Size() (int64, error)
	// PunchHole deallocates [off, off+length) so it reads back as zeroes,
	// keeping the file size.
	PunchHole(off, length int64) error
	// ZeroRange writes zeroes to [off, off+length) keeping the blocks allocated.
	ZeroRange(off, length int64) error
	Name() string
}

// FS is the filesystem seam.
type FS interface {
	// OpenFile opens name with os.O_* flags.
	OpenFile(name string, flag int, perm fs.FileMode) (File, error)
	Remove(name string) error
	Rename(oldname, newname string) error
	MkdirAll(name string, perm fs.FileMode) error
	// ReadDir lists the names in a directory, sorted.
	ReadDir(name string) ([]string, error)
	Stat(name string) (fs.FileInfo, error)
	// SyncDir makes creations, removals and renames inside dir durable.
	SyncDir(dir string) error
}

// OS is the real filesystem.
type OS struct{}

type osFile struct {
	*os.File
	flag   int // access mode the file was opened with, for its O_DIRECT twin
	direct *directFD
}

// directFD is a second descriptor of the same file opened with O_DIRECT,
// opened on first use.
type directFD struct {
	once sync.Once
	f    *os.File
	err  error
}

// Default is the real filesystem.
var Default FS = OS{}

func (OS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return osFile{File: f, flag: flag & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR), direct: &directFD{}}, nil
}

func (OS) Remove(name string) error             { return os.Remove(name) }
func (OS) Rename(oldname, newname string) error { return os.Rename(oldname, newname) }
func (OS) MkdirAll(name string, perm fs.FileMode) error {
	return os.MkdirAll(name, perm)
}
func (OS) Stat(name string) (fs.FileInfo, error) { return os.Stat(name) }

func (OS) ReadDir(name string) ([]string, error) {
	ents, err := os.ReadDir(name)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(ents))
	for i, e := range ents {
		names[i] = e.Name()
	}
	return names, nil
}

func (OS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func (f osFile) Sync() error { return unix.Fdatasync(int(f.Fd())) }

func (f osFile) Close() error {
	if f.direct != nil && f.direct.f != nil {
		f.direct.f.Close()
	}
	return f.File.Close()
}

// DirectWriter is an optional File capability: a write that bypasses the
// page cache (O_DIRECT). p, off and len(p) must be multiples of DirectAlign
// and p must start at an address aligned to it. The data is as durable as a
// plain write until the next Sync.
type DirectWriter interface {
	WriteDirectAt(p []byte, off int64) (int, error)
}

// DirectReader is an optional File capability: a read that bypasses the page
// cache (O_DIRECT), with the alignment rules of DirectWriter. It sees every
// write, buffered or direct, that returned before it.
type DirectReader interface {
	ReadDirectAt(p []byte, off int64) (int, error)
}

// DirectVectorWriter is an optional File capability: one O_DIRECT write of
// several buffers to consecutive bytes from off (pwritev), each buffer
// aligned as for WriteDirectAt.
type DirectVectorWriter interface {
	WritevDirectAt(bufs [][]byte, off int64) (int, error)
}

func (f osFile) WritevDirectAt(bufs [][]byte, off int64) (int, error) {
	fd := f.File
	if d := f.directFile(); d != nil {
		fd = d
	}
	bufs = slices.Clone(bufs) // trimmed as they are written
	var total int
	for len(bufs) > 0 {
		n, err := unix.Pwritev(int(fd.Fd()), bufs, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return total, &fs.PathError{Op: "pwritev", Path: f.Name(), Err: err}
		}
		if n == 0 {
			return total, io.ErrShortWrite
		}
		total += n
		off += int64(n)
		for n > 0 && len(bufs) > 0 {
			k := min(n, len(bufs[0]))
			bufs[0] = bufs[0][k:]
			n -= k
			if len(bufs[0]) == 0 {
				bufs = bufs[1:]
			}
		}
	}
	return total, nil
}

// Allocator is an optional File capability: reserve disk blocks for [off,
// off+length) and grow the file to cover it (fallocate mode 0); the new bytes
// read as zeroes. Writes into them then neither extend the file nor allocate.
type Allocator interface {
	Allocate(off, length int64) error
}

func (f osFile) Allocate(off, length int64) error {
	return unix.Fallocate(int(f.Fd()), 0, off, length)
}

// DirectAlign is the alignment WriteDirectAt and ReadDirectAt need.
const DirectAlign = 4096

// DirectAligned reports whether p and off meet the alignment of WriteDirectAt
// and ReadDirectAt. Implementations without a kernel to refuse a misaligned
// request (MemFS) check it, so tests catch what O_DIRECT would reject.
func DirectAligned(p []byte, off int64) bool {
	return off%DirectAlign == 0 && len(p)%DirectAlign == 0 &&
		(len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%DirectAlign == 0)
}

// AlignedBuffer returns a zeroed buffer of n bytes aligned to DirectAlign.
func AlignedBuffer(n int) []byte {
	b := make([]byte, n+DirectAlign)
	pad := (DirectAlign - int(uintptr(unsafe.Pointer(&b[0]))%DirectAlign)) % DirectAlign
	return b[pad : pad+n : pad+n]
}

// directFile returns the O_DIRECT descriptor, or nil where the filesystem
// has no O_DIRECT (tmpfs): then the caller uses the plain one.
func (f osFile) directFile() *os.File {
	f.direct.once.Do(func() {
		// Through /proc: the name may have been renamed since (a journal
		// segment is created under a temporary name).
		self := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
		f.direct.f, f.direct.err = os.OpenFile(self, f.flag|unix.O_DIRECT, 0)
		if f.direct.err != nil {
			f.direct.f, f.direct.err = os.OpenFile(f.Name(), f.flag|unix.O_DIRECT, 0)
		}
	})
	if f.direct.err != nil {
		return nil
	}
	return f.direct.f
}

func (f osFile) WriteDirectAt(p []byte, off int64) (int, error) {
	if d := f.directFile(); d != nil {
		return d.WriteAt(p, off)
	}
	return f.WriteAt(p, off)
}

func (f osFile) ReadDirectAt(p []byte, off int64) (int, error) {
	if d := f.directFile(); d != nil {
		return d.ReadAt(p, off)
	}
	return f.ReadAt(p, off)
}

func (f osFile) Size() (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func (f osFile) PunchHole(off, length int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return writeZeroes(f, off, length)
	}
	return err
}

func (f osFile) ZeroRange(off, length int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return writeZeroes(f, off, length)
	}
	return err
}

// writeZeroes is the fallback for filesystems without fallocate modes (tmpfs
// lacks FALLOC_FL_ZERO_RANGE). Like FALLOC_FL_KEEP_SIZE, it stops at the end of
// the file rather than extending it.
func writeZeroes(f osFile, off, length int64) error {
	size, err := f.Size()
	if err != nil {
		return err
	}
	length = min(length, size-off)
	if length <= 0 {
		return nil
	}
	buf := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(buf)))
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// WriteFileAtomic writes data to name so that a crash leaves either the old
// content or the new: write a temporary file, sync it, rename it over name,
// sync the directory.
func WriteFileAtomic(fsys FS, name string, data []byte, perm fs.FileMode) error {
	tmp := name + ".tmp"
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return err
	}
	return fsys.SyncDir(filepath.Dir(name))
}

// ReadFile reads a whole file.
func ReadFile(fsys FS, name string) ([]byte, error) {
	f, err := fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, size)
	n, err := f.ReadAt(buf, 0)
	if err != nil && !(errors.Is(err, io.EOF) && int64(n) == size) {
		return nil, err
	}
	return buf, nil
}

// Seeker is an optional File capability: where the file's data and holes
// lie (lseek with SEEK_DATA and SEEK_HOLE). A hole reads as zeroes. An
// implementation may call a hole data (a filesystem that keeps no map
// reports the whole file as data), never data a hole. For off at or past
// the end of the file both methods return off.
type Seeker interface {
	// SeekData returns where the first data at or after off starts, or the
	// file size when only holes follow.
	SeekData(off int64) (int64, error)
	// SeekHole returns where the first hole at or after off starts; the
	// end of the file counts as one.
	SeekHole(off int64) (int64, error)
}

// Extent is a run of bytes of a file or disk in one allocation state.
type Extent struct {
	Offset, Length int64
	// Hole: no storage is allocated for the run.
	Hole bool
	// Zero: the run reads as zeroes. A hole always does; allocated bytes
	// may be known to as well (a zeroed range).
	Zero bool
}

// Map describes [off, off+length) of f as consecutive extents, from its
// Seeker (holes are Hole and Zero, the rest data); a file without one, or
// whose Seeker says ErrUnsupported, is one data extent. The range must lie
// within the file.
func Map(f File, off, length int64) ([]Extent, error) {
	if length <= 0 {
		return nil, nil
	}
	all := []Extent{{Offset: off, Length: length}}
	s, ok := f.(Seeker)
	if !ok {
		return all, nil
	}
	var out []Extent
	add := func(from, to int64, hole bool) {
		if k := len(out) - 1; k >= 0 && out[k].Hole == hole {
			out[k].Length = to - out[k].Offset
			return
		}
		out = append(out, Extent{Offset: from, Length: to - from, Hole: hole, Zero: hole})
	}
	end := off + length
	for pos := off; pos < end; {
		d, err := s.SeekData(pos)
		if errors.Is(err, ErrUnsupported) {
			return all, nil
		}
		if err != nil {
			return nil, err
		}
		if d > pos {
			d = min(d, end)
			add(pos, d, true)
			pos = d
			continue
		}
		h, err := s.SeekHole(pos)
		if errors.Is(err, ErrUnsupported) {
			return all, nil
		}
		if err != nil {
			return nil, err
		}
		if h <= pos { // a seeker out of step: take the rest as data
			h = end
		}
		h = min(h, end)
		add(pos, h, false)
		pos = h
	}
	return out, nil
}

// SeekData and SeekHole use lseek(2), which moves the descriptor's offset;
// osFile reads and writes with pread/pwrite, which ignore it.
func (f osFile) SeekData(off int64) (int64, error) {
	n, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) { // no data at or after off
		size, serr := f.Size()
		if serr != nil {
			return 0, serr
		}
		return max(off, size), nil
	}
	if err != nil {
		return 0, &fs.PathError{Op: "lseek", Path: f.Name(), Err: err}
	}
	return n, nil
}

func (f osFile) SeekHole(off int64) (int64, error) {
	n, err := unix.Seek(int(f.Fd()), off, unix.SEEK_HOLE)
	if errors.Is(err, unix.ENXIO) { // off is at or past the end
		return off, nil
	}
	if err != nil {
		return 0, &fs.PathError{Op: "lseek", Path: f.Name(), Err: err}
	}
	return n, nil
}
