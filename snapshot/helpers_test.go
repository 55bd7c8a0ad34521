package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// testLogger logs to t.Log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// Kinds of image changes, as apply's frames.
const (
	opWrite = iota
	opTrim  // PUNCH_HOLE
	opZero  // ZERO_RANGE
)

type op struct {
	disk   int
	kind   int
	off, n int64
	data   []byte
}

// harness plays apply against a Store: it keeps a model of the images and
// a copy of it at every point taken.
type harness struct {
	t     testing.TB
	fs    vfs.FS
	dir   string
	disks []Disk
	s     *Store
	model [][]byte
	at    map[uint64][][]byte // model at each cycle a point was taken at
	cycle uint64              // last cycle applied
	rng   *rand.Rand
	every uint64 // a point every this many cycles
	quick bool   // read views in one piece per disk (crash loops)
}

// testSizes are the disks of the exactness tests; smallSizes those of the
// crash and fault loops, which run hundreds of times.
var (
	testSizes  = []int64{3<<20 + 4096, 1<<20 + 2560}
	smallSizes = []int64{256<<10 + 4096, 128<<10 + 2560}
)

func newHarness(t testing.TB, fsys vfs.FS, seed uint64) *harness {
	return newHarnessSizes(t, fsys, seed, testSizes)
}

func newHarnessSizes(t testing.TB, fsys vfs.FS, seed uint64, sizes []int64) *harness {
	h := &harness{
		t:     t,
		fs:    fsys,
		dir:   "/vm/points",
		at:    map[uint64][][]byte{},
		rng:   rand.New(rand.NewPCG(seed, 7)),
		every: 3,
	}
	if err := fsys.MkdirAll("/vm", 0o755); err != nil {
		t.Fatal(err)
	}
	for i, size := range sizes {
		path := fmt.Sprintf("/vm/disk%d.img", i)
		f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		h.disks = append(h.disks, Disk{Name: fmt.Sprintf("disk%d", i), Size: size, Path: path})
		h.model = append(h.model, make([]byte, size))
	}
	if err := fsys.SyncDir("/vm"); err != nil {
		t.Fatal(err)
	}
	if err := fsys.SyncDir("/"); err != nil {
		t.Fatal(err)
	}
	h.open()
	return h
}

func (h *harness) config() Config {
	return Config{FS: h.fs, Dir: h.dir, Disks: h.disks, Logger: testLogger(h.t)}
}

func (h *harness) open() {
	h.t.Helper()
	s, err := Open(h.config())
	if err != nil {
		h.t.Fatalf("open: %v", err)
	}
	h.s = s
}

func (h *harness) reopen() {
	h.t.Helper()
	if err := h.s.Close(); err != nil {
		h.t.Fatal(err)
	}
	h.open()
}

// randomOps makes the changes of one cycle: writes, trims and zeroes,
// aligned or not, many of them on a small hot region so blocks change again
// and again.
func (h *harness) randomOps() []op {
	var ops []op
	for range 1 + h.rng.IntN(8) {
		o := op{disk: h.rng.IntN(len(h.disks))}
		size := h.disks[o.disk].Size
		switch r := h.rng.IntN(10); {
		case r < 6:
			o.kind = opWrite
		case r < 8:
			o.kind = opTrim
		default:
			o.kind = opZero
		}
		maxLen := min(64<<10, size/4)
		if o.kind != opWrite && h.rng.IntN(4) == 0 {
			maxLen = size
		}
		if h.rng.IntN(2) == 0 {
			o.off = h.rng.Int64N(min(64<<10, size)) / 512 * 512 // hot region
		} else {
			o.off = h.rng.Int64N(size)
		}
		if h.rng.IntN(3) == 0 {
			o.off = o.off / BlockSize * BlockSize
		}
		o.n = 1 + h.rng.Int64N(min(maxLen, size-o.off))
		if o.kind == opWrite {
			o.data = make([]byte, o.n)
			fill(h.rng, o.data)
		}
		ops = append(ops, o)
	}
	return ops
}

// fill writes random bytes, sometimes leaving zeroed blocks.
func fill(rng *rand.Rand, b []byte) {
	var w [8]byte
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(w[:], rng.Uint64())
		copy(b[i:], w[:])
	}
	if len(b) > BlockSize && rng.IntN(2) == 0 {
		clear(b[:BlockSize])
	}
}

// applyOps does what apply does for one cycle: BeforeWrite/BeforeZero for
// every change, Sync, the changes to the images, image sync, Cycle.
func (h *harness) applyOps(c uint64, ops []op, takePoint bool) error {
	for _, o := range ops {
		var err error
		if o.kind == opWrite {
			err = h.s.BeforeWrite(o.disk, o.off, o.n)
		} else {
			err = h.s.BeforeZero(o.disk, o.off, o.n)
		}
		if err != nil {
			return err
		}
	}
	if err := h.s.Sync(); err != nil {
		return err
	}
	if err := h.writeImages(ops); err != nil {
		return err
	}
	return h.s.Cycle(c, time.Unix(int64(c)*60, 0), c%2 == 0, takePoint)
}

func (h *harness) writeImages(ops []op) error {
	var imgs []vfs.File
	defer func() {
		for _, f := range imgs {
			f.Close()
		}
	}()
	for _, d := range h.disks {
		f, err := h.fs.OpenFile(d.Path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		imgs = append(imgs, f)
	}
	for _, o := range ops {
		var err error
		switch o.kind {
		case opWrite:
			_, err = imgs[o.disk].WriteAt(o.data, o.off)
		case opTrim:
			err = imgs[o.disk].PunchHole(o.off, o.n)
		case opZero:
			err = imgs[o.disk].ZeroRange(o.off, o.n)
		}
		if err != nil {
			return err
		}
	}
	for _, f := range imgs {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	return nil
}

// commit updates the model for a cycle applied.
func (h *harness) commit(c uint64, ops []op, takePoint bool) {
	for _, o := range ops {
		if o.kind == opWrite {
			copy(h.model[o.disk][o.off:], o.data)
		} else {
			clear(h.model[o.disk][o.off : o.off+o.n])
		}
	}
	h.cycle = c
	if takePoint {
		h.at[c] = cloneImages(h.model)
	}
}

func cloneImages(m [][]byte) [][]byte {
	out := make([][]byte, len(m))
	for i := range m {
		out[i] = slices.Clone(m[i])
	}
	return out
}

// step applies one random cycle, failing the test on error.
func (h *harness) step() {
	h.t.Helper()
	c := h.cycle + 1
	ops := h.randomOps()
	take := c%h.every == 0
	if err := h.applyOps(c, ops, take); err != nil {
		h.t.Fatalf("cycle %d: %v", c, err)
	}
	h.commit(c, ops, take)
}

// checkPoints reads every point through a View and compares it with the
// model at its cycle, and the images with the model.
func (h *harness) checkPoints() {
	h.t.Helper()
	for _, p := range h.s.Points() {
		want, ok := h.at[p.Cycle]
		if !ok {
			h.t.Fatalf("point %s at cycle %d was never taken", p.ID, p.Cycle)
		}
		h.checkView(p.ID, want)
	}
	h.checkImages(h.model)
}

func (h *harness) checkView(id string, want [][]byte) {
	h.t.Helper()
	v, err := h.s.View(id)
	if err != nil {
		h.t.Fatalf("view %s: %v", id, err)
	}
	defer v.Close()
	for i := range h.disks {
		var got []byte
		if h.quick {
			got = make([]byte, h.disks[i].Size)
			if _, err := v.Disk(i).ReadAt(got, 0); err != nil {
				h.t.Fatalf("view %s disk %d: %v", id, i, err)
			}
		} else {
			got = readAll(h.t, v.Disk(i))
		}
		if j := firstDiff(got, want[i]); j >= 0 {
			h.t.Fatalf("point %s disk %d differs at byte %d (block %d)", id, i, j, j/BlockSize)
		}
	}
}

func (h *harness) checkImages(want [][]byte) {
	h.t.Helper()
	for i, d := range h.disks {
		got, err := vfs.ReadFile(h.fs, d.Path)
		if err != nil {
			h.t.Fatal(err)
		}
		if j := firstDiff(got, want[i]); j >= 0 {
			h.t.Fatalf("image of disk %d differs at byte %d (len %d, want %d)", i, j, len(got), len(want[i]))
		}
	}
}

// readAll reads a disk view in unaligned pieces of varied sizes.
func readAll(t testing.TB, d *DiskView) []byte {
	t.Helper()
	out := make([]byte, d.Size()+100)
	var off int64
	for step := int64(1000); off < d.Size(); step = step*7%(300<<10) + 1 {
		n, err := d.ReadAt(out[off:min(off+step, int64(len(out)))], off)
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("read at %d: %v", off, err)
		}
		if errors.Is(err, io.EOF) != (off+step > d.Size()) {
			t.Fatalf("read [%d,+%d) of %d: err %v", off, step, d.Size(), err)
		}
		off += int64(n)
	}
	return out[:off]
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func pointCycles(ps []Point) []uint64 {
	var out []uint64
	for _, p := range ps {
		out = append(out, p.Cycle)
	}
	return out
}

// errCrash is what crashFS returns once it has crashed.
var errCrash = errors.New("test: crashed")

// crashFS passes calls to a MemFS and "loses power" just before its n-th
// mutating call (create or truncate, write, sync, truncate, punch, rename,
// remove, mkdir, syncdir): it keeps the crash image a power cut would leave
// at that moment and fails that call and every later mutating one.
type crashFS struct {
	mem *vfs.MemFS
	rng *rand.Rand // nil: keep only synced data; else keep unsynced changes at random

	mu      sync.Mutex
	left    int
	crashed *vfs.MemFS
}

func newCrashFS(mem *vfs.MemFS, n int, rng *rand.Rand) *crashFS {
	return &crashFS{mem: mem, left: n, rng: rng}
}

func (c *crashFS) step() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed != nil {
		return errCrash
	}
	if c.left == 0 {
		if c.rng != nil {
			c.crashed = c.mem.CrashCloneRandom(c.rng)
		} else {
			c.crashed = c.mem.CrashClone()
		}
		return errCrash
	}
	c.left--
	return nil
}

// image returns the crash image, or nil if it did not crash.
func (c *crashFS) image() *vfs.MemFS {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.crashed
}

func (c *crashFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	if flag&(os.O_CREATE|os.O_TRUNC) != 0 {
		if err := c.step(); err != nil {
			return nil, err
		}
	}
	f, err := c.mem.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &crashFile{File: f, c: c}, nil
}

func (c *crashFS) Remove(name string) error {
	if err := c.step(); err != nil {
		return err
	}
	return c.mem.Remove(name)
}

func (c *crashFS) Rename(o, n string) error {
	if err := c.step(); err != nil {
		return err
	}
	return c.mem.Rename(o, n)
}

func (c *crashFS) MkdirAll(name string, perm fs.FileMode) error {
	if err := c.step(); err != nil {
		return err
	}
	return c.mem.MkdirAll(name, perm)
}

func (c *crashFS) SyncDir(dir string) error {
	if err := c.step(); err != nil {
		return err
	}
	return c.mem.SyncDir(dir)
}

func (c *crashFS) ReadDir(name string) ([]string, error) { return c.mem.ReadDir(name) }
func (c *crashFS) Stat(name string) (fs.FileInfo, error) { return c.mem.Stat(name) }

type crashFile struct {
	vfs.File
	c *crashFS
}

func (f *crashFile) WriteAt(b []byte, off int64) (int, error) {
	if err := f.c.step(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(b, off)
}

func (f *crashFile) Sync() error {
	if err := f.c.step(); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f *crashFile) Truncate(n int64) error {
	if err := f.c.step(); err != nil {
		return err
	}
	return f.File.Truncate(n)
}

func (f *crashFile) PunchHole(off, n int64) error {
	if err := f.c.step(); err != nil {
		return err
	}
	return f.File.PunchHole(off, n)
}

func (f *crashFile) ZeroRange(off, n int64) error {
	if err := f.c.step(); err != nil {
		return err
	}
	return f.File.ZeroRange(off, n)
}
