package snapshot

import (
	"bytes"
	"errors"
	"io"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

func TestPointsExact(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		h := newHarness(t, vfs.NewMemFS(), seed)
		for range 30 {
			h.step()
		}
		if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3, 6, 9, 12, 15, 18, 21, 24, 27, 30}) {
			t.Fatalf("points %v", got)
		}
		h.checkPoints()

		h.reopen()
		h.checkPoints()
		for range 7 {
			h.step()
		}
		h.checkPoints()

		if err := h.s.Prune(4); err != nil {
			t.Fatal(err)
		}
		if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{27, 30, 33, 36}) {
			t.Fatalf("after prune: points %v", got)
		}
		h.checkPoints()
		h.reopen()
		h.checkPoints()
		if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{27, 30, 33, 36}) {
			t.Fatalf("after reopen: points %v", got)
		}
		for range 5 {
			h.step()
		}
		h.checkPoints()
		names, _ := h.fs.ReadDir(h.dir)
		if len(names) != 1+6 { // manifest and 6 segments: 27 30 33 36 39 42
			t.Fatalf("points dir holds %v", names)
		}

		if err := h.s.Prune(0); err != nil {
			t.Fatal(err)
		}
		if ps := h.s.Points(); len(ps) != 0 {
			t.Fatalf("after Prune(0): %v", ps)
		}
		h.step() // no point, nothing saved
		h.checkImages(h.model)
		if err := h.s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// A model that the checks can catch: reading a point through a View that
// ignores the undo data must fail, so the exactness test is not vacuous.
func TestPointsCheckCanFail(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 9)
	for range 6 {
		h.step()
	}
	p := h.s.Points()[0]
	v, err := h.s.View(p.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	same := true
	for i := range h.disks {
		img, _ := vfs.ReadFile(h.fs, h.disks[i].Path)
		same = same && bytes.Equal(img, h.at[p.Cycle][i])
	}
	if same {
		t.Fatal("the image did not change after the point: the test proves nothing")
	}
}

func TestStorageCostOncePerBlock(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 4)
	h.every = 1000
	if err := h.s.Cycle(1, time.Unix(1, 0), false, true); err != nil {
		t.Fatal(err)
	}
	h.cycle = 1
	h.at[1] = cloneImages(h.model)
	first := []op{{disk: 0, kind: opWrite, off: 5 * BlockSize, n: BlockSize, data: bytes.Repeat([]byte{1}, BlockSize)}}
	if err := h.applyOps(2, first, false); err != nil {
		t.Fatal(err)
	}
	h.commit(2, first, false)
	// The block was a hole at the point: a zero record.
	if got := h.s.Points()[0].OwnBytes; got != segHeaderSize+recHeaderSize {
		t.Fatalf("first write of a hole: segment of %d bytes", got)
	}
	// Make a point where the block holds data, then write it 100 times.
	if err := h.s.Cycle(3, time.Unix(3, 0), false, true); err != nil {
		t.Fatal(err)
	}
	h.commit(3, nil, true)
	for i := range 100 {
		c := uint64(4 + i)
		data := bytes.Repeat([]byte{byte(i + 2)}, 2*BlockSize)
		ops := []op{{disk: 0, kind: opWrite, off: 4*BlockSize + 100, n: int64(len(data)), data: data}}
		if err := h.applyOps(c, ops, false); err != nil {
			t.Fatal(err)
		}
		h.commit(c, ops, false)
	}
	ps := h.s.Points()
	// Blocks 4, 5 and 6 changed: 4 and 6 were holes (zero records), 5
	// held data (one data record), each saved once.
	if want := int64(segHeaderSize + 2*recHeaderSize + dataRecordSize); ps[1].OwnBytes != want {
		t.Fatalf("after 100 writes: segment of %d bytes, want %d", ps[1].OwnBytes, want)
	}
	if ps[0].Bytes != ps[0].OwnBytes+ps[1].OwnBytes {
		t.Fatalf("point 0 needs %d bytes, own %d + %d", ps[0].Bytes, ps[0].OwnBytes, ps[1].OwnBytes)
	}
	// Trimming blocks that are holes costs nothing.
	before := h.s.Points()[1].OwnBytes
	trim := []op{{disk: 1, kind: opTrim, off: 0, n: testSizes[1]}}
	if err := h.applyOps(200, trim, false); err != nil {
		t.Fatal(err)
	}
	h.commit(200, trim, false)
	if after := h.s.Points()[1].OwnBytes; after != before {
		t.Fatalf("trim of holes saved %d bytes", after-before)
	}
	h.checkPoints()
}

func TestViewStableWhileApplying(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 5)
	for range 6 {
		h.step()
	}
	ps := h.s.Points()
	v, err := h.s.View(ps[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	want := h.at[ps[0].Cycle]
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for i := range h.disks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := v.Disk(i)
			buf := make([]byte, 48<<10)
			for off := int64(0); ; off = (off + 40<<10 + 512) % d.Size() {
				select {
				case <-stop:
					return
				default:
				}
				n, err := d.ReadAt(buf, off)
				if err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
				if !bytes.Equal(buf[:n], want[i][off:off+int64(n)]) {
					errs <- errors.New("view changed while cycles were applied")
					return
				}
			}
		}()
	}
	for range 12 {
		h.step()
	}
	if err := h.s.Prune(1); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	// Prune kept the viewed point (and so every newer one).
	if got := pointCycles(h.s.Points()); got[0] != ps[0].Cycle {
		t.Fatalf("prune dropped a viewed point: %v", got)
	}
	h.checkView(ps[0].ID, want)
	for i := range h.disks {
		if j := firstDiff(readAll(t, v.Disk(i)), want[i]); j >= 0 {
			t.Fatalf("disk %d differs at %d", i, j)
		}
	}
	v.Close()
	if err := h.s.Prune(1); err != nil {
		t.Fatal(err)
	}
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{18}) {
		t.Fatalf("after the view closed: %v", got)
	}
	h.checkPoints()
}

func TestRollback(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 6)
	for range 14 {
		h.step()
	}
	ps := h.s.Points() // 3 6 9 12
	v, err := h.s.View(ps[1].ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.s.Rollback(ps[1].ID); !errors.Is(err, ErrBusy) {
		t.Fatalf("rollback with a view open: %v", err)
	}
	v.Close()
	if err := h.s.Rollback("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rollback to an unknown point: %v", err)
	}
	if err := h.s.Rollback(ps[1].ID); err != nil {
		t.Fatal(err)
	}
	h.model = cloneImages(h.at[6])
	h.cycle = 6
	h.checkImages(h.model)
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("after rollback: %v", got)
	}
	h.checkPoints()
	// Replication goes on from the point: older points stay exact.
	h.cycle = 100
	for range 7 {
		h.step()
	}
	h.checkPoints()
	h.reopen()
	h.checkPoints()
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3, 102, 105}) {
		t.Fatalf("points %v", got)
	}
	// Back to the oldest: no points left.
	if err := h.s.Rollback("3"); err != nil {
		t.Fatal(err)
	}
	h.model = cloneImages(h.at[3])
	h.checkImages(h.model)
	if ps := h.s.Points(); len(ps) != 0 {
		t.Fatalf("points %v", ps)
	}
	h.reopen()
	h.checkImages(h.model)
	names, _ := h.fs.ReadDir(h.dir)
	if !slices.Equal(names, []string{manifestFile}) {
		t.Fatalf("points dir holds %v", names)
	}
}

func TestOverlay(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 8)
	for range 6 {
		h.step()
	}
	p := h.s.Points()[0]
	v, err := h.s.View(p.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	o, err := v.Writable("/scratch")
	if err != nil {
		t.Fatal(err)
	}
	want := cloneImages(h.at[p.Cycle])
	for i := range 200 {
		disk := h.rng.IntN(2)
		d := o.Disk(disk)
		off := h.rng.Int64N(d.Size())
		n := 1 + h.rng.Int64N(min(3*BlockSize, d.Size()-off))
		switch i % 4 {
		case 0, 1:
			data := make([]byte, n)
			fill(h.rng, data)
			if _, err := d.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
			copy(want[disk][off:], data)
		case 2:
			if err := d.Trim(off, n); err != nil {
				t.Fatal(err)
			}
			clear(want[disk][off : off+n])
		case 3:
			if err := d.Zero(off, n, i%8 == 3); err != nil {
				t.Fatal(err)
			}
			clear(want[disk][off : off+n])
		}
		if i%50 == 0 {
			h.step() // replication goes on underneath
		}
	}
	if _, err := o.Disk(0).WriteAt([]byte{1}, o.Disk(0).Size()); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	for disk := range 2 {
		d := o.Disk(disk)
		got := make([]byte, d.Size())
		for off := int64(0); off < d.Size(); off += 10000 {
			if _, err := d.ReadAt(got[off:min(off+10000, d.Size())], off); err != nil {
				t.Fatal(err)
			}
		}
		if j := firstDiff(got, want[disk]); j >= 0 {
			t.Fatalf("overlay disk %d differs at %d", disk, j)
		}
	}
	// Neither the view nor the images saw the writes.
	h.checkView(p.ID, h.at[p.Cycle])
	h.checkImages(h.model)
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := h.fs.Stat("/scratch/disk" + string(rune('0'+i)) + ".scratch"); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("scratch file left: %v", err)
		}
	}
	if _, err := o.Disk(0).ReadAt(make([]byte, 10), 0); err == nil {
		t.Fatal("read of a closed overlay")
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRangeAndOrder(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 10)
	h.step()
	h.step()
	h.step()
	for _, tc := range []struct {
		disk   int
		off, n int64
	}{{2, 0, 1}, {-1, 0, 1}, {0, -1, 1}, {0, 0, -1}, {0, testSizes[0], 1}, {0, 1, 1 << 62}} {
		if err := h.s.BeforeWrite(tc.disk, tc.off, tc.n); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("BeforeWrite(%d, %d, %d): %v", tc.disk, tc.off, tc.n, err)
		}
	}
	// A repeated Cycle changes nothing, even one asking for a point.
	if err := h.s.Cycle(2, time.Now(), false, true); err != nil {
		t.Fatal(err)
	}
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("points %v", got)
	}
	if _, err := h.s.View("4"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("view of a missing point: %v", err)
	}
	h.s.Close()
	if err := h.s.BeforeWrite(0, 0, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	// Disks resized since the points were taken.
	cfg := h.config()
	cfg.Disks = slices.Clone(cfg.Disks)
	cfg.Disks[1].Size += BlockSize
	if _, err := Open(cfg); !errors.Is(err, ErrMismatch) {
		t.Fatalf("open with other disks: %v", err)
	}
	// Without points, other disks are fine.
	h.open()
	if err := h.s.Prune(0); err != nil {
		t.Fatal(err)
	}
	h.s.Close()
	s, err := Open(cfg)
	if err != nil {
		t.Fatalf("open with other disks and no points: %v", err)
	}
	s.Close()
}

// TestViewReadRacingApply makes apply save and overwrite a block between a
// view read's lookup (the block is not held: read the image) and its image
// read. The view must still return the content at the point.
func TestViewReadRacingApply(t *testing.T) {
	h := newHarnessSizes(t, vfs.NewMemFS(), 12, smallSizes)
	h.every = 1
	h.step() // point 1
	p := h.s.Points()[0]
	want := h.at[p.Cycle]
	// A block the open segment does not hold yet, with data in it.
	h.s.mu.RLock()
	var block int64 = -1
	for b := range blocks(h.disks[0].Size) {
		if _, held := h.s.open().idx.get(blockKey(0, b)); !held && want[0][b*BlockSize] != 0 {
			block = b
			break
		}
	}
	h.s.mu.RUnlock()
	if block < 0 {
		// Make one: write it, take a point after.
		ops := []op{{disk: 0, kind: opWrite, off: 40 * BlockSize, n: BlockSize, data: bytes.Repeat([]byte{7}, BlockSize)}}
		if err := h.applyOps(2, ops, true); err != nil {
			t.Fatal(err)
		}
		h.commit(2, ops, true)
		p, want, block = h.s.Points()[1], h.at[2], 40
	}
	v, err := h.s.View(p.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	c := h.cycle + 1
	ops := []op{{disk: 0, kind: opWrite, off: block * BlockSize, n: BlockSize, data: bytes.Repeat([]byte{0xee}, BlockSize)}}
	testHookAfterLookup = func() {
		testHookAfterLookup = nil
		if err := h.applyOps(c, ops, false); err != nil {
			t.Error(err)
		}
	}
	defer func() { testHookAfterLookup = nil }()
	got := make([]byte, BlockSize)
	if _, err := v.Disk(0).ReadAt(got, block*BlockSize); err != nil {
		t.Fatal(err)
	}
	if testHookAfterLookup != nil {
		t.Fatal("the hook did not run")
	}
	if !bytes.Equal(got, want[0][block*BlockSize:(block+1)*BlockSize]) {
		t.Fatal("a view read racing apply returned the new content")
	}
	h.commit(c, ops, false)
	h.checkPoints()
}

// blockDisk is blockdev.Disk's method set (snapshot does not import
// blockdev): an OverlayDisk must be servable as a test-failover export.
type blockDisk interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	Flush() error
	Trim(off, length int64) error
	Zero(off, length int64, punch bool) error
}

var _ blockDisk = (*OverlayDisk)(nil)

// TestPointAtNewestCycle: the newest cycle recorded without a point can
// still become one while the images hold it (a test failover of the latest
// state), exactly once; an older cycle cannot.
func TestPointAtNewestCycle(t *testing.T) {
	h := newHarness(t, vfs.NewMemFS(), 7)
	h.every = 1000
	for range 3 {
		h.step() // cycles 1..3, no point
	}
	if n := len(h.s.Points()); n != 0 {
		t.Fatalf("%d points before any was asked for", n)
	}
	if err := h.s.Cycle(2, time.Unix(2, 0), false, true); err != nil {
		t.Fatal(err)
	}
	if n := len(h.s.Points()); n != 0 {
		t.Fatalf("an older cycle became a point")
	}
	for range 2 {
		if err := h.s.Cycle(3, time.Unix(3, 0), false, true); err != nil {
			t.Fatal(err)
		}
	}
	h.at[3] = cloneImages(h.model)
	if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{3}) {
		t.Fatalf("points %v, want [3]", got)
	}
	for range 3 {
		h.step()
	}
	h.checkPoints()
}
