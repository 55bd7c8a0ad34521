package blockdev

// The FUSE front end: every export "VM/DISK" appears as MOUNTPOINT/VM/DISK.img.
//
// Files are opened with FOPEN_DIRECT_IO: reads and writes reach the Disk with
// the caller's offsets and sizes and never sit in the kernel page cache, so an
// fsync (→ Disk.Flush) covers exactly the writes that returned before it, and
// the journal's own caching is not doubled. O_DIRECT callers (fio with
// direct=1, loop devices with direct I/O) work too. The directory tree follows
// the catalogue live: lookups ask Exports each time, with a short entry
// timeout. Requests are served concurrently; nothing here takes a global lock.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// FUSEConfig configures a FUSE mount.
type FUSEConfig struct {
	Exports Exports
	Logger  *slog.Logger // nil: discard
	// OnOpen and OnRelease, when set, are told when a disk file is opened
	// and closed (writable: opened for writing).
	OnOpen    func(export string, writable bool)
	OnRelease func(export string, writable bool)
}

// FUSEMount is a mounted FUSE view of the catalogue.
type FUSEMount struct {
	server *fuse.Server
	done   chan struct{}
	once   sync.Once
	mp     string
}

const diskSuffix = ".img"

// MountFUSE mounts the catalogue at mountpoint, an existing directory.
func MountFUSE(mountpoint string, cfg FUSEConfig) (*FUSEMount, error) {
	st, err := os.Stat(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("blockdev: mount point: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("blockdev: mount point %s is not a directory", mountpoint)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	entry, attr := time.Second, time.Hour
	root := &fuseRoot{cfg: &cfg}
	server, err := fs.Mount(mountpoint, root, &fs.Options{
		EntryTimeout:    &entry,
		AttrTimeout:     &attr,
		NegativeTimeout: new(time.Duration),
		MountOptions: fuse.MountOptions{
			FsName:        "vdrepl",
			Name:          "vdrepl",
			MaxWrite:      1 << 20,
			MaxBackground: 64,
			DisableXAttrs: true,
			AllowOther:    os.Geteuid() == 0,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("blockdev: mount %s: %w", mountpoint, err)
	}
	m := &FUSEMount{server: server, done: make(chan struct{}), mp: mountpoint}
	go func() {
		server.Wait()
		close(m.done)
	}()
	return m, nil
}

// Wait returns once the mount is gone (Unmount, or fusermount3 -u).
func (m *FUSEMount) Wait() { <-m.done }

// Done is closed once the mount is gone.
func (m *FUSEMount) Done() <-chan struct{} { return m.done }

// Unmount unmounts and waits until the server has stopped. Idempotent.
func (m *FUSEMount) Unmount() error {
	var err error
	select {
	case <-m.done:
		return nil
	default:
	}
	m.once.Do(func() {
		for i := 0; i < 50; i++ {
			if err = m.server.Unmount(); err == nil || !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(100 * time.Millisecond) // a client still holds a file open
		}
	})
	if err != nil {
		return fmt.Errorf("blockdev: unmount %s: %w", m.mp, err)
	}
	<-m.done
	return nil
}

// groups returns the catalogue as VM -> disk -> export.
func groups(e Exports) map[string]map[string]Export {
	out := map[string]map[string]Export{}
	for _, x := range e.List() {
		vm, disk, ok := strings.Cut(x.Name, "/")
		if !ok {
			continue
		}
		if out[vm] == nil {
			out[vm] = map[string]Export{}
		}
		out[vm][disk] = x
	}
	return out
}

func dirStream(names []string, mode uint32) fs.DirStream {
	sort.Strings(names)
	ents := make([]fuse.DirEntry, len(names))
	for i, n := range names {
		ents[i] = fuse.DirEntry{Name: n, Mode: mode}
	}
	return fs.NewListDirStream(ents)
}

type fuseRoot struct {
	fs.Inode
	cfg *FUSEConfig
}

var (
	_ fs.NodeLookuper  = (*fuseRoot)(nil)
	_ fs.NodeReaddirer = (*fuseRoot)(nil)
)

func (r *fuseRoot) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	var names []string
	for vm := range groups(r.cfg.Exports) {
		names = append(names, vm)
	}
	return dirStream(names, fuse.S_IFDIR), 0
}

func (r *fuseRoot) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if _, ok := groups(r.cfg.Exports)[name]; !ok {
		return nil, syscall.ENOENT
	}
	out.Mode = fuse.S_IFDIR | 0o755
	return r.NewInode(ctx, &fuseVM{cfg: r.cfg, vm: name}, fs.StableAttr{Mode: fuse.S_IFDIR}), 0
}

func (r *fuseRoot) Mkdir(context.Context, string, uint32, *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (r *fuseRoot) Rmdir(context.Context, string) syscall.Errno  { return syscall.EPERM }
func (r *fuseRoot) Unlink(context.Context, string) syscall.Errno { return syscall.EPERM }
func (r *fuseRoot) Create(context.Context, string, uint32, uint32, *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EPERM
}
func (r *fuseRoot) Rename(context.Context, string, fs.InodeEmbedder, string, uint32) syscall.Errno {
	return syscall.EPERM
}

type fuseVM struct {
	fs.Inode
	cfg *FUSEConfig
	vm  string
}

func (v *fuseVM) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	var names []string
	for disk := range groups(v.cfg.Exports)[v.vm] {
		names = append(names, disk+diskSuffix)
	}
	return dirStream(names, fuse.S_IFREG), 0
}

func (v *fuseVM) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	disk, ok := strings.CutSuffix(name, diskSuffix)
	if !ok {
		return nil, syscall.ENOENT
	}
	e, ok := v.cfg.Exports.Lookup(v.vm + "/" + disk)
	if !ok {
		return nil, syscall.ENOENT
	}
	f := &fuseDisk{cfg: v.cfg, name: e.Name}
	f.fillAttr(e, &out.Attr)
	return v.NewInode(ctx, f, fs.StableAttr{Mode: fuse.S_IFREG}), 0
}

func (v *fuseVM) Mkdir(context.Context, string, uint32, *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (v *fuseVM) Rmdir(context.Context, string) syscall.Errno  { return syscall.EPERM }
func (v *fuseVM) Unlink(context.Context, string) syscall.Errno { return syscall.EPERM }
func (v *fuseVM) Create(context.Context, string, uint32, uint32, *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EPERM
}
func (v *fuseVM) Rename(context.Context, string, fs.InodeEmbedder, string, uint32) syscall.Errno {
	return syscall.EPERM
}

// fuseDisk is one disk file. It looks its export up on every open so a VM
// that went away gives ENOENT/EIO rather than a stale disk.
type fuseDisk struct {
	fs.Inode
	cfg  *FUSEConfig
	name string
}

// fuseHandle is an open disk file.
type fuseHandle struct {
	exp      Export
	writable bool
}

var (
	_ fs.NodeOpener    = (*fuseDisk)(nil)
	_ fs.NodeReader    = (*fuseDisk)(nil)
	_ fs.NodeWriter    = (*fuseDisk)(nil)
	_ fs.NodeFsyncer   = (*fuseDisk)(nil)
	_ fs.NodeAllocater = (*fuseDisk)(nil)
	_ fs.NodeGetattrer = (*fuseDisk)(nil)
	_ fs.NodeSetattrer = (*fuseDisk)(nil)
	_ fs.NodeReleaser  = (*fuseDisk)(nil)
)

func (f *fuseDisk) fillAttr(e Export, a *fuse.Attr) {
	a.Mode = fuse.S_IFREG | 0o644
	if e.ReadOnly {
		a.Mode = fuse.S_IFREG | 0o444
	}
	a.Size = uint64(e.Disk.Size())
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	a.Nlink = 1
}

func (f *fuseDisk) export() (Export, syscall.Errno) {
	e, ok := f.cfg.Exports.Lookup(f.name)
	if !ok {
		return e, syscall.ENOENT
	}
	return e, 0
}

func (f *fuseDisk) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	e, errno := f.export()
	if errno != 0 {
		return errno
	}
	f.fillAttr(e, &out.Attr)
	return 0
}

func (f *fuseDisk) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	e, errno := f.export()
	if errno != 0 {
		return errno
	}
	if sz, ok := in.GetSize(); ok && int64(sz) != e.Disk.Size() {
		return syscall.EPERM // a disk's size is fixed
	}
	// Mode, owner and times are not stored; accept them silently like a
	// block device node would, so tools that touch or chmod do not fail.
	f.fillAttr(e, &out.Attr)
	return 0
}

func (f *fuseDisk) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	e, errno := f.export()
	if errno != 0 {
		return nil, 0, errno
	}
	writable := flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0
	if writable && e.ReadOnly {
		return nil, 0, syscall.EROFS
	}
	if flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EPERM
	}
	if fn := f.cfg.OnOpen; fn != nil {
		fn(e.Name, writable)
	}
	return &fuseHandle{exp: e, writable: writable}, fuse.FOPEN_DIRECT_IO, 0
}

func (f *fuseDisk) Release(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	if h, ok := fh.(*fuseHandle); ok && f.cfg.OnRelease != nil {
		f.cfg.OnRelease(h.exp.Name, h.writable)
	}
	return 0
}

func handleOf(fh fs.FileHandle) (*fuseHandle, syscall.Errno) {
	h, ok := fh.(*fuseHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	return h, 0
}

func (f *fuseDisk) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, errno := handleOf(fh)
	if errno != 0 {
		return nil, errno
	}
	size := h.exp.Disk.Size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	dest = dest[:min(int64(len(dest)), size-off)]
	if _, err := h.exp.Disk.ReadAt(dest, off); err != nil {
		return nil, f.errno("read", err)
	}
	return fuse.ReadResultData(dest), 0
}

func (f *fuseDisk) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, errno := handleOf(fh)
	if errno != 0 {
		return 0, errno
	}
	if h.exp.ReadOnly {
		return 0, syscall.EROFS
	}
	if off < 0 || off+int64(len(data)) > h.exp.Disk.Size() {
		return 0, syscall.ENOSPC // a disk cannot grow
	}
	if _, err := h.exp.Disk.WriteAt(data, off); err != nil {
		return 0, f.errno("write", err)
	}
	return uint32(len(data)), 0
}

func (f *fuseDisk) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	h, errno := handleOf(fh)
	if errno != 0 {
		return errno
	}
	if err := h.exp.Disk.Flush(); err != nil {
		return f.errno("fsync", err)
	}
	return 0
}

// Allocate maps fallocate: PUNCH_HOLE to Trim, ZERO_RANGE to Zero; a plain
// allocation inside the disk is a no-op (the disk is fully addressable).
func (f *fuseDisk) Allocate(ctx context.Context, fh fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	h, errno := handleOf(fh)
	if errno != 0 {
		return errno
	}
	if h.exp.ReadOnly {
		return syscall.EROFS
	}
	const (
		keepSize  = 0x01
		punchHole = 0x02
		zeroRange = 0x10
	)
	if off+size > uint64(h.exp.Disk.Size()) {
		if mode&(punchHole|zeroRange) == 0 && mode&keepSize == 0 {
			return syscall.EFBIG
		}
		size = uint64(h.exp.Disk.Size()) - min(off, uint64(h.exp.Disk.Size()))
	}
	if size == 0 {
		return 0
	}
	var err error
	switch {
	case mode&punchHole != 0:
		err = h.exp.Disk.Trim(int64(off), int64(size))
	case mode&zeroRange != 0:
		err = h.exp.Disk.Zero(int64(off), int64(size), false)
	case mode&^keepSize != 0:
		return syscall.EOPNOTSUPP
	}
	if err != nil {
		return f.errno("fallocate", err)
	}
	return 0
}

func (f *fuseDisk) errno(op string, err error) syscall.Errno {
	f.cfg.Logger.Warn("fuse request failed", "export", f.name, "op", op, "err", err)
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return syscall.ENOSPC
	case errors.Is(err, ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, ErrReadOnly):
		return syscall.EROFS
	}
	return syscall.EIO
}
