package journal

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// model is the expected content of every disk.
type model [][]byte

func newModel(sizes ...int64) model {
	m := make(model, len(sizes))
	for i, s := range sizes {
		m[i] = make([]byte, s)
	}
	return m
}

func testConfig(t *testing.T, fsys vfs.FS, dir string, sizes ...int64) Config {
	t.Helper()
	cfg := Config{FS: fsys, Dir: filepath.Join(dir, "journal"), SegmentSize: 1, Retain: true,
		SyncInterval: time.Hour, CheckpointInterval: time.Hour}
	if err := fsys.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := fsys.SyncDir(filepath.Dir(dir)); err != nil {
		t.Fatal(err)
	}
	for i, s := range sizes {
		p := filepath.Join(dir, "disk"+string(rune('0'+i))+".img")
		if _, err := fsys.Stat(p); err != nil {
			f, err := fsys.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(s); err != nil {
				t.Fatal(err)
			}
			f.Sync()
			f.Close()
			fsys.SyncDir(dir)
		}
		cfg.Disks = append(cfg.Disks, DiskSpec{Name: filepath.Base(p), Path: p, Size: s})
	}
	return cfg
}

func mustOpen(t *testing.T, cfg Config) *Journal {
	t.Helper()
	j, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return j
}

func checkModel(t *testing.T, j *Journal, m model) {
	t.Helper()
	for i, want := range m {
		got := make([]byte, len(want))
		if _, err := j.Disk(i).ReadAt(got, 0); err != nil {
			t.Fatalf("read disk %d: %v", i, err)
		}
		if k := firstDiff(got, want); k >= 0 {
			t.Fatalf("disk %d differs at byte %d (block %d): got %#x want %#x", i, k, k/BlockSize, got[k], want[k])
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func fill(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// randomOps applies n random writes, unaligned writes, trims and zeroes to
// both the journal and the model.
func randomOps(t *testing.T, r *rand.Rand, j *Journal, m model, n int) {
	t.Helper()
	for k := 0; k < n; k++ {
		d := r.IntN(len(m))
		size := int64(len(m[d]))
		var off, l int64
		switch r.IntN(4) {
		case 0: // aligned
			l = int64(1+r.IntN(16)) * BlockSize
			off = r.Int64N(size/BlockSize) * BlockSize
		case 1: // sector-aligned
			l = int64(1+r.IntN(20)) * 512
			off = r.Int64N(size/512) * 512
		default: // any
			l = 1 + r.Int64N(3*BlockSize)
			off = r.Int64N(size)
		}
		l = min(l, size-off)
		switch op := r.IntN(10); {
		case op < 7:
			p := fill(r, int(l))
			if _, err := j.Disk(d).WriteAt(p, off); err != nil {
				t.Fatalf("write: %v", err)
			}
			copy(m[d][off:], p)
		case op < 8:
			if err := j.Disk(d).Trim(off, l); err != nil {
				t.Fatalf("trim: %v", err)
			}
			clear(m[d][off : off+l])
		default:
			if err := j.Disk(d).Zero(off, l, op == 9); err != nil {
				t.Fatalf("zero: %v", err)
			}
			clear(m[d][off : off+l])
		}
	}
}

func imageBytes(t *testing.T, fsys vfs.FS, p string) []byte {
	t.Helper()
	b, err := vfs.ReadFile(fsys, p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestJournalReadYourWritesAndReopen(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20, 512<<10)
	// testConfig asks for the smallest segments: rotation gets exercised.
	j := mustOpen(t, cfg)
	m := newModel(1<<20, 512<<10)
	r := rand.New(rand.NewPCG(1, 2))
	randomOps(t, r, j, m, 2000)
	checkModel(t, j, m)
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	// Write-back and the read path must agree while blocks move to the image.
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	checkModel(t, j, m)
	randomOps(t, r, j, m, 500)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	for i, d := range cfg.Disks {
		if !bytes.Equal(imageBytes(t, vfs.Default, d.Path), m[i]) {
			t.Fatalf("image %d after Close differs from the model", i)
		}
	}
	j = mustOpen(t, cfg)
	defer j.Close()
	checkModel(t, j, m)
}

func TestJournalBadInput(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 64<<10)
	j := mustOpen(t, cfg)
	defer j.Close()
	d := j.Disk(0)
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"write past end", func() error { _, err := d.WriteAt(make([]byte, 10), 64<<10-5); return err }()},
		{"read past end", func() error { _, err := d.ReadAt(make([]byte, 10), 64<<10); return err }()},
		{"negative offset", func() error { _, err := d.WriteAt(make([]byte, 10), -1); return err }()},
		{"trim past end", d.Trim(0, 64<<10+1)},
	} {
		if !errors.Is(tc.err, ErrOutOfRange) {
			t.Errorf("%s: got %v, want ErrOutOfRange", tc.name, tc.err)
		}
	}
	if st := j.Stats(); st.Head != st.Synced || st.PendingBlocks != 0 {
		t.Errorf("bad input changed the journal: %+v", st)
	}
	// A disk whose size is not a multiple of the block size is refused.
	bad := cfg
	bad.Disks = []DiskSpec{{Name: "odd", Path: cfg.Disks[0].Path, Size: 1000}}
	if _, err := Open(bad); err == nil {
		t.Fatal("Open accepted a 1000-byte disk")
	}
	// An image whose size differs from the registered size is refused.
	bad.Disks = []DiskSpec{{Name: "big", Path: cfg.Disks[0].Path, Size: 128 << 10}}
	if _, err := Open(bad); err == nil {
		t.Fatal("Open accepted a size mismatch")
	}
}

func TestJournalConcurrentWritersAndFlushes(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 4<<20)
	cfg.SyncInterval = time.Millisecond
	cfg.CheckpointInterval = 5 * time.Millisecond
	j := mustOpen(t, cfg)
	m := newModel(4 << 20)
	var wg sync.WaitGroup
	// Each writer owns its own 1 MiB region so the model is exact.
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			base := int64(w) << 20
			for k := 0; k < 300; k++ {
				off := base + r.Int64N(1<<20-8192)
				p := fill(r, 1+r.IntN(8192))
				if _, err := j.Disk(0).WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				copy(m[0][off:], p)
				if k%17 == 0 {
					if err := j.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
				if k%50 == 0 {
					if _, err := j.Seal(0); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	checkModel(t, j, m)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(imageBytes(t, vfs.Default, cfg.Disks[0].Path), m[0]) {
		t.Fatal("image differs from model")
	}
}

// applyCycle replays closed cycle c's extents onto the images imgs.
func applyCycle(t *testing.T, j *Journal, c uint64, imgs model) {
	t.Helper()
	err := j.Extents(c, func(e Extent) error {
		switch e.Kind {
		case KindWrite:
			p := make([]byte, e.Length)
			if err := j.ReadExtent(e, p); err != nil {
				return err
			}
			copy(imgs[e.Disk][e.Offset:], p)
		default:
			clear(imgs[e.Disk][e.Offset : e.Offset+e.Length])
		}
		return nil
	})
	if err != nil {
		t.Fatalf("extents of cycle %d: %v", c, err)
	}
}

func cloneModel(m model) model {
	c := make(model, len(m))
	for i := range m {
		c[i] = bytes.Clone(m[i])
	}
	return c
}

func TestSealCoalescesAndReplaysExactly(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 1<<20, 256<<10)
	j := mustOpen(t, cfg)
	m := newModel(1<<20, 256<<10)
	replica := cloneModel(m)
	r := rand.New(rand.NewPCG(3, 4))

	// A block written 1000 times ships once.
	var last []byte
	for k := 0; k < 1000; k++ {
		last = fill(r, BlockSize)
		if _, err := j.Disk(0).WriteAt(last, 8*BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	copy(m[0][8*BlockSize:], last)
	info, err := j.Seal(SealAppConsistent)
	if err != nil {
		t.Fatal(err)
	}
	if info.Blocks != 1 || info.Bytes != 1000*BlockSize || !info.AppConsistent {
		t.Fatalf("cycle info %+v: want 1 block, %d bytes, app-consistent", info, 1000*BlockSize)
	}
	var runs int
	j.Extents(info.Cycle, func(e Extent) error { runs++; return nil })
	if runs != 1 {
		t.Fatalf("cycle has %d extents, want 1", runs)
	}
	applyCycle(t, j, info.Cycle, replica)
	for i := range m {
		if !bytes.Equal(replica[i], m[i]) {
			t.Fatalf("after cycle 1, disk %d differs", i)
		}
	}

	// Random cycles, some with writes before and after trims of the same
	// blocks: the replica applying cycles in order equals the primary at
	// every barrier, across a reopen too.
	for c := 0; c < 8; c++ {
		randomOps(t, r, j, m, 200)
		info, err := j.Seal(0)
		if err != nil {
			t.Fatal(err)
		}
		if c == 4 {
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			j = mustOpen(t, cfg)
		}
		applyCycle(t, j, info.Cycle, replica)
		for i := range m {
			if k := firstDiff(replica[i], m[i]); k >= 0 {
				t.Fatalf("after cycle %d, disk %d differs at %d", info.Cycle, i, k)
			}
		}
	}
	cs := j.Cycles()
	if len(cs) != 9 {
		t.Fatalf("%d closed cycles, want 9", len(cs))
	}
	if err := j.Release(cs[len(cs)-1].Cycle); err != nil {
		t.Fatal(err)
	}
	if n := len(j.Cycles()); n != 0 {
		t.Fatalf("%d cycles after release", n)
	}
	if err := j.Extents(cs[0].Cycle, func(Extent) error { return nil }); !errors.Is(err, ErrUnknownCycle) {
		t.Fatalf("released cycle readable: %v", err)
	}
	j.Close()
}

func TestReleaseFreesSegments(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 8<<20)
	cfg.Cap = 1 << 30
	j := mustOpen(t, cfg)
	defer j.Close()
	p := make([]byte, 8<<20)
	for k := 0; k < 12; k++ { // 96 MiB through ~33 MiB segments
		if _, err := j.Disk(0).WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
	}
	info, err := j.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := j.checkpoint(true); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.Segments < 3 {
		t.Fatalf("unshipped cycle kept only %d segments", st.Segments)
	}
	j.Release(info.Cycle)
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	if err := j.checkpoint(true); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.Segments != 1 || st.RetainedBytes != 0 {
		t.Fatalf("after release: %+v", st)
	}
}

func TestCapSwitchesToDirtyTracking(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, vfs.Default, dir, 8<<20)
	cfg.Cap = 4 << 20
	cfg.SyncInterval = time.Millisecond
	cfg.CheckpointInterval = time.Millisecond
	resyncs := &msgCounter{msg: "resync required"}
	cfg.Logger = slog.New(resyncs)
	j := mustOpen(t, cfg)
	m := newModel(8 << 20)
	r := rand.New(rand.NewPCG(5, 6))
	if _, err := j.Seal(0); err != nil {
		t.Fatal(err)
	}
	// Write well past the cap; no write may fail.
	for k := 0; k < 64; k++ {
		p := fill(r, 64<<10)
		off := int64(k%32) * (64 << 10) // the first 2 MiB only
		if _, err := j.Disk(0).WriteAt(p, off); err != nil {
			t.Fatalf("write %d failed: %v", k, err)
		}
		copy(m[0][off:], p)
	}
	waitFor(t, func() bool { return j.Stats().ResyncRequired })
	st := j.Stats()
	if st.DirtyBlocks != (2<<20)/BlockSize {
		t.Fatalf("dirty blocks %d, want %d", st.DirtyBlocks, (2<<20)/BlockSize)
	}
	if len(j.Cycles()) != 0 {
		t.Fatal("cycles kept after switching to dirty tracking")
	}
	checkModel(t, j, m)
	// Dirty tracking survives a restart and keeps counting new writes.
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = mustOpen(t, cfg)
	defer j.Close()
	if _, err := j.Disk(0).WriteAt(make([]byte, BlockSize), 6<<20); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); !st.ResyncRequired || st.DirtyBlocks != (2<<20)/BlockSize+1 {
		t.Fatalf("after reopen: %+v", st)
	}
	if n := resyncs.n.Load(); n != 1 {
		t.Fatalf("resync required logged %d times", n)
	}
}

// msgCounter is a slog handler that counts the records logged with msg.
type msgCounter struct {
	msg string
	n   atomic.Int64
}

func (c *msgCounter) Enabled(context.Context, slog.Level) bool { return true }
func (c *msgCounter) WithAttrs([]slog.Attr) slog.Handler       { return c }
func (c *msgCounter) WithGroup(string) slog.Handler            { return c }

func (c *msgCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Message == c.msg {
		c.n.Add(1)
	}
	return nil
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// Stats tells what the open cycle holds, so status can count it as pending
// before any seal: writes by their bytes, a trim or zero as a change.
func TestStatsOpenCycle(t *testing.T) {
	cfg := testConfig(t, vfs.Default, t.TempDir(), 1<<20)
	j := mustOpen(t, cfg)
	defer j.Close()
	open := func(bytes int64, changed bool) {
		t.Helper()
		if st := j.Stats(); st.OpenBytes != bytes || st.OpenChanged != changed {
			t.Fatalf("open cycle %d: %d bytes, changed %v; want %d, %v", st.OpenCycle, st.OpenBytes, st.OpenChanged, bytes, changed)
		}
	}
	open(0, false)
	if _, err := j.Disk(0).WriteAt(make([]byte, 3*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	open(3*BlockSize, true)
	if _, err := j.Seal(0); err != nil {
		t.Fatal(err)
	}
	open(0, false)
	if err := j.Disk(0).Trim(0, BlockSize); err != nil {
		t.Fatal(err)
	}
	open(0, true)

	// Not kept for shipping: nothing in it will ship.
	if err := j.SetRetain(false); err != nil {
		t.Fatal(err)
	}
	if _, err := j.Seal(0); err != nil {
		t.Fatal(err)
	}
	if _, err := j.Disk(0).WriteAt(make([]byte, BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	open(BlockSize, false)
}
