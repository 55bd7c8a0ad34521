package blockdev

// The FUSE front end: `vdrepl mount MOUNTPOINT` shows every export "VM/DISK"
// of the live catalogue as the plain file MOUNTPOINT/VM/DISK.img.
//
// Request mapping:
//
//	read, write            Disk.ReadAt, Disk.WriteAt (offsets and sizes as the caller gave them)
//	fsync, fdatasync       Disk.Flush: every write that returned before the fsync is durable
//	fallocate PUNCH_HOLE   Disk.Trim
//	fallocate ZERO_RANGE   Disk.Zero(punch=false)
//	fallocate mode 0       nothing to do: every byte of a disk is addressable
//	lseek SEEK_DATA/HOLE   the Disk's map (Mapper): extents that read as zeroes
//	                       are holes; a Disk without a map is all data
//	truncate, chmod, chown EPERM, unless they change nothing (a disk's size is fixed)
//	create, mkdir, unlink,
//	rmdir, rename, link,
//	symlink, mknod         EPERM: the tree is the catalogue
//
// A write or an allocating fallocate past the end of the disk gets ENOSPC,
// as on a block device; a write that straddles the end is cut short at the
// end (the caller sees a short write, then ENOSPC). A read-only export shows as
// mode 0444 and refuses opens for writing with EROFS. Disk errors come back as
// ENOSPC when errors.Is(err, syscall.ENOSPC), EINVAL for ErrOutOfRange, EROFS
// for ErrReadOnly and EIO otherwise; each is logged, since the errno is all the
// client gets.
//
// Caching. Disk files are opened with FOPEN_DIRECT_IO and the mount has no
// writeback cache: every read and write reaches the Disk before the system
// call returns, nothing sits in the kernel page cache, and an fsync (→
// Disk.Flush) covers exactly the writes that returned before it. This is also
// what keeps the file coherent with the NBD export of the same disk, which
// the kernel knows nothing about: a page cache here would serve stale data
// after an NBD write. It costs buffered readers the kernel's read-ahead,
// which block-device users (loop devices, hypervisors, fio) do not rely on.
// FOPEN_PARALLEL_DIRECT_WRITES lets concurrent writers to one file in
// together (the kernel otherwise takes the inode lock for each write), and
// CAP_ASYNC_DIO lets one O_DIRECT aio (libaio, io_uring) be in flight with
// others instead of waiting for its reply: together they carry a queue depth
// of 16 from fio or qemu all the way to the Disk. MaxBackground bounds those
// asynchronous requests and is set well above common queue depths. With
// CAP_DIRECT_IO_ALLOW_MMAP shared mappings work too; msync is an fsync (mapped
// pages are page cache, so a mapping does not see NBD writes made meanwhile).
// Measured with fio against a fakedisk on tmpfs (2 CPUs, shared machine), the
// page-cache mode was no faster for O_DIRECT clients (4k randwrite QD16 about
// 50k IOPS either way, within noise); without CAP_ASYNC_DIO it halves.
//
// Freshness of the tree. Lookups ask Exports each time and directory entries
// and attributes are never cached by the kernel (timeout 0), so a VM added
// after the mount appears at once and a removed one disappears at once. Disk
// file attributes are cached for an hour: a disk's size does not change while
// it is served. An open file keeps the Export it was opened on.
//
// Concurrency. go-fuse serves requests on many goroutines; nothing here takes
// a lock on the I/O path, so requests reach the Disk as concurrently as the
// kernel sends them. The Disk must be safe for concurrent use (it is, by its
// contract), and so must Exports and the OnOpen/OnRelease callbacks.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

const (
	// fuseDiskSuffix is appended to a disk's name to make its file name.
	fuseDiskSuffix = ".img"
	// fuseMaxWrite is the largest read or write request the kernel sends;
	// 1 MiB is the Linux maximum (256 pages, fs.fuse.max_pages_limit).
	fuseMaxWrite = 1 << 20
	// fuseMaxBackground bounds asynchronous requests (async direct I/O
	// and read-ahead) in flight; the kernel throttles above 3/4 of it.
	fuseMaxBackground = 256
	// fuseFileAttrTimeout is how long the kernel caches a disk file's
	// attributes: its size never changes while it is served.
	fuseFileAttrTimeout = time.Hour
	// fuseBlockSize is st_blksize and the statfs block size.
	fuseBlockSize = 4096
)

// FUSEConfig configures MountFUSE.
type FUSEConfig struct {
	// Exports is the live catalogue; export "VM/DISK" shows as VM/DISK.img.
	Exports Exports
	// Logger gets the disk errors that are returned to clients as an errno.
	// nil: discard.
	Logger *slog.Logger
	// OnOpen, when set, is called each time a disk file is opened; writable
	// is true when it was opened for writing. OnRelease is called once for
	// each successful OnOpen, when the last descriptor sharing that open is
	// closed (the kernel reports this asynchronously, shortly after close
	// returns). Both must be safe for concurrent use.
	OnOpen    func(export string, writable bool)
	OnRelease func(export string, writable bool)
}

// FUSEMount is a mounted FUSE view of a catalogue. Its methods are safe for
// concurrent use.
type FUSEMount struct {
	server     *fuse.Server
	mountpoint string
	done       chan struct{}
	mu         sync.Mutex // serialises Unmount
}

// MountFUSE mounts cfg.Exports at mountpoint, which must be an existing
// directory, and serves it until Unmount or an external unmount
// (`fusermount3 -u MOUNTPOINT`, `umount`). A stale vdrepl mount left there
// by a process that died is detached first (and logged); a stale mount of
// another file system is an ErrStaleMount.
func MountFUSE(mountpoint string, cfg FUSEConfig) (*FUSEMount, error) {
	if cfg.Exports == nil {
		return nil, errors.New("blockdev: FUSEConfig.Exports is nil")
	}
	mp, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("blockdev: mount point %q: %w", mountpoint, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stale, detached, err := clearStaleMount(mp)
	if err != nil {
		return nil, err
	}
	if detached {
		log.Warn("fuse: detached a stale vdrepl mount (its server died) to mount afresh",
			"mountpoint", mp, "fstype", stale.FSType, "source", stale.Source)
	}
	st, err := os.Stat(mp)
	if err != nil {
		return nil, fmt.Errorf("blockdev: mount point: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("blockdev: mount point %s: %w", mp, syscall.ENOTDIR)
	}
	fsys := &fuseFS{
		exports:   cfg.Exports,
		log:       log,
		onOpen:    cfg.OnOpen,
		onRelease: cfg.OnRelease,
		uid:       uint32(os.Geteuid()),
		gid:       uint32(os.Getegid()),
		mtime:     time.Now(),
	}
	root := &fuseRoot{fuseDir{fsys: fsys}}
	goFuseLog := slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	opts := &fs.Options{
		// Entry and attribute timeouts are set per node (see Lookup
		// and Getattr); nil here means go-fuse leaves them alone.
		MountOptions: fuse.MountOptions{
			FsName:        fuseFsName,
			Name:          fuseSubtype,
			MaxWrite:      fuseMaxWrite,
			MaxBackground: fuseMaxBackground,
			// No xattrs, ACLs or locks: a disk image has none of
			// them, and each would cost a round trip per request.
			DisableXAttrs: true,
			// The kernel checks modes itself (no ACCESS round trips;
			// a 0444 file is not writable for non-root callers).
			Options: []string{"default_permissions"},
			// As root, mount(2) directly rather than through the
			// fusermount3 helper; others fall back to it.
			DirectMount:       true,
			ExtraCapabilities: fuse.CAP_ASYNC_DIO | fuse.CAP_DIRECT_IO_ALLOW_MMAP,
			// Read replies are in memory, never in a file to splice
			// from; go-fuse would still set up a pipe for each one
			// before giving up (4k random reads: ~60k IOPS with,
			// ~90k without, and a logged warning per 1 MiB read).
			DisableSplice: true,
			Logger:        goFuseLog,
		},
		Logger: goFuseLog,
		UID:    fsys.uid,
		GID:    fsys.gid,
	}
	server, err := fuse.NewServer(fs.NewNodeFS(root, opts), mp, &opts.MountOptions)
	if err != nil {
		return nil, fmt.Errorf("blockdev: mount %s: %w", mp, err)
	}
	m := &FUSEMount{server: server, mountpoint: mp, done: make(chan struct{})}
	go func() {
		server.Serve()
		close(m.done)
	}()
	if err := server.WaitMount(); err != nil {
		m.Unmount()
		return nil, fmt.Errorf("blockdev: mount %s: %w", mp, err)
	}
	return m, nil
}

// Mountpoint is the absolute path the catalogue is mounted on.
func (m *FUSEMount) Mountpoint() string { return m.mountpoint }

// Done is closed once the file system is unmounted and no longer served.
func (m *FUSEMount) Done() <-chan struct{} { return m.done }

// Wait returns once the file system is unmounted and no longer served.
func (m *FUSEMount) Wait() { <-m.done }

// Unmount unmounts the file system and waits until it is no longer served.
// While a file in it is open (by a loop device, say) it fails with an error
// for which errors.Is(err, syscall.EBUSY) holds, and the mount stays.
// Unmounting an unmounted file system is not an error.
func (m *FUSEMount) Unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.done:
		return nil
	default:
	}
	if err := m.unmount(); err != nil {
		// It may have been unmounted from outside just now; then the
		// server is about to stop.
		var st unix.Statfs_t
		if unix.Statfs(m.mountpoint, &st) == nil && st.Type != unix.FUSE_SUPER_MAGIC {
			<-m.done
			return nil
		}
		return fmt.Errorf("blockdev: unmount %s: %w", m.mountpoint, err)
	}
	<-m.done
	return nil
}

func (m *FUSEMount) unmount() error {
	var err error
	// A file closed just before may still hold the mount for a moment:
	// the kernel defers the last close of a file that a kernel thread
	// (a loop device's) held. There is nothing to wait on, so retry.
	for delay := time.Millisecond; ; delay *= 4 {
		err = unix.Unmount(m.mountpoint, 0)
		if !errors.Is(err, unix.EBUSY) || delay > 256*time.Millisecond {
			break
		}
		time.Sleep(delay)
	}
	if errors.Is(err, unix.EPERM) {
		// Not root: the setuid fusermount3 helper may unmount.
		return m.server.Unmount()
	}
	return err
}

// fuseFS is the state the nodes of one mount share. It is read-only after
// MountFUSE.
type fuseFS struct {
	exports   Exports
	log       *slog.Logger
	onOpen    func(export string, writable bool)
	onRelease func(export string, writable bool)
	uid, gid  uint32
	mtime     time.Time
}

// splitExportName splits "VM/DISK" into names usable as a directory and a
// file; ok is false for names that cannot be shown.
func splitExportName(name string) (vm, disk string, ok bool) {
	vm, disk, ok = strings.Cut(name, "/")
	if !ok || !validFUSEName(vm) || !validFUSEName(disk+fuseDiskSuffix) || strings.Contains(disk, "/") {
		return "", "", false
	}
	return vm, disk, true
}

func validFUSEName(s string) bool {
	return s != "" && s != "." && s != ".." && len(s) <= 255 && !strings.ContainsRune(s, 0)
}

// vms lists the VMs that have at least one showable disk.
func (f *fuseFS) vms() []string {
	var out []string
	for _, e := range f.exports.List() {
		if vm, _, ok := splitExportName(e.Name); ok && !slices.Contains(out, vm) {
			out = append(out, vm)
		}
	}
	slices.Sort(out)
	return out
}

func (f *fuseFS) hasVM(vm string) bool {
	for _, e := range f.exports.List() {
		if v, _, ok := splitExportName(e.Name); ok && v == vm {
			return true
		}
	}
	return false
}

// disks lists the file names in a VM's directory.
func (f *fuseFS) disks(vm string) []string {
	var out []string
	for _, e := range f.exports.List() {
		if v, disk, ok := splitExportName(e.Name); ok && v == vm {
			out = append(out, disk+fuseDiskSuffix)
		}
	}
	slices.Sort(out)
	return out
}

func (f *fuseFS) dirAttr(a *fuse.Attr) {
	a.Mode = fuse.S_IFDIR | 0o755
	a.Nlink = 2
	f.commonAttr(a)
}

func (f *fuseFS) fileAttr(e Export, a *fuse.Attr) {
	a.Mode = fuse.S_IFREG | 0o644
	if e.ReadOnly {
		a.Mode = fuse.S_IFREG | 0o444
	}
	a.Nlink = 1
	a.Size = uint64(e.Disk.Size())
	a.Blocks = (a.Size + 511) / 512
	f.commonAttr(a)
}

func (f *fuseFS) commonAttr(a *fuse.Attr) {
	a.Owner = fuse.Owner{Uid: f.uid, Gid: f.gid}
	a.Blksize = fuseBlockSize
	a.SetTimes(&f.mtime, &f.mtime, &f.mtime)
}

// errno turns a Disk error into what the client gets, and logs it: the
// errno is all the client learns.
func (f *fuseFS) errno(op, export string, err error) syscall.Errno {
	var e syscall.Errno
	switch {
	case errors.Is(err, syscall.ENOSPC):
		e = syscall.ENOSPC
	case errors.Is(err, ErrOutOfRange):
		e = syscall.EINVAL
	case errors.Is(err, ErrReadOnly):
		e = syscall.EROFS
	default:
		e = syscall.EIO
	}
	f.log.Warn("fuse: disk request failed", "export", export, "op", op, "errno", e.Error(), "err", err)
	return e
}

// fuseDir holds what the root and the VM directories share: both refuse
// every change to the tree.
type fuseDir struct {
	fs.Inode
	fsys *fuseFS
}

var (
	_ fs.NodeGetattrer = (*fuseDir)(nil)
	_ fs.NodeSetattrer = (*fuseDir)(nil)
	_ fs.NodeCreater   = (*fuseDir)(nil)
	_ fs.NodeMkdirer   = (*fuseDir)(nil)
	_ fs.NodeMknoder   = (*fuseDir)(nil)
	_ fs.NodeLinker    = (*fuseDir)(nil)
	_ fs.NodeSymlinker = (*fuseDir)(nil)
	_ fs.NodeUnlinker  = (*fuseDir)(nil)
	_ fs.NodeRmdirer   = (*fuseDir)(nil)
	_ fs.NodeRenamer   = (*fuseDir)(nil)
	_ fs.NodeFsyncer   = (*fuseDir)(nil)
	_ fs.NodeStatfser  = (*fuseDir)(nil)
)

func (d *fuseDir) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.fsys.dirAttr(&out.Attr)
	return 0
}

func (d *fuseDir) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

func (d *fuseDir) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EPERM
}

func (d *fuseDir) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (d *fuseDir) Mknod(ctx context.Context, name string, mode uint32, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (d *fuseDir) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (d *fuseDir) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (d *fuseDir) Unlink(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }

func (d *fuseDir) Rmdir(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }

func (d *fuseDir) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return syscall.EPERM
}

// Fsync of a directory has nothing to make durable: the tree is the
// catalogue's, not ours.
func (d *fuseDir) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	return 0
}

// Statfs reports the disks' total size as used blocks: there is no free
// space to create anything in.
func (d *fuseDir) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var total uint64
	var files uint64
	for _, e := range d.fsys.exports.List() {
		if _, _, ok := splitExportName(e.Name); ok {
			total += uint64(e.Disk.Size())
			files++
		}
	}
	*out = fuse.StatfsOut{
		Blocks:  (total + fuseBlockSize - 1) / fuseBlockSize,
		Files:   files,
		Bsize:   fuseBlockSize,
		Frsize:  fuseBlockSize,
		NameLen: 255,
	}
	return 0
}

// fuseRoot is MOUNTPOINT: one directory per VM.
type fuseRoot struct{ fuseDir }

var (
	_ fs.NodeLookuper  = (*fuseRoot)(nil)
	_ fs.NodeReaddirer = (*fuseRoot)(nil)
)

func (r *fuseRoot) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return fuseDirStream(r.fsys.vms(), fuse.S_IFDIR), 0
}

func (r *fuseRoot) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !r.fsys.hasVM(name) {
		return nil, syscall.ENOENT
	}
	r.fsys.dirAttr(&out.Attr)
	if ch := r.GetChild(name); ch != nil {
		return ch, 0
	}
	vm := &fuseVM{fuseDir: fuseDir{fsys: r.fsys}, vm: name}
	return r.NewInode(ctx, vm, fs.StableAttr{Mode: fuse.S_IFDIR}), 0
}

// fuseVM is MOUNTPOINT/VM: one file per disk.
type fuseVM struct {
	fuseDir
	vm string
}

var (
	_ fs.NodeLookuper  = (*fuseVM)(nil)
	_ fs.NodeReaddirer = (*fuseVM)(nil)
)

func (v *fuseVM) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return fuseDirStream(v.fsys.disks(v.vm), fuse.S_IFREG), 0
}

func (v *fuseVM) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	disk, ok := strings.CutSuffix(name, fuseDiskSuffix)
	if !ok {
		return nil, syscall.ENOENT
	}
	exportName := v.vm + "/" + disk
	e, ok := v.fsys.exports.Lookup(exportName)
	if !ok {
		return nil, syscall.ENOENT
	}
	v.fsys.fileAttr(e, &out.Attr)
	out.SetAttrTimeout(fuseFileAttrTimeout)
	if ch := v.GetChild(name); ch != nil {
		return ch, 0
	}
	f := &fuseDisk{fsys: v.fsys, name: exportName}
	return v.NewInode(ctx, f, fs.StableAttr{Mode: fuse.S_IFREG}), 0
}

func fuseDirStream(names []string, mode uint32) fs.DirStream {
	ents := make([]fuse.DirEntry, len(names))
	for i, n := range names {
		ents[i] = fuse.DirEntry{Name: n, Mode: mode}
	}
	return fs.NewListDirStream(ents)
}

// fuseDisk is MOUNTPOINT/VM/DISK.img. It looks its export up on every open,
// so a disk that left the catalogue cannot be opened any more.
type fuseDisk struct {
	fs.Inode
	fsys *fuseFS
	name string // export name, "VM/DISK"
}

var (
	_ fs.NodeGetattrer = (*fuseDisk)(nil)
	_ fs.NodeSetattrer = (*fuseDisk)(nil)
	_ fs.NodeOpener    = (*fuseDisk)(nil)
	_ fs.NodeReleaser  = (*fuseDisk)(nil)
	_ fs.NodeReader    = (*fuseDisk)(nil)
	_ fs.NodeWriter    = (*fuseDisk)(nil)
	_ fs.NodeFsyncer   = (*fuseDisk)(nil)
	_ fs.NodeAllocater = (*fuseDisk)(nil)
	_ fs.NodeLseeker   = (*fuseDisk)(nil)
)

// fuseHandle is an open disk file. It keeps the Export it was opened on so
// that I/O does not consult the catalogue.
type fuseHandle struct {
	exp      Export
	size     int64
	writable bool
}

func (f *fuseDisk) export(fh fs.FileHandle) (Export, syscall.Errno) {
	if h, ok := fh.(*fuseHandle); ok {
		return h.exp, 0
	}
	e, ok := f.fsys.exports.Lookup(f.name)
	if !ok {
		return Export{}, syscall.ENOENT
	}
	return e, 0
}

func (f *fuseDisk) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	e, errno := f.export(fh)
	if errno != 0 {
		return errno
	}
	f.fsys.fileAttr(e, &out.Attr)
	out.SetTimeout(fuseFileAttrTimeout)
	return 0
}

// Setattr accepts only what changes nothing a disk has: its own size, mode
// and owner, and any times (which are not kept).
func (f *fuseDisk) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	e, errno := f.export(fh)
	if errno != 0 {
		return errno
	}
	f.fsys.fileAttr(e, &out.Attr)
	out.SetTimeout(fuseFileAttrTimeout)
	if size, ok := in.GetSize(); ok && size != out.Size {
		return syscall.EPERM
	}
	if mode, ok := in.GetMode(); ok && mode&0o7777 != out.Mode&0o7777 {
		return syscall.EPERM
	}
	if uid, ok := in.GetUID(); ok && uid != out.Uid {
		return syscall.EPERM
	}
	if gid, ok := in.GetGID(); ok && gid != out.Gid {
		return syscall.EPERM
	}
	return 0
}

func (f *fuseDisk) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	e, ok := f.fsys.exports.Lookup(f.name)
	if !ok {
		return nil, 0, syscall.ENOENT
	}
	writable := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	if writable && e.ReadOnly {
		return nil, 0, syscall.EROFS
	}
	if f.fsys.onOpen != nil {
		f.fsys.onOpen(e.Name, writable)
	}
	h := &fuseHandle{exp: e, size: e.Disk.Size(), writable: writable}
	// FOPEN_NOFLUSH: close has nothing to write back, so spare the
	// FLUSH round trip.
	return h, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES | fuse.FOPEN_NOFLUSH, 0
}

func (f *fuseDisk) Release(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	if h, ok := fh.(*fuseHandle); ok && f.fsys.onRelease != nil {
		f.fsys.onRelease(h.exp.Name, h.writable)
	}
	return 0
}

func (f *fuseDisk) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*fuseHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= h.size {
		return fuse.ReadResultData(nil), 0
	}
	if rest := h.size - off; int64(len(dest)) > rest {
		dest = dest[:rest]
	}
	n, err := h.exp.Disk.ReadAt(dest, off)
	if err != nil && !(n == len(dest) && errors.Is(err, io.EOF)) {
		return nil, f.fsys.errno("read", h.exp.Name, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (f *fuseDisk) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, ok := fh.(*fuseHandle)
	if !ok {
		return 0, syscall.EBADF
	}
	if !h.writable || h.exp.ReadOnly {
		return 0, syscall.EROFS
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= h.size && len(data) > 0 {
		return 0, syscall.ENOSPC // a disk cannot grow
	}
	if rest := h.size - off; int64(len(data)) > rest {
		data = data[:rest] // short write up to the end, as a block device does
	}
	n, err := h.exp.Disk.WriteAt(data, off)
	if err != nil {
		return 0, f.fsys.errno("write", h.exp.Name, err)
	}
	return uint32(n), 0
}

func (f *fuseDisk) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	e, errno := f.export(fh)
	if errno != 0 {
		return errno
	}
	if err := e.Disk.Flush(); err != nil {
		return f.fsys.errno("fsync", e.Name, err)
	}
	return 0
}

// Allocate serves fallocate(2).
func (f *fuseDisk) Allocate(ctx context.Context, fh fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	h, ok := fh.(*fuseHandle)
	if !ok {
		return syscall.EBADF
	}
	if !h.writable || h.exp.ReadOnly {
		return syscall.EROFS
	}
	const known = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_ZERO_RANGE
	if mode&^known != 0 || mode&unix.FALLOC_FL_PUNCH_HOLE != 0 && mode&unix.FALLOC_FL_ZERO_RANGE != 0 {
		return syscall.EOPNOTSUPP // collapse, insert, unshare: a disk's layout is fixed
	}
	size := uint64(h.size)
	end := off + length
	if end < off {
		return syscall.EFBIG
	}
	if end > size {
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return syscall.ENOSPC // would grow the disk
		}
		end = size // like a regular file, nothing past the end to change
	}
	if off >= end {
		return 0
	}
	var err error
	switch {
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		err = h.exp.Disk.Trim(int64(off), int64(end-off))
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		err = h.exp.Disk.Zero(int64(off), int64(end-off), false)
	default:
		return 0 // plain allocation: every byte of a disk is addressable
	}
	if err != nil {
		return f.fsys.errno("fallocate", h.exp.Name, err)
	}
	return 0
}

// fuseSeekWindow is how much of the disk's map one step of Lseek asks for
// at first; it doubles up to fuseSeekWindowMax while the search goes on, so
// that a seek near data stays cheap and one across a huge hole takes few
// steps.
const (
	fuseSeekWindow    = 1 << 20
	fuseSeekWindowMax = 1 << 30
)

// Lseek serves lseek(2) with SEEK_DATA and SEEK_HOLE (the kernel handles the
// other whences itself), so that cp --sparse, qemu-img and backup tools skip
// holes. Extents of the Disk's map that read as zeroes count as holes; the
// end of the disk is one. As with a regular file, ENXIO for an offset at or
// past the end, and for SEEK_DATA with only holes after it.
func (f *fuseDisk) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	e, errno := f.export(fh)
	if errno != 0 {
		return 0, errno
	}
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	size := e.Disk.Size()
	if off >= uint64(size) {
		return 0, syscall.ENXIO
	}
	wantHole := whence == unix.SEEK_HOLE
	for pos, window := int64(off), int64(fuseSeekWindow); pos < size; window = min(2*window, fuseSeekWindowMax) {
		ext, err := diskMap(e.Disk, pos, min(window, size-pos))
		if err != nil {
			return 0, f.fsys.errno("lseek", e.Name, err)
		}
		for _, x := range ext {
			if x.Zero == wantHole {
				return uint64(x.Offset), 0
			}
			pos = x.Offset + x.Length
		}
	}
	if wantHole {
		return uint64(size), 0
	}
	return 0, syscall.ENXIO
}
