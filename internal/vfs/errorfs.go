package vfs

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"sync/atomic"
)

// ErrInjected is a ready-made error for ErrorFS injections.
var ErrInjected = errors.New("vfs: injected error")

// Op is a kind of filesystem call that ErrorFS counts and can fail.
type Op int

const (
	OpOpen     Op = iota // FS.OpenFile
	OpWrite              // File.WriteAt
	OpRead               // File.ReadAt
	OpSync               // File.Sync
	OpSyncDir            // FS.SyncDir
	OpRename             // FS.Rename
	OpRemove             // FS.Remove
	OpTruncate           // File.Truncate
	OpPunch              // File.PunchHole and File.ZeroRange
	OpMkdir              // FS.MkdirAll
	OpClose              // File.Close
	OpReadDir            // FS.ReadDir
	OpStat               // FS.Stat and File.Size
	numOps
)

var opNames = [numOps]string{
	OpOpen: "open", OpWrite: "write", OpRead: "read", OpSync: "sync",
	OpSyncDir: "syncdir", OpRename: "rename", OpRemove: "remove",
	OpTruncate: "truncate", OpPunch: "punch", OpMkdir: "mkdir",
	OpClose: "close", OpReadDir: "readdir", OpStat: "stat",
}

func (op Op) String() string {
	if op >= 0 && op < numOps {
		return opNames[op]
	}
	return fmt.Sprintf("Op(%d)", int(op))
}

// ErrorFS wraps an FS and makes chosen calls fail. Files it opens are wrapped
// too, so their calls are counted and can fail. A failed call does not reach
// the inner FS, except a short write, which writes the first half, and Close,
// which always closes the inner file.
//
// An injection is matched against the name the call is about: the path given
// to the FS call, both paths of a Rename, or the name a File was opened with.
//
// Safe for concurrent use.
type ErrorFS struct {
	inner  FS
	counts [numOps]atomic.Int64

	mu    sync.Mutex
	rules []*injection
}

// injection is one pending failure.
type injection struct {
	op     Op
	substr string // only calls whose name contains it count
	left   int    // matching calls to let through before firing
	always bool   // fire on every matching call, until Reset
	short  bool   // a short write rather than err
	err    error
}

// NewErrorFS returns an ErrorFS over inner that injects nothing until told.
func NewErrorFS(inner FS) *ErrorFS { return &ErrorFS{inner: inner} }

var _ FS = (*ErrorFS)(nil)

// InjectAfter makes the (n+1)-th next call of op fail with err, once: n=0 fails
// the very next call.
func (e *ErrorFS) InjectAfter(op Op, n int, err error) { e.InjectAfterPath(op, "", n, err) }

// InjectAfterPath is InjectAfter counting only calls whose name contains substr.
func (e *ErrorFS) InjectAfterPath(op Op, substr string, n int, err error) {
	e.add(&injection{op: op, substr: substr, left: n, err: err})
}

// InjectAlways makes every call of op fail with err until Reset.
func (e *ErrorFS) InjectAlways(op Op, err error) {
	e.add(&injection{op: op, always: true, err: err})
}

// InjectShortWrite makes the (n+1)-th next WriteAt write only the first half
// of its buffer and return that count with io.ErrShortWrite, once.
func (e *ErrorFS) InjectShortWrite(n int) {
	e.add(&injection{op: OpWrite, left: n, short: true, err: io.ErrShortWrite})
}

// InjectShortWritePath is InjectShortWrite counting only writes to files
// whose name contains substr.
func (e *ErrorFS) InjectShortWritePath(substr string, n int) {
	e.add(&injection{op: OpWrite, substr: substr, left: n, short: true, err: io.ErrShortWrite})
}

// Reset drops every pending injection. Counts are kept.
func (e *ErrorFS) Reset() {
	e.mu.Lock()
	e.rules = nil
	e.mu.Unlock()
}

// Count returns how many calls of op were made, failed ones included.
func (e *ErrorFS) Count(op Op) int64 {
	if op < 0 || op >= numOps {
		return 0
	}
	return e.counts[op].Load()
}

func (e *ErrorFS) add(in *injection) {
	e.mu.Lock()
	e.rules = append(e.rules, in)
	e.mu.Unlock()
}

// fault counts a call of op about names and returns the injection that fires
// for it, if any. Every matching one-shot injection counts the call, so two
// injections armed together keep their own countdowns; when several fire at
// once the earliest added wins and all are spent.
func (e *ErrorFS) fault(op Op, names ...string) *injection {
	e.counts[op].Add(1)
	e.mu.Lock()
	defer e.mu.Unlock()
	var fired *injection
	kept := e.rules[:0]
	for _, in := range e.rules {
		if in.op != op || !matches(in.substr, names) {
			kept = append(kept, in)
			continue
		}
		switch {
		case in.always:
			fired = cmp.Or(fired, in)
			kept = append(kept, in)
		case in.left <= 0:
			fired = cmp.Or(fired, in) // spent: not kept
		default:
			in.left--
			kept = append(kept, in)
		}
	}
	clear(e.rules[len(kept):])
	e.rules = kept
	return fired
}

func matches(substr string, names []string) bool {
	if substr == "" {
		return true
	}
	for _, n := range names {
		if strings.Contains(n, substr) {
			return true
		}
	}
	return false
}

// check is fault for calls that have no partial outcome.
func (e *ErrorFS) check(op Op, names ...string) error {
	if in := e.fault(op, names...); in != nil {
		return in.err
	}
	return nil
}

func (e *ErrorFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	if err := e.check(OpOpen, name); err != nil {
		return nil, err
	}
	f, err := e.inner.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &errorFile{fs: e, inner: f}, nil
}

func (e *ErrorFS) Remove(name string) error {
	if err := e.check(OpRemove, name); err != nil {
		return err
	}
	return e.inner.Remove(name)
}

func (e *ErrorFS) Rename(oldname, newname string) error {
	if err := e.check(OpRename, oldname, newname); err != nil {
		return err
	}
	return e.inner.Rename(oldname, newname)
}

func (e *ErrorFS) MkdirAll(name string, perm fs.FileMode) error {
	if err := e.check(OpMkdir, name); err != nil {
		return err
	}
	return e.inner.MkdirAll(name, perm)
}

func (e *ErrorFS) ReadDir(name string) ([]string, error) {
	if err := e.check(OpReadDir, name); err != nil {
		return nil, err
	}
	return e.inner.ReadDir(name)
}

func (e *ErrorFS) Stat(name string) (fs.FileInfo, error) {
	if err := e.check(OpStat, name); err != nil {
		return nil, err
	}
	return e.inner.Stat(name)
}

func (e *ErrorFS) SyncDir(dir string) error {
	if err := e.check(OpSyncDir, dir); err != nil {
		return err
	}
	return e.inner.SyncDir(dir)
}

// errorFile is a File opened through an ErrorFS.
type errorFile struct {
	fs    *ErrorFS
	inner File
}

func (f *errorFile) Name() string { return f.inner.Name() }

func (f *errorFile) ReadAt(b []byte, off int64) (int, error) {
	if err := f.fs.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	return f.inner.ReadAt(b, off)
}

func (f *errorFile) WriteAt(b []byte, off int64) (int, error) {
	in := f.fs.fault(OpWrite, f.Name())
	switch {
	case in == nil:
		return f.inner.WriteAt(b, off)
	case in.short:
		n, err := f.inner.WriteAt(b[:len(b)/2], off)
		if err != nil {
			return n, err
		}
		return n, in.err
	default:
		return 0, in.err
	}
}

// WriteDirectAt fails like WriteAt (a short write keeps whole DirectAlign
// blocks) and goes to the inner file's WriteDirectAt, or its WriteAt if it
// has none, as the real filesystem falls back where O_DIRECT is missing.
func (f *errorFile) WriteDirectAt(b []byte, off int64) (int, error) {
	write := f.inner.WriteAt
	if dw, ok := f.inner.(DirectWriter); ok {
		write = dw.WriteDirectAt
	}
	in := f.fs.fault(OpWrite, f.Name())
	switch {
	case in == nil:
		return write(b, off)
	case in.short:
		n, err := write(b[:len(b)/2&^(DirectAlign-1)], off)
		if err != nil {
			return n, err
		}
		return n, in.err
	default:
		return 0, in.err
	}
}

// WritevDirectAt fails like WriteAt (a short write keeps the first half of
// the buffers) and goes to the inner file's WritevDirectAt, or writes the
// buffers one by one.
func (f *errorFile) WritevDirectAt(bufs [][]byte, off int64) (int, error) {
	write := func(bufs [][]byte) (int, error) {
		if vw, ok := f.inner.(DirectVectorWriter); ok {
			return vw.WritevDirectAt(bufs, off)
		}
		total := 0
		for _, b := range bufs {
			n, err := f.inner.WriteAt(b, off+int64(total))
			total += n
			if err != nil {
				return total, err
			}
		}
		return total, nil
	}
	in := f.fs.fault(OpWrite, f.Name())
	switch {
	case in == nil:
		return write(bufs)
	case in.short:
		n, err := write(bufs[:len(bufs)/2])
		if err != nil {
			return n, err
		}
		return n, in.err
	default:
		return 0, in.err
	}
}

// Allocate fails like Truncate and goes to the inner file's Allocate, or
// fails with ErrUnsupported if it has none.
func (f *errorFile) Allocate(off, length int64) error {
	if err := f.fs.check(OpTruncate, f.Name()); err != nil {
		return err
	}
	if a, ok := f.inner.(Allocator); ok {
		return a.Allocate(off, length)
	}
	return ErrUnsupported
}

// ReadDirectAt fails like ReadAt and goes to the inner file's ReadDirectAt,
// or its ReadAt.
func (f *errorFile) ReadDirectAt(b []byte, off int64) (int, error) {
	if err := f.fs.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	if dr, ok := f.inner.(DirectReader); ok {
		return dr.ReadDirectAt(b, off)
	}
	return f.inner.ReadAt(b, off)
}

// Close closes the inner file even when it fails by injection, as close(2)
// releases the descriptor whatever it returns.
func (f *errorFile) Close() error {
	injected := f.fs.check(OpClose, f.Name())
	err := f.inner.Close()
	if injected != nil {
		return injected
	}
	return err
}

func (f *errorFile) Sync() error {
	if err := f.fs.check(OpSync, f.Name()); err != nil {
		return err
	}
	return f.inner.Sync()
}

func (f *errorFile) Truncate(size int64) error {
	if err := f.fs.check(OpTruncate, f.Name()); err != nil {
		return err
	}
	return f.inner.Truncate(size)
}

func (f *errorFile) Size() (int64, error) {
	if err := f.fs.check(OpStat, f.Name()); err != nil {
		return 0, err
	}
	return f.inner.Size()
}

func (f *errorFile) PunchHole(off, length int64) error {
	if err := f.fs.check(OpPunch, f.Name()); err != nil {
		return err
	}
	return f.inner.PunchHole(off, length)
}

func (f *errorFile) ZeroRange(off, length int64) error {
	if err := f.fs.check(OpPunch, f.Name()); err != nil {
		return err
	}
	return f.inner.ZeroRange(off, length)
}

// SeekData fails with ErrUnsupported if the inner file has no Seeker,
// else like ReadAt, and goes to the inner file's SeekData.
func (f *errorFile) SeekData(off int64) (int64, error) {
	s, ok := f.inner.(Seeker)
	if !ok {
		return 0, ErrUnsupported
	}
	if err := f.fs.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	return s.SeekData(off)
}

// SeekHole is SeekData's twin.
func (f *errorFile) SeekHole(off int64) (int64, error) {
	s, ok := f.inner.(Seeker)
	if !ok {
		return 0, ErrUnsupported
	}
	if err := f.fs.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	return s.SeekHole(off)
}
