package blockdev_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/internal/fakedisk"
)

// fuseCatalogue is a blockdev.Exports that tests change while it is mounted.
type fuseCatalogue struct {
	mu      sync.Mutex
	exports map[string]blockdev.Export
}

func newFUSECatalogue() *fuseCatalogue {
	return &fuseCatalogue{exports: map[string]blockdev.Export{}}
}

func (c *fuseCatalogue) Lookup(name string) (blockdev.Export, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.exports[name]
	return e, ok
}

func (c *fuseCatalogue) List() []blockdev.Export {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []blockdev.Export
	for _, e := range c.exports {
		out = append(out, e)
	}
	return out
}

func (c *fuseCatalogue) remove(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.exports, name)
}

// fuseTestDisk is a fakedisk in a fuseCatalogue, with its backing file.
type fuseTestDisk struct {
	*fakedisk.Disk
	path string
}

// backing reads the fakedisk's backing file: what the Disk holds.
func (d fuseTestDisk) backing(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(d.path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (c *fuseCatalogue) add(t *testing.T, name string, size int64, readOnly bool) fuseTestDisk {
	t.Helper()
	path := filepath.Join(t.TempDir(), strings.ReplaceAll(name, "/", "_"))
	d, err := fakedisk.Create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	c.mu.Lock()
	c.exports[name] = blockdev.Export{Name: name, Disk: d, ReadOnly: readOnly}
	c.mu.Unlock()
	return fuseTestDisk{Disk: d, path: path}
}

// fuseNeed skips the test when a prerequisite is missing, unless CI is set:
// there every prerequisite must be present.
func fuseNeed(t *testing.T, ok bool, what string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("prerequisite missing under CI: %s", what)
	}
	t.Skipf("prerequisite missing: %s (with CI set this fails)", what)
}

func fuseNeedDevice(t *testing.T) {
	t.Helper()
	_, err := os.Stat("/dev/fuse")
	fuseNeed(t, err == nil, "/dev/fuse")
}

func fuseNeedTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		_, err := exec.LookPath(tool)
		fuseNeed(t, err == nil, tool)
	}
}

func fuseNeedRoot(t *testing.T) {
	t.Helper()
	fuseNeed(t, os.Geteuid() == 0, "root (loop devices and mount)")
}

// fuseTestLogger sends log records to t.Log.
func fuseTestLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(fuseLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type fuseLogWriter struct{ t *testing.T }

func (w fuseLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// fuseMount mounts cat on a new directory and unmounts it when the test ends.
func fuseMount(t *testing.T, cat blockdev.Exports, cfg *blockdev.FUSEConfig) *blockdev.FUSEMount {
	t.Helper()
	fuseNeedDevice(t)
	if cfg == nil {
		cfg = &blockdev.FUSEConfig{}
	}
	cfg.Exports = cat
	cfg.Logger = fuseTestLogger(t)
	mp := t.TempDir()
	m, err := blockdev.MountFUSE(mp, *cfg)
	if err != nil {
		t.Fatalf("MountFUSE: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
			unix.Unmount(mp, unix.MNT_DETACH) // do not leave it behind
		}
		select {
		case <-m.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("Done not closed 10s after Unmount")
		}
	})
	return m
}

func fuseRandomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func fuseReadDirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func fuseWantErrno(t *testing.T, what string, err error, want ...syscall.Errno) {
	t.Helper()
	for _, w := range want {
		if errors.Is(err, w) {
			return
		}
	}
	t.Errorf("%s: got error %v, want %v", what, err, want)
}

func TestFUSEListingFollowsCatalogue(t *testing.T) {
	cat := newFUSECatalogue()
	cat.add(t, "vm1/disk0", 1<<20, false)
	cat.add(t, "vm1/disk1", 3<<20+512, true)
	m := fuseMount(t, cat, nil)
	mp := m.Mountpoint()

	if got := fuseReadDirNames(t, mp); !slices.Equal(got, []string{"vm1"}) {
		t.Errorf("root lists %q, want [vm1]", got)
	}
	if got := fuseReadDirNames(t, filepath.Join(mp, "vm1")); !slices.Equal(got, []string{"disk0.img", "disk1.img"}) {
		t.Errorf("vm1 lists %q, want [disk0.img disk1.img]", got)
	}
	for _, c := range []struct {
		name string
		size int64
		mode fs.FileMode
	}{
		{"vm1/disk0.img", 1 << 20, 0o644},
		{"vm1/disk1.img", 3<<20 + 512, 0o444},
	} {
		st, err := os.Stat(filepath.Join(mp, c.name))
		if err != nil {
			t.Fatal(err)
		}
		if !st.Mode().IsRegular() || st.Mode().Perm() != c.mode || st.Size() != c.size {
			t.Errorf("%s: mode %v size %d, want regular %v size %d", c.name, st.Mode(), st.Size(), c.mode, c.size)
		}
	}
	if st, err := os.Stat(filepath.Join(mp, "vm1")); err != nil || !st.IsDir() {
		t.Errorf("vm1 is not a directory: %v %v", st, err)
	}

	// A VM that is not there yet, then is: no negative entry may hide it.
	vm2 := filepath.Join(mp, "vm2", "data.img")
	if _, err := os.Stat(vm2); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("vm2 before it exists: %v", err)
	}
	cat.add(t, "vm2/data", 2<<20, false)
	if st, err := os.Stat(vm2); err != nil || st.Size() != 2<<20 {
		t.Fatalf("vm2 added after mount: %v %v", st, err)
	}
	if got := fuseReadDirNames(t, mp); !slices.Equal(got, []string{"vm1", "vm2"}) {
		t.Errorf("root lists %q after adding vm2", got)
	}
	// And gone again.
	cat.remove("vm2/data")
	if _, err := os.Stat(vm2); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("vm2 after removal: %v", err)
	}
	if got := fuseReadDirNames(t, mp); !slices.Equal(got, []string{"vm1"}) {
		t.Errorf("root lists %q after removing vm2", got)
	}

	// It is named vdrepl in the mount table.
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	want := "vdrepl " + mp + " fuse.vdrepl "
	if !strings.Contains(string(mounts), want) {
		t.Errorf("/proc/self/mounts has no %q", want)
	}
}

func TestFUSEReadWriteReachDisk(t *testing.T) {
	cat := newFUSECatalogue()
	const size = 4 << 20
	d := cat.add(t, "vm1/disk0", size, false)
	m := fuseMount(t, cat, nil)
	f, err := os.OpenFile(filepath.Join(m.Mountpoint(), "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	r := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, size)
	for _, w := range []struct{ off, n int }{
		{0, 4096},
		{12345, 777},
		{1<<20 - 100, 300},          // across a MiB boundary
		{2 << 20, 1<<20 + 3*4096},   // bigger than one FUSE request
		{size - 10, 10},             // up to the last byte
		{size / 2, 1},               // one byte
		{size/2 + 4095, 4096 + 513}, // unaligned both ends
	} {
		data := fuseRandomBytes(r, w.n)
		if n, err := f.WriteAt(data, int64(w.off)); err != nil || n != w.n {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", w.n, w.off, n, err)
		}
		copy(model[w.off:], data)
		// The write is on the Disk when write(2) returns.
		if got := d.backing(t)[w.off : w.off+w.n]; !bytes.Equal(got, data) {
			t.Fatalf("after WriteAt(%d bytes at %d) the disk holds other bytes", w.n, w.off)
		}
	}
	if !bytes.Equal(d.backing(t), model) {
		t.Fatal("disk differs from what was written")
	}

	// Reads come from the Disk, also at odd offsets and sizes.
	got, err := io.ReadAll(io.NewSectionReader(f, 0, size))
	if err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reading the whole file back: %v, equal %v", err, bytes.Equal(got, model))
	}
	buf := make([]byte, 1000)
	if n, err := f.ReadAt(buf, 12000); err != nil || n != len(buf) || !bytes.Equal(buf, model[12000:13000]) {
		t.Fatalf("ReadAt 12000: %d %v", n, err)
	}
	if n, err := f.ReadAt(buf, size-10); n != 10 || err != io.EOF || !bytes.Equal(buf[:10], model[size-10:]) {
		t.Fatalf("ReadAt over the end: %d %v, want 10 EOF", n, err)
	}
	if n, err := f.ReadAt(buf, size); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the end: %d %v, want 0 EOF", n, err)
	}

	// No page cache: a change made to the Disk behind the mount's back
	// (by the NBD export, say) is what the next read sees.
	fresh := fuseRandomBytes(r, 8192)
	if _, err := d.WriteAt(fresh, 4096); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 8192)
	if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, fresh) {
		t.Fatalf("read after a write behind the mount: %v, stale data %v", err, !bytes.Equal(got, fresh))
	}
}

// TestFUSEConcurrentWriters has many writers at once, each on its own
// descriptor and region, with O_DIRECT; under -race it also checks the
// handlers for data races.
func TestFUSEConcurrentWriters(t *testing.T) {
	cat := newFUSECatalogue()
	const size, writers, chunk = 8 << 20, 8, 64 << 10
	d := cat.add(t, "vm1/disk0", size, false)
	m := fuseMount(t, cat, nil)
	path := filepath.Join(m.Mountpoint(), "vm1", "disk0.img")

	model := make([]byte, size)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range model {
		model[i] = byte(r.Uint32())
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			f, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			buf := fuseAlignedBuffer(chunk)
			for off := w * chunk; off < size; off += writers * chunk {
				copy(buf, model[off:off+chunk])
				if _, err := f.WriteAt(buf, int64(off)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if !bytes.Equal(d.backing(t), model) {
		t.Fatal("disk differs from what the concurrent writers wrote")
	}
}

// fuseAlignedBuffer returns n bytes aligned for O_DIRECT.
func fuseAlignedBuffer(n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(err)
	}
	return b
}

func TestFUSEFsyncFlushes(t *testing.T) {
	cat := newFUSECatalogue()
	d := cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, nil)
	f, err := os.OpenFile(filepath.Join(m.Mountpoint(), "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	if _, err := f.WriteAt([]byte("hello"), 100); err != nil {
		t.Fatal(err)
	}
	before := d.Flushes.Load()
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	if got := d.Flushes.Load(); got != before+1 {
		t.Errorf("fsync: %d flushes, want 1", got-before)
	}
	before = d.Flushes.Load()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatalf("fdatasync: %v", err)
	}
	if got := d.Flushes.Load(); got != before+1 {
		t.Errorf("fdatasync: %d flushes, want 1", got-before)
	}
	// Closing is not a flush: durability is what fsync is for.
	before = d.Flushes.Load()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got := d.Flushes.Load(); got != before {
		t.Errorf("close flushed %d times", got-before)
	}
}

// TestFUSEMmap writes through a shared mapping: msync must put the data on
// the Disk and flush it.
//
// The mapping is touched by a child process, never by this one: a goroutine
// that faults on a page of a FUSE file served by its own process cannot be
// preempted, so a garbage collection that starts meanwhile stops the serving
// goroutines and waits forever for the faulting one (the whole test binary
// hangs, its own timeout included).
func TestFUSEMmap(t *testing.T) {
	if path := os.Getenv("VDREPL_TEST_MMAP_FILE"); path != "" {
		mmapWrite(t, path, 8192, "mapped write")
		return
	}
	cat := newFUSECatalogue()
	d := cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, nil)
	before := d.Flushes.Load()
	child := exec.Command(os.Args[0], "-test.run=^TestFUSEMmap$", "-test.count=1", "-test.v")
	child.Env = append(os.Environ(), "VDREPL_TEST_MMAP_FILE="+filepath.Join(m.Mountpoint(), "vm1", "disk0.img"))
	if out, err := child.CombinedOutput(); err != nil {
		t.Fatalf("mmap child: %v\n%s", err, out)
	}
	if got := d.backing(t)[8192 : 8192+12]; string(got) != "mapped write" {
		t.Errorf("after msync the disk holds %q", got)
	}
	if d.Flushes.Load() == before {
		t.Errorf("msync did not flush the disk")
	}
}

// mmapWrite maps path shared, copies s to offset off and msyncs; it runs in
// the child process of TestFUSEMmap.
func mmapWrite(t *testing.T, path string, off int, s string) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	defer unix.Munmap(mem)
	copy(mem[off:], s)
	if err := unix.Msync(mem, unix.MS_SYNC); err != nil {
		t.Fatalf("msync: %v", err)
	}
}

func TestFUSEFallocate(t *testing.T) {
	cat := newFUSECatalogue()
	const size = 1 << 20
	d := cat.add(t, "vm1/disk0", size, false)
	m := fuseMount(t, cat, nil)
	f, err := os.OpenFile(filepath.Join(m.Mountpoint(), "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	ones := bytes.Repeat([]byte{0xff}, size)
	if _, err := f.WriteAt(ones, 0); err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, 64<<10)

	// Punching a hole trims the disk.
	trims := d.Trims.Load()
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 64<<10); err != nil {
		t.Fatalf("punch hole: %v", err)
	}
	if d.Trims.Load() != trims+1 {
		t.Errorf("punch hole: %d trims, want 1", d.Trims.Load()-trims)
	}
	b := d.backing(t)
	if !bytes.Equal(b[64<<10:128<<10], zero) || b[64<<10-1] != 0xff || b[128<<10] != 0xff {
		t.Errorf("punch hole did not zero exactly [64K,128K)")
	}

	// Zeroing a range zeroes it on the disk, allocated.
	zeroes := d.Zeroes.Load()
	err = unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 256<<10, 64<<10)
	if errors.Is(err, syscall.EOPNOTSUPP) {
		t.Logf("this kernel does not pass FALLOC_FL_ZERO_RANGE to FUSE")
	} else {
		if err != nil {
			t.Fatalf("zero range: %v", err)
		}
		if d.Zeroes.Load() != zeroes+1 {
			t.Errorf("zero range: %d zeroes, want 1", d.Zeroes.Load()-zeroes)
		}
		b = d.backing(t)
		if !bytes.Equal(b[256<<10:320<<10], zero) || b[256<<10-1] != 0xff || b[320<<10] != 0xff {
			t.Errorf("zero range did not zero exactly [256K,320K)")
		}
	}

	// A hole past the end stops at the end; allocating past the end
	// would grow the disk.
	trims = d.Trims.Load()
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, size-4096, 1<<20); err != nil {
		t.Errorf("punch hole over the end: %v", err)
	}
	if d.Trims.Load() != trims+1 || !bytes.Equal(d.backing(t)[size-4096:], zero[:4096]) {
		t.Errorf("punch hole over the end did not trim the last 4 KiB")
	}
	fuseWantErrno(t, "fallocate past the end", unix.Fallocate(fd, 0, size-4096, 8192), syscall.ENOSPC)
	if err := unix.Fallocate(fd, 0, 0, 4096); err != nil {
		t.Errorf("fallocate inside the disk: %v", err)
	}
	if st, _ := f.Stat(); st.Size() != size {
		t.Errorf("size is %d after fallocate, want %d", st.Size(), size)
	}
	if d.backing(t)[0] != 0xff {
		t.Errorf("plain fallocate changed data")
	}
}

func TestFUSEDiskErrorsReachClient(t *testing.T) {
	cat := newFUSECatalogue()
	d := cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, nil)
	f, err := os.OpenFile(filepath.Join(m.Mountpoint(), "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	boom := errors.New("disk on fire")

	d.FailNext(1, fmt.Errorf("journal: out of space: %w", syscall.ENOSPC))
	_, err = f.WriteAt(buf, 0)
	fuseWantErrno(t, "write on a full disk", err, syscall.ENOSPC)

	d.FailNext(1, boom)
	_, err = f.WriteAt(buf, 0)
	fuseWantErrno(t, "write with a disk error", err, syscall.EIO)

	d.FailNext(1, boom)
	_, err = f.ReadAt(buf, 0)
	fuseWantErrno(t, "read with a disk error", err, syscall.EIO)

	d.FailNext(1, boom)
	fuseWantErrno(t, "fsync with a disk error", f.Sync(), syscall.EIO)

	d.FailNext(1, boom)
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	fuseWantErrno(t, "punch hole with a disk error", err, syscall.EIO)

	d.FailNext(1, fmt.Errorf("wrapped: %w", blockdev.ErrOutOfRange))
	_, err = f.WriteAt(buf, 0)
	fuseWantErrno(t, "write the disk calls out of range", err, syscall.EINVAL)

	// The faults are used up; the file works again.
	if _, err := f.WriteAt([]byte("fine"), 0); err != nil {
		t.Fatalf("write after the faults: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync after the faults: %v", err)
	}
}

func TestFUSEReadOnlyExport(t *testing.T) {
	cat := newFUSECatalogue()
	d := cat.add(t, "vm1/ro", 1<<20, true)
	content := bytes.Repeat([]byte("read-only "), 1000)
	if _, err := d.WriteAt(content, 0); err != nil {
		t.Fatal(err)
	}
	m := fuseMount(t, cat, nil)
	path := filepath.Join(m.Mountpoint(), "vm1", "ro.img")

	for _, flag := range []int{os.O_WRONLY, os.O_RDWR} {
		f, err := os.OpenFile(path, flag, 0)
		if err == nil {
			f.Close()
		}
		fuseWantErrno(t, fmt.Sprintf("open flags %#x", flag), err, syscall.EROFS, syscall.EPERM, syscall.EACCES)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(content))
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read from a read-only export: %v", err)
	}
	_, err = f.WriteAt([]byte("x"), 0)
	if err == nil {
		t.Errorf("write through a read-only descriptor succeeded")
	}
	fuseWantErrno(t, "truncate", os.Truncate(path, 0), syscall.EROFS, syscall.EPERM, syscall.EACCES)
	if !bytes.Equal(d.backing(t)[:len(content)], content) {
		t.Errorf("read-only disk changed")
	}
}

func TestFUSERefusesTreeAndSizeChanges(t *testing.T) {
	cat := newFUSECatalogue()
	const size = 1 << 20
	d := cat.add(t, "vm1/disk0", size, false)
	m := fuseMount(t, cat, nil)
	mp := m.Mountpoint()
	img := filepath.Join(mp, "vm1", "disk0.img")

	for _, c := range []struct {
		what string
		err  error
	}{
		{"create in root", func() error { _, err := os.Create(filepath.Join(mp, "new")); return err }()},
		{"create in vm", func() error { _, err := os.Create(filepath.Join(mp, "vm1", "new.img")); return err }()},
		{"mkdir in root", os.Mkdir(filepath.Join(mp, "vm9"), 0o755)},
		{"mkdir in vm", os.Mkdir(filepath.Join(mp, "vm1", "d"), 0o755)},
		{"mknod", unix.Mknod(filepath.Join(mp, "vm1", "fifo"), unix.S_IFIFO|0o644, 0)},
		{"symlink", os.Symlink("disk0.img", filepath.Join(mp, "vm1", "link.img"))},
		{"hard link", os.Link(img, filepath.Join(mp, "vm1", "link.img"))},
		{"unlink", os.Remove(img)},
		{"rmdir", syscall.Rmdir(filepath.Join(mp, "vm1"))},
		{"rename file", os.Rename(img, filepath.Join(mp, "vm1", "disk9.img"))},
		{"rename dir", os.Rename(filepath.Join(mp, "vm1"), filepath.Join(mp, "vm9"))},
		{"grow", os.Truncate(img, size+4096)},
		{"shrink", os.Truncate(img, size-4096)},
		{"O_TRUNC", func() error {
			f, err := os.OpenFile(img, os.O_WRONLY|os.O_TRUNC, 0)
			if err == nil {
				f.Close()
			}
			return err
		}()},
		{"chmod", os.Chmod(img, 0o600)},
	} {
		fuseWantErrno(t, c.what, c.err, syscall.EPERM)
	}
	if got := fuseReadDirNames(t, filepath.Join(mp, "vm1")); !slices.Equal(got, []string{"disk0.img"}) {
		t.Errorf("vm1 lists %q after refused changes", got)
	}
	if st, err := os.Stat(img); err != nil || st.Size() != size {
		t.Errorf("disk0.img after refused changes: %v %v", st, err)
	}

	// What changes nothing is fine.
	if err := os.Truncate(img, size); err != nil {
		t.Errorf("truncate to the same size: %v", err)
	}
	if err := os.Chmod(img, 0o644); err != nil {
		t.Errorf("chmod to the same mode: %v", err)
	}
	if err := os.Chtimes(img, time.Now(), time.Now()); err != nil {
		t.Errorf("touch: %v", err)
	}

	// Writing past the end: ENOSPC; across the end: a short write.
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = f.WriteAt([]byte("x"), size)
	fuseWantErrno(t, "write at the end", err, syscall.ENOSPC)
	// (os.File.WriteAt would hide the short count behind the error.)
	n, err := unix.Pwrite(int(f.Fd()), []byte("0123456789"), size-4)
	if n != 4 || err != nil {
		t.Errorf("write across the end: %d, %v; want 4 bytes written", n, err)
	}
	if got := d.backing(t)[size-4:]; string(got) != "0123" || int64(len(d.backing(t))) != size {
		t.Errorf("disk ends with %q (size %d) after a write across the end", got, len(d.backing(t)))
	}
}

func TestFUSEOpenReleaseCallbacks(t *testing.T) {
	type event struct {
		open     bool
		export   string
		writable bool
	}
	events := make(chan event, 10)
	cat := newFUSECatalogue()
	cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, &blockdev.FUSEConfig{
		OnOpen:    func(e string, w bool) { events <- event{true, e, w} },
		OnRelease: func(e string, w bool) { events <- event{false, e, w} },
	})
	path := filepath.Join(m.Mountpoint(), "vm1", "disk0.img")
	next := func() event {
		select {
		case e := <-events:
			return e
		case <-time.After(10 * time.Second):
			return event{export: "(none within 10s)"}
		}
	}
	for _, flag := range []int{os.O_RDWR, os.O_RDONLY} {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			t.Fatal(err)
		}
		writable := flag == os.O_RDWR
		e := next()
		f.Close()
		if e != (event{true, "vm1/disk0", writable}) {
			t.Errorf("open %#x: callback %+v", flag, e)
		}
		if e := next(); e != (event{false, "vm1/disk0", writable}) {
			t.Errorf("close %#x: callback %+v", flag, e)
		}
	}
}

func TestFUSEMountpointMustBeDirectory(t *testing.T) {
	cat := newFUSECatalogue()
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := blockdev.MountFUSE(file, blockdev.FUSEConfig{Exports: cat})
	if !errors.Is(err, syscall.ENOTDIR) || !strings.Contains(err.Error(), file) {
		t.Errorf("mount on a file: %v, want ENOTDIR naming %s", err, file)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	_, err = blockdev.MountFUSE(missing, blockdev.FUSEConfig{Exports: cat})
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("mount on a missing path: %v, want ErrNotExist naming %s", err, missing)
	}
	if _, err := blockdev.MountFUSE(t.TempDir(), blockdev.FUSEConfig{}); err == nil {
		t.Errorf("mount without Exports succeeded")
	}
}

func TestFUSEExternalUnmount(t *testing.T) {
	fuseNeedTools(t, "fusermount3")
	cat := newFUSECatalogue()
	cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, nil)
	if out, err := exec.Command("fusermount3", "-u", m.Mountpoint()).CombinedOutput(); err != nil {
		t.Fatalf("fusermount3 -u: %v\n%s", err, out)
	}
	select {
	case <-m.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed 10s after fusermount3 -u")
	}
	m.Wait()
	if err := m.Unmount(); err != nil {
		t.Errorf("Unmount after an external unmount: %v", err)
	}
}

func TestFUSEUnmountBusy(t *testing.T) {
	cat := newFUSECatalogue()
	cat.add(t, "vm1/disk0", 1<<20, false)
	m := fuseMount(t, cat, nil)
	f, err := os.Open(filepath.Join(m.Mountpoint(), "vm1", "disk0.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Unmount with an open file: %v, want EBUSY", err)
	}
	select {
	case <-m.Done():
		t.Fatal("mount ended although Unmount failed")
	default:
	}
	if _, err := f.ReadAt(make([]byte, 10), 0); err != nil {
		t.Errorf("read after a failed Unmount: %v", err)
	}
	f.Close()
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount after close: %v", err)
	}
	if err := m.Unmount(); err != nil {
		t.Errorf("second Unmount: %v", err)
	}
	m.Wait()
}

// TestFUSEFioVerify runs fio with verification on the mounted file, with the
// access pattern of a guest: 4 KiB random writes, O_DIRECT, queue depth 16.
func TestFUSEFioVerify(t *testing.T) {
	fuseNeedTools(t, "fio")
	cat := newFUSECatalogue()
	cat.add(t, "vm1/disk0", 64<<20, false)
	m := fuseMount(t, cat, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "fio", "--name=v",
		"--filename="+filepath.Join(m.Mountpoint(), "vm1", "disk0.img"),
		"--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--size=32m", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
	cmd.Dir = t.TempDir() // fio leaves state files in its working directory
	out, err := cmd.CombinedOutput()
	t.Logf("fio:\n%s", out)
	if err != nil {
		t.Fatalf("fio: %v", err)
	}
	if bytes.Contains(out, []byte("verify:")) || bytes.Contains(out, []byte("bad magic")) {
		t.Fatalf("fio reported verify errors")
	}
}

// TestFUSEExt4OnLoop puts a real file system on the mounted file through a
// loop device, writes files, checks it with e2fsck, and then reads the files
// straight from the fakedisk's backing file.
func TestFUSEExt4OnLoop(t *testing.T) {
	fuseNeedRoot(t)
	fuseNeedTools(t, "losetup", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
	cat := newFUSECatalogue()
	d := cat.add(t, "vm1/disk0", 64<<20, false)
	m := fuseMount(t, cat, nil)
	img := filepath.Join(m.Mountpoint(), "vm1", "disk0.img")

	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}

	loop := run("losetup", "--find", "--show", img)
	detached := false
	detach := func() {
		if detached {
			return
		}
		detached = true
		if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v\n%s", loop, err, out)
		}
		// The kernel may finish the detach after losetup returns;
		// the FUSE file stays open (and the fuseMount busy) until it does.
		fuseWaitFor(t, 10*time.Second, loop+" detached", func() bool {
			_, err := os.Stat(filepath.Join("/sys/block", filepath.Base(loop), "loop", "backing_file"))
			return errors.Is(err, fs.ErrNotExist)
		})
	}
	t.Cleanup(detach) // runs before the FUSE unmount registered earlier

	run("mkfs.ext4", "-q", loop)
	dir := t.TempDir()
	run("mount", loop, dir)
	mounted := true
	umount := func() {
		if mounted {
			mounted = false
			run("umount", dir)
		}
	}
	t.Cleanup(umount)

	r := rand.New(rand.NewPCG(5, 6))
	files := map[string][]byte{}
	for i, n := range []int{0, 1, 4095, 4096, 100_000, 3 << 20} {
		name := fmt.Sprintf("f%d", i)
		files[name] = fuseRandomBytes(r, n)
		if err := os.WriteFile(filepath.Join(dir, name), files[name], 0o644); err != nil {
			t.Fatal(err)
		}
	}
	flushes := d.Flushes.Load()
	run("sync", "-f", dir)
	if d.Flushes.Load() == flushes {
		t.Errorf("sync on the ext4 file system did not flush the disk")
	}
	umount()
	run("e2fsck", "-fn", loop) // through the FUSE file
	detach()

	// The data is on the Disk itself.
	run("e2fsck", "-fn", d.path)
	for name, want := range files {
		out, err := exec.Command("debugfs", "-R", "cat /"+name, d.path).Output()
		if err != nil {
			t.Fatalf("debugfs cat %s: %v", name, err)
		}
		if !bytes.Equal(out, want) {
			t.Errorf("%s on the disk: %d bytes, differs from the %d written", name, len(out), len(want))
		}
	}
}

// fuseWaitFor polls cond until it holds or the deadline passes.
func fuseWaitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fuseStaleChild runs in a child process of TestFUSEStaleMount: it mounts
// VDREPL_TEST_STALE_MOUNT (as vdrepl, or as another file system when
// VDREPL_TEST_STALE_OTHER is set), says "mounted" and serves until it is
// killed.
func fuseStaleChild(t *testing.T, mp string) {
	if os.Getenv("VDREPL_TEST_STALE_OTHER") != "" {
		opts := &gofs.Options{MountOptions: gofuse.MountOptions{FsName: "otherfs", Name: "other", DirectMount: true}}
		server, err := gofuse.NewServer(gofs.NewNodeFS(&gofs.Inode{}, opts), mp, &opts.MountOptions)
		if err != nil {
			t.Fatalf("mount other: %v", err)
		}
		go server.Serve()
		if err := server.WaitMount(); err != nil {
			t.Fatalf("mount other: %v", err)
		}
	} else {
		cat := newFUSECatalogue()
		cat.add(t, "vm1/disk0", 1<<20, false)
		if _, err := blockdev.MountFUSE(mp, blockdev.FUSEConfig{Exports: cat}); err != nil {
			t.Fatalf("MountFUSE: %v", err)
		}
	}
	fmt.Println("mounted")
	select {}
}

// fuseStaleMount leaves a stale FUSE mount at a new directory: a child
// process mounts it and is killed with SIGKILL. other mounts another file
// system than vdrepl's.
func fuseStaleMount(t *testing.T, other bool) string {
	t.Helper()
	fuseNeedDevice(t)
	fuseNeedRoot(t)
	mp := t.TempDir()
	child := exec.Command(os.Args[0], "-test.run=^TestFUSEStaleMount$", "-test.count=1")
	child.Env = append(os.Environ(), "VDREPL_TEST_STALE_MOUNT="+mp)
	if other {
		child.Env = append(child.Env, "VDREPL_TEST_STALE_OTHER=1")
	}
	child.Stderr = fuseLogWriter{t}
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever the test did, leave no mount behind.
		for unix.Unmount(mp, unix.MNT_DETACH) == nil {
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "mounted\n" {
		child.Process.Kill()
		child.Wait()
		t.Fatalf("child did not mount: %q, %v", line, err)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	_, err = os.Stat(mp)
	if !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after the child was killed, stat %s: %v, want ENOTCONN (a stale mount)", mp, err)
	}
	return mp
}

// TestFUSEStaleMount: after the process serving a mount died (a daemon
// crash), mounting again on the same point detaches our stale mount and
// works; a stale mount of another file system is left alone.
func TestFUSEStaleMount(t *testing.T) {
	if mp := os.Getenv("VDREPL_TEST_STALE_MOUNT"); mp != "" {
		fuseStaleChild(t, mp)
		return
	}
	t.Run("ours", func(t *testing.T) {
		mp := fuseStaleMount(t, false)
		cat := newFUSECatalogue()
		d := cat.add(t, "vm2/disk0", 1<<20, false)
		m, err := blockdev.MountFUSE(mp, blockdev.FUSEConfig{Exports: cat, Logger: fuseTestLogger(t)})
		if err != nil {
			t.Fatalf("MountFUSE on a stale vdrepl mount: %v", err)
		}
		defer m.Unmount()
		if got := fuseReadDirNames(t, mp); !slices.Equal(got, []string{"vm2"}) {
			t.Errorf("new mount lists %v, want [vm2]", got)
		}
		f, err := os.OpenFile(filepath.Join(mp, "vm2", "disk0.img"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("fresh"), 0); err != nil {
			t.Fatalf("write through the new mount: %v", err)
		}
		f.Close()
		if got := d.backing(t)[:5]; string(got) != "fresh" {
			t.Errorf("disk holds %q after a write through the new mount", got)
		}
		if err := m.Unmount(); err != nil {
			t.Fatalf("Unmount: %v", err)
		}
		// Only the new mount was on top of the directory: it is empty now.
		if got := fuseReadDirNames(t, mp); len(got) != 0 {
			t.Errorf("after Unmount the mount point lists %v", got)
		}
	})
	t.Run("other", func(t *testing.T) {
		mp := fuseStaleMount(t, true)
		_, err := blockdev.MountFUSE(mp, blockdev.FUSEConfig{Exports: newFUSECatalogue()})
		if !errors.Is(err, blockdev.ErrStaleMount) || !strings.Contains(err.Error(), mp) || !strings.Contains(err.Error(), "fuse.other") {
			t.Errorf("MountFUSE on another file system's stale mount: %v, want ErrStaleMount naming %s and fuse.other", err, mp)
		}
		if _, err := os.Stat(mp); !errors.Is(err, syscall.ENOTCONN) {
			t.Errorf("another file system's stale mount was touched: stat %v, want ENOTCONN", err)
		}
	})
}
