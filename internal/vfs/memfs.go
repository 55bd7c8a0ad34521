package vfs

import (
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// MemFS is an in-memory FS that follows the durability contract and can
// "crash": CrashClone returns the state a power cut would leave, keeping only
// what was synced.
//
// It tracks, per file, the current content and the content as of the last
// File.Sync, plus the list of changes made since (writes, truncations, zeroed
// ranges); per directory, the current entries and the entries as of the last
// SyncDir. A directory is a name like any other: it is durable only after
// SyncDir on its parent. The root always exists.
//
// Absolute and relative names resolve from the same root: "/a", "a" and "./a"
// are the same file, and "/" and "." are the root. Names are cleaned with
// path.Clean. Directories cannot be opened with OpenFile (EISDIR); O_APPEND is
// not supported. Files are sparse: untouched ranges take no memory, so a
// disk-sized file that is mostly holes is cheap.
//
// Errors are *fs.PathError (*os.LinkError for Rename) wrapping the errno the os
// package would return, so errors.Is(err, fs.ErrNotExist) and friends work.
//
// MemFS and its files are safe for concurrent use. Lock order: MemFS.mu (the
// namespace: every directory's entries) before memInode.mu (one file's data).
// File reads and writes take only their inode's lock.
type MemFS struct {
	mu   sync.Mutex
	root *memInode
}

// NewMemFS returns an empty MemFS holding only the root directory.
func NewMemFS() *MemFS {
	return &MemFS{root: newDirInode(0o755)}
}

var _ FS = (*MemFS)(nil)

// memInode is a file or a directory. A name points to an inode; several names
// may point to the same one after a crash that kept both sides of a rename.
type memInode struct {
	mode fs.FileMode // fs.ModeDir set for directories

	// Directories, guarded by MemFS.mu.
	entries map[string]*memInode // current
	synced  map[string]*memInode // as of the last SyncDir

	// Files, guarded by mu.
	mu      sync.RWMutex
	data    *sparse  // current content
	durable *sparse  // content as of the last Sync
	pending []fileOp // changes since the last Sync; durable + pending = data
}

func newDirInode(perm fs.FileMode) *memInode {
	return &memInode{
		mode:    fs.ModeDir | perm.Perm(),
		entries: map[string]*memInode{},
		synced:  map[string]*memInode{},
	}
}

func newFileInode(perm fs.FileMode) *memInode {
	return &memInode{mode: perm.Perm(), data: newSparse(), durable: newSparse()}
}

func (n *memInode) isDir() bool { return n.mode.IsDir() }

// fileOpKind says what an unsynced change to a file did.
type fileOpKind uint8

const (
	fileOpWrite    fileOpKind = iota + 1 // data written at off
	fileOpTruncate                       // size set to n
	fileOpZero                           // [off, off+n) zeroed, size kept
)

// fileOp is one change to a file made since its last Sync.
type fileOp struct {
	kind fileOpKind
	off  int64
	n    int64
	data []byte // owned copy, for fileOpWrite
}

func (op fileOp) apply(s *sparse) {
	switch op.kind {
	case fileOpWrite:
		s.writeAt(op.data, op.off)
	case fileOpTruncate:
		s.truncate(op.n)
	case fileOpZero:
		s.zero(op.off, op.n)
	}
}

// record applies op to the current content and remembers it until the next
// Sync. Caller holds n.mu.
func (n *memInode) record(op fileOp) {
	op.apply(n.data)
	n.pending = append(n.pending, op)
}

// resolve returns the path components of name, with the root as nil.
func resolve(name string) ([]string, error) {
	p := strings.TrimLeft(path.Clean(name), "/")
	if p == "" || p == "." {
		return nil, nil
	}
	parts := strings.Split(p, "/")
	if parts[0] == ".." {
		return nil, unix.EINVAL // above the root
	}
	return parts, nil
}

// walk returns the inode at parts. Caller holds m.mu.
func (m *MemFS) walk(parts []string) (*memInode, error) {
	n := m.root
	for _, p := range parts {
		if !n.isDir() {
			return nil, unix.ENOTDIR
		}
		next, ok := n.entries[p]
		if !ok {
			return nil, unix.ENOENT
		}
		n = next
	}
	return n, nil
}

// lookup returns the inode called name. Caller holds m.mu.
func (m *MemFS) lookup(name string) (*memInode, error) {
	parts, err := resolve(name)
	if err != nil {
		return nil, err
	}
	return m.walk(parts)
}

// lookupParent returns the directory holding name and name's last component.
// The root has no parent: EBUSY, as Linux says for renaming or removing "/".
// Caller holds m.mu.
func (m *MemFS) lookupParent(name string) (*memInode, string, error) {
	parts, err := resolve(name)
	if err != nil {
		return nil, "", err
	}
	if len(parts) == 0 {
		return nil, "", unix.EBUSY
	}
	dir, err := m.walk(parts[:len(parts)-1])
	if err != nil {
		return nil, "", err
	}
	if !dir.isDir() {
		return nil, "", unix.ENOTDIR
	}
	return dir, parts[len(parts)-1], nil
}

func (m *MemFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	perr := func(err error) (File, error) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	if flag&os.O_APPEND != 0 {
		return perr(ErrUnsupported)
	}
	acc := flag & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
	m.mu.Lock()
	defer m.mu.Unlock()
	parts, err := resolve(name)
	if err != nil {
		return perr(err)
	}
	n := m.root
	if len(parts) > 0 {
		dir, base, err := m.lookupParent(name)
		if err != nil {
			return perr(err)
		}
		n = dir.entries[base]
		switch {
		case n == nil && flag&os.O_CREATE == 0:
			return perr(unix.ENOENT)
		case n == nil:
			n = newFileInode(perm)
			dir.entries[base] = n
		case flag&(os.O_CREATE|os.O_EXCL) == os.O_CREATE|os.O_EXCL:
			return perr(unix.EEXIST)
		}
	}
	if n.isDir() {
		return perr(unix.EISDIR)
	}
	f := &memFile{ino: n, name: name, read: acc != os.O_WRONLY, write: acc != os.O_RDONLY}
	if flag&os.O_TRUNC != 0 && f.write {
		n.mu.Lock()
		if n.data.size != 0 {
			n.record(fileOp{kind: fileOpTruncate})
		}
		n.mu.Unlock()
	}
	return f, nil
}

func (m *MemFS) Remove(name string) error {
	perr := func(err error) error { return &fs.PathError{Op: "remove", Path: name, Err: err} }
	m.mu.Lock()
	defer m.mu.Unlock()
	dir, base, err := m.lookupParent(name)
	if err != nil {
		return perr(err)
	}
	n, ok := dir.entries[base]
	if !ok {
		return perr(unix.ENOENT)
	}
	if n.isDir() && len(n.entries) > 0 {
		return perr(unix.ENOTEMPTY)
	}
	delete(dir.entries, base)
	return nil
}

// Rename follows os.Rename on Linux: it atomically replaces a file at newname,
// never replaces a directory (EEXIST, even an empty one), and does not move a
// directory into itself (EINVAL).
func (m *MemFS) Rename(oldname, newname string) error {
	lerr := func(err error) error {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: err}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	odir, obase, err := m.lookupParent(oldname)
	if err != nil {
		return lerr(err)
	}
	n, ok := odir.entries[obase]
	if !ok {
		return lerr(unix.ENOENT)
	}
	ndir, nbase, err := m.lookupParent(newname)
	if err != nil {
		return lerr(err)
	}
	if n.isDir() {
		// newname must not be inside the directory being moved.
		op, _ := resolve(oldname)
		np, _ := resolve(newname)
		if len(np) > len(op) && slices.Equal(np[:len(op)], op) {
			return lerr(unix.EINVAL)
		}
	}
	if target, ok := ndir.entries[nbase]; ok {
		switch {
		case target.isDir():
			return lerr(unix.EEXIST) // as os.Rename, which never replaces a directory
		case n.isDir():
			return lerr(unix.ENOTDIR)
		case target == n:
			return nil // same file: rename(2) does nothing
		}
	}
	delete(odir.entries, obase)
	ndir.entries[nbase] = n
	return nil
}

func (m *MemFS) MkdirAll(name string, perm fs.FileMode) error {
	perr := func(err error) error { return &fs.PathError{Op: "mkdir", Path: name, Err: err} }
	parts, err := resolve(name)
	if err != nil {
		return perr(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n := m.root
	for _, p := range parts {
		next, ok := n.entries[p]
		if !ok {
			next = newDirInode(perm)
			n.entries[p] = next
		} else if !next.isDir() {
			return perr(unix.ENOTDIR)
		}
		n = next
	}
	return nil
}

func (m *MemFS) ReadDir(name string) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.lookup(name)
	if err == nil && !n.isDir() {
		err = unix.ENOTDIR
	}
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	names := make([]string, 0, len(n.entries))
	for k := range n.entries {
		names = append(names, k)
	}
	slices.Sort(names)
	return names, nil
}

func (m *MemFS) Stat(name string) (fs.FileInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.lookup(name)
	if err != nil {
		return nil, &fs.PathError{Op: "stat", Path: name, Err: err}
	}
	fi := &memFileInfo{name: path.Base(path.Clean(name)), mode: n.mode}
	if !n.isDir() {
		n.mu.RLock()
		fi.size = n.data.size
		n.mu.RUnlock()
	}
	return fi, nil
}

// SyncDir makes dir's current entries durable: which name points to which
// file or directory. It does not sync the files' data.
func (m *MemFS) SyncDir(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, err := m.lookup(dir)
	if err == nil && !n.isDir() {
		err = unix.ENOTDIR
	}
	if err != nil {
		return &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	n.synced = maps.Clone(n.entries)
	return nil
}

// CrashClone returns what a power cut would leave of m: for every directory
// reachable from the root through synced entries, its synced entries; for every
// file reachable so, its content as of its last Sync. m is unchanged and open
// files stay open on m; the clone has no open files.
func (m *MemFS) CrashClone() *MemFS {
	return m.crashClone(nil)
}

// CrashCloneRandom is CrashClone where unsynced changes may survive in part, in
// any order, as the contract allows: each change to a file since its last Sync
// (write, truncation, zeroed range) is independently kept or dropped and the
// kept ones applied in order on top of the synced content; each directory
// entry whose current target differs from its synced one independently takes
// either. Names are visited in sorted order, so a given seed gives the same
// result for the same history.
//
// Keeping one side of a rename but not the other can leave a file under both
// names or under neither, as a real filesystem without SyncDir may. A directory
// reachable by more than one path keeps only its first, in breadth-first order.
func (m *MemFS) CrashCloneRandom(rng *rand.Rand) *MemFS {
	return m.crashClone(rng)
}

func (m *MemFS) crashClone(rng *rand.Rand) *MemFS {
	keep := func() bool { return rng.Uint64()&1 == 1 }
	m.mu.Lock()
	defer m.mu.Unlock()
	cloned := map[*memInode]*memInode{}
	cloneFile := func(n *memInode) *memInode {
		n.mu.RLock()
		defer n.mu.RUnlock()
		s := n.durable.clone()
		if rng != nil {
			for _, op := range n.pending {
				if keep() {
					op.apply(s)
				}
			}
		}
		return &memInode{mode: n.mode, data: s, durable: s.clone()}
	}
	type work struct{ old, new *memInode }
	c := &MemFS{root: newDirInode(m.root.mode)}
	cloned[m.root] = c.root
	queue := []work{{m.root, c.root}}
	for len(queue) > 0 {
		w := queue[0]
		queue = queue[1:]
		names := make([]string, 0, len(w.old.synced))
		for k := range w.old.synced {
			names = append(names, k)
		}
		if rng != nil {
			for k, v := range w.old.entries {
				if _, ok := w.old.synced[k]; !ok && v != nil {
					names = append(names, k)
				}
			}
		}
		slices.Sort(names)
		for _, name := range names {
			target := w.old.synced[name]
			if cur := w.old.entries[name]; rng != nil && cur != target && keep() {
				target = cur
			}
			if target == nil {
				continue // created and not synced, or removed
			}
			nc, seen := cloned[target]
			switch {
			case seen && target.isDir():
				continue // a directory has one parent; see CrashCloneRandom
			case seen:
				// A file under two names: keep them one inode.
			case target.isDir():
				nc = newDirInode(target.mode)
				cloned[target] = nc
				queue = append(queue, work{target, nc})
			default:
				nc = cloneFile(target)
				cloned[target] = nc
			}
			w.new.entries[name] = nc
			w.new.synced[name] = nc
		}
	}
	return c
}

// memFile is an open MemFS file. Like an os.File it stays usable after its
// name is renamed or removed.
type memFile struct {
	ino         *memInode
	name        string
	read, write bool
	closed      atomic.Bool
}

func (f *memFile) Name() string { return f.name }

// check returns the error for op on f, if it may not proceed.
func (f *memFile) check(op string, needWrite bool) error {
	switch {
	case f.closed.Load():
		return &fs.PathError{Op: op, Path: f.name, Err: fs.ErrClosed}
	case needWrite && !f.write, !needWrite && !f.read:
		return &fs.PathError{Op: op, Path: f.name, Err: unix.EBADF}
	}
	return nil
}

func (f *memFile) ReadAt(b []byte, off int64) (int, error) {
	if err := f.check("read", false); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, &fs.PathError{Op: "readat", Path: f.name, Err: unix.EINVAL}
	}
	if len(b) == 0 {
		return 0, nil
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	n := f.ino.data.readAt(b, off)
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(b []byte, off int64) (int, error) {
	if err := f.check("write", true); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, &fs.PathError{Op: "writeat", Path: f.name, Err: unix.EINVAL}
	}
	if len(b) == 0 {
		return 0, nil
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.record(fileOp{kind: fileOpWrite, off: off, data: slices.Clone(b)})
	return len(b), nil
}

// WriteDirectAt is WriteAt with O_DIRECT's alignment rules: a misaligned
// request fails with EINVAL, as the kernel's would.
func (f *memFile) WriteDirectAt(b []byte, off int64) (int, error) {
	if !DirectAligned(b, off) {
		return 0, &fs.PathError{Op: "writeat", Path: f.name, Err: unix.EINVAL}
	}
	return f.WriteAt(b, off)
}

// WritevDirectAt writes bufs one after the other, each with WriteDirectAt's
// alignment rules.
func (f *memFile) WritevDirectAt(bufs [][]byte, off int64) (int, error) {
	for _, b := range bufs {
		if !DirectAligned(b, off) {
			return 0, &fs.PathError{Op: "pwritev", Path: f.name, Err: unix.EINVAL}
		}
	}
	var total int
	for _, b := range bufs {
		n, err := f.WriteAt(b, off+int64(total))
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// Allocate grows the file with zeroes to cover [off, off+length).
func (f *memFile) Allocate(off, length int64) error {
	if err := f.check("fallocate", true); err != nil {
		return err
	}
	if off < 0 || length <= 0 {
		return &fs.PathError{Op: "fallocate", Path: f.name, Err: unix.EINVAL}
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	if end := off + length; end > f.ino.data.size {
		f.ino.record(fileOp{kind: fileOpTruncate, n: end})
	}
	return nil
}

// ReadDirectAt is ReadAt with O_DIRECT's alignment rules.
func (f *memFile) ReadDirectAt(b []byte, off int64) (int, error) {
	if !DirectAligned(b, off) {
		return 0, &fs.PathError{Op: "readat", Path: f.name, Err: unix.EINVAL}
	}
	return f.ReadAt(b, off)
}

func (f *memFile) Close() error {
	if f.closed.Swap(true) {
		return &fs.PathError{Op: "close", Path: f.name, Err: fs.ErrClosed}
	}
	return nil
}

// Sync makes the file's current data and size what a crash keeps.
func (f *memFile) Sync() error {
	if f.closed.Load() {
		return &fs.PathError{Op: "sync", Path: f.name, Err: fs.ErrClosed}
	}
	n := f.ino
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, op := range n.pending {
		op.apply(n.durable)
	}
	n.pending = nil
	return nil
}

func (f *memFile) Truncate(size int64) error {
	if err := f.check("truncate", true); err != nil {
		return err
	}
	if size < 0 {
		return &fs.PathError{Op: "truncate", Path: f.name, Err: unix.EINVAL}
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.record(fileOp{kind: fileOpTruncate, n: size})
	return nil
}

func (f *memFile) Size() (int64, error) {
	if f.closed.Load() {
		return 0, &fs.PathError{Op: "stat", Path: f.name, Err: fs.ErrClosed}
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	return f.ino.data.size, nil
}

func (f *memFile) PunchHole(off, length int64) error { return f.zero("punchhole", off, length) }
func (f *memFile) ZeroRange(off, length int64) error { return f.zero("zerorange", off, length) }

// zero zeroes [off, off+length) within the file's size, as fallocate with
// FALLOC_FL_KEEP_SIZE does, including its EINVAL for length <= 0.
func (f *memFile) zero(op string, off, length int64) error {
	if err := f.check(op, true); err != nil {
		return err
	}
	if off < 0 || length <= 0 {
		return &fs.PathError{Op: op, Path: f.name, Err: unix.EINVAL}
	}
	f.ino.mu.Lock()
	defer f.ino.mu.Unlock()
	f.ino.record(fileOp{kind: fileOpZero, off: off, n: length})
	return nil
}

type memFileInfo struct {
	name string
	size int64
	mode fs.FileMode
}

func (fi *memFileInfo) Name() string       { return fi.name }
func (fi *memFileInfo) Size() int64        { return fi.size }
func (fi *memFileInfo) Mode() fs.FileMode  { return fi.mode }
func (fi *memFileInfo) ModTime() time.Time { return time.Time{} }
func (fi *memFileInfo) IsDir() bool        { return fi.mode.IsDir() }
func (fi *memFileInfo) Sys() any           { return nil }

// chunkSize is the granularity of sparse: ranges never written take no memory.
const chunkSize = 4096

// sparse is the content of a file: its size and the chunks that may hold
// non-zero bytes; a missing chunk reads as zeroes. Invariant: every byte at or
// past size is zero, so growing the file exposes zeroes.
type sparse struct {
	size   int64
	chunks map[int64][]byte // chunk index -> chunkSize bytes
}

func newSparse() *sparse { return &sparse{chunks: map[int64][]byte{}} }

func (s *sparse) clone() *sparse {
	c := &sparse{size: s.size, chunks: make(map[int64][]byte, len(s.chunks))}
	for i, b := range s.chunks {
		c.chunks[i] = slices.Clone(b)
	}
	return c
}

// readAt copies from [off, size) into b and returns the count.
func (s *sparse) readAt(b []byte, off int64) int {
	if off >= s.size {
		return 0
	}
	b = b[:min(int64(len(b)), s.size-off)]
	for done := 0; done < len(b); {
		pos := off + int64(done)
		i, co := pos/chunkSize, pos%chunkSize
		n := min(len(b)-done, int(chunkSize-co))
		if c, ok := s.chunks[i]; ok {
			copy(b[done:done+n], c[co:])
		} else {
			clear(b[done : done+n])
		}
		done += n
	}
	return len(b)
}

// writeAt writes b at off, growing the file if needed.
func (s *sparse) writeAt(b []byte, off int64) {
	for done := 0; done < len(b); {
		pos := off + int64(done)
		i, co := pos/chunkSize, pos%chunkSize
		c, ok := s.chunks[i]
		if !ok {
			c = make([]byte, chunkSize)
			s.chunks[i] = c
		}
		done += copy(c[co:], b[done:])
	}
	s.size = max(s.size, off+int64(len(b)))
}

// truncate sets the size to n, dropping data past it.
func (s *sparse) truncate(n int64) {
	if n < s.size {
		s.zero(n, s.size-n)
	}
	s.size = n
}

// zero zeroes [off, off+length) within the current size.
func (s *sparse) zero(off, length int64) {
	if off >= s.size || length <= 0 {
		return
	}
	end := s.size
	if length < s.size-off {
		end = off + length
	}
	// Partial chunks at either end are cleared; whole chunks are dropped,
	// walking whichever is shorter, the range or the map.
	first, last := (off+chunkSize-1)/chunkSize, end/chunkSize // whole chunks [first, last)
	if end == s.size {
		last = (end + chunkSize - 1) / chunkSize // the tail chunk is all past end
	}
	if first >= last {
		s.clearBytes(off, end)
		return
	}
	s.clearBytes(off, first*chunkSize)
	s.clearBytes(last*chunkSize, end)
	if last-first <= int64(len(s.chunks)) {
		for i := first; i < last; i++ {
			delete(s.chunks, i)
		}
		return
	}
	for i := range s.chunks {
		if i >= first && i < last {
			delete(s.chunks, i)
		}
	}
}

// clearBytes zeroes [from, to), keeping the chunks. It is for the partial
// chunks at the ends of a range.
func (s *sparse) clearBytes(from, to int64) {
	for from < to {
		i, co := from/chunkSize, from%chunkSize
		n := min(to-from, chunkSize-co)
		if c, ok := s.chunks[i]; ok {
			clear(c[co : co+n])
		}
		from += n
	}
}

// SeekData finds the next chunk that holds data: MemFS's holes are the
// chunks never written or dropped by PunchHole, ZeroRange or Truncate.
func (f *memFile) SeekData(off int64) (int64, error) {
	if err := f.check("lseek", false); err != nil {
		return 0, err
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	s := f.ino.data
	if off < 0 {
		return 0, &fs.PathError{Op: "lseek", Path: f.name, Err: unix.EINVAL}
	}
	if off >= s.size {
		return off, nil
	}
	i := off / chunkSize
	if _, ok := s.chunks[i]; ok {
		return off, nil
	}
	next := int64(-1) // the first chunk after i that holds data
	for k := range s.chunks {
		if k > i && (next < 0 || k < next) {
			next = k
		}
	}
	if next < 0 {
		return s.size, nil
	}
	return min(next*chunkSize, s.size), nil
}

// SeekHole finds the next chunk without data, or the end of the file.
func (f *memFile) SeekHole(off int64) (int64, error) {
	if err := f.check("lseek", false); err != nil {
		return 0, err
	}
	f.ino.mu.RLock()
	defer f.ino.mu.RUnlock()
	s := f.ino.data
	if off < 0 {
		return 0, &fs.PathError{Op: "lseek", Path: f.name, Err: unix.EINVAL}
	}
	if off >= s.size {
		return off, nil
	}
	i := off / chunkSize
	for {
		if _, ok := s.chunks[i]; !ok {
			break
		}
		i++
	}
	return min(max(i*chunkSize, off), s.size), nil
}
