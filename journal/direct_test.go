package journal

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// journalRecords scans every segment of a closed journal in fsys and returns
// the records it keeps (pads excepted) with their segment's base.
func journalRecords(t *testing.T, fsys vfs.FS, dir string) (hs []Header, bases []uint64) {
	t.Helper()
	segs, err := listSegments(fsys, dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range segs {
		seg, err := openSegment(fsys, dir, b)
		if err != nil {
			t.Fatal(err)
		}
		size, _ := seg.f.Size()
		res, err := scanSegment(seg, size, func(*Header) bool { return true }, func(h Header, _ []byte) error {
			hs = append(hs, h)
			bases = append(bases, b)
			return nil
		})
		seg.f.Close()
		if err != nil || res.torn != nil && !errors.Is(res.torn, ErrZeroed) {
			t.Fatalf("scan %s: %v, torn %v", seg.name, err, res.torn)
		}
	}
	return hs, bases
}

// TestDirectAppendLayout: large writes land with their payload on a
// DirectAlign boundary of the segment file behind a pad record, whether the
// head was on a boundary or not; small ones stay plain. Reads, a restart and a
// power cut after a flush all see the data.
func TestDirectAppendLayout(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 4<<20)
	j := mustOpen(t, cfg)
	m := newModel(4 << 20)
	r := rand.New(rand.NewPCG(3, 4))
	writes := []struct{ off, n int64 }{
		{0, BlockSize},                 // plain: leaves the head unaligned
		{64 << 10, 256 << 10},          // direct, pad split around a boundary
		{1 << 20, 1 << 20},             // direct, head already on a boundary
		{5 * BlockSize, 2 * BlockSize}, // plain again
		{3 << 20, directAppendMin},     // direct at the threshold
		{100, 200 << 10},               // unaligned: widened, then direct
	}
	for _, w := range writes {
		p := fill(r, int(w.n))
		if _, err := j.Disk(0).WriteAt(p, w.off); err != nil {
			t.Fatal(err)
		}
		copy(m[0][w.off:], p)
	}
	checkModel(t, j, m)
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	crashed := mem.CrashClone()
	j.abandon()

	hs, bases := journalRecords(t, mem, cfg.Dir)
	direct := 0
	for i, h := range hs {
		if h.Kind != KindWrite {
			continue
		}
		aligned := (h.LSN+HeaderSize-bases[i])%vfs.DirectAlign == 0
		if h.Length >= directAppendMin {
			direct++
			if !aligned {
				t.Errorf("direct record at LSN %#x: payload not on a boundary", h.LSN)
			}
		}
	}
	if direct != 4 {
		t.Fatalf("%d direct records, want 4", direct)
	}

	cfg2 := cfg
	cfg2.FS = crashed
	j2 := mustOpen(t, cfg2) // power cut after the flush: everything kept
	checkModel(t, j2, m)
	j2.Close()
	j3 := mustOpen(t, cfg) // kill -9: everything written kept
	defer j3.Close()
	checkModel(t, j3, m)
}

// TestDirectAppendFailure: the O_DIRECT write of an append fails, whole or
// half way, or the plain write of its pad does. The append fails, the journal
// stops, and recovery after a crash cuts the torn record and keeps every
// flushed write before it.
func TestDirectAppendFailure(t *testing.T) {
	cases := []struct {
		name      string
		unaligned bool // a plain record before: the pad has a plain part
		inject    func(e *vfs.ErrorFS)
	}{
		{"direct-short", false, func(e *vfs.ErrorFS) { e.InjectShortWritePath(".seg", 0) }},
		{"direct-error", false, func(e *vfs.ErrorFS) { e.InjectAfterPath(vfs.OpWrite, ".seg", 0, vfs.ErrInjected) }},
		{"pad-short", true, func(e *vfs.ErrorFS) { e.InjectShortWritePath(".seg", 0) }},
		{"after-pad-short", true, func(e *vfs.ErrorFS) { e.InjectShortWritePath(".seg", 1) }},
		{"after-pad-error", true, func(e *vfs.ErrorFS) { e.InjectAfterPath(vfs.OpWrite, ".seg", 1, vfs.ErrInjected) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMemFS()
			efs := vfs.NewErrorFS(mem)
			cfg := testConfig(t, efs, "/vm", 2<<20)
			j := mustOpen(t, cfg)
			m := newModel(2 << 20)
			r := rand.New(rand.NewPCG(5, 6))
			write := func(off int64, n int) error {
				p := fill(r, n)
				if _, err := j.Disk(0).WriteAt(p, off); err != nil {
					return err
				}
				copy(m[0][off:], p)
				return nil
			}
			if err := write(0, 256<<10); err != nil { // direct: head ends aligned
				t.Fatal(err)
			}
			if tc.unaligned {
				if err := write(512<<10, BlockSize); err != nil {
					t.Fatal(err)
				}
			}
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			tc.inject(efs)
			err := write(1<<20, 512<<10)
			if !errors.Is(err, ErrFailed) {
				t.Fatalf("append with a failing write: %v, want ErrFailed", err)
			}
			if err := j.Flush(); !errors.Is(err, ErrFailed) {
				t.Fatalf("Flush after the failure: %v, want ErrFailed", err)
			}
			efs.Reset()
			kept := mem.CrashCloneRandom(rand.New(rand.NewPCG(7, 8)))
			j.abandon()
			for _, fsys := range []vfs.FS{mem, kept} {
				c := cfg
				c.FS = fsys
				j2 := mustOpen(t, c)
				checkModel(t, j2, m)
				// The journal goes on after the cut: another direct append.
				p := fill(r, 256<<10)
				if _, err := j2.Disk(0).WriteAt(p, 1<<20); err != nil {
					t.Fatal(err)
				}
				m2 := newModel(2 << 20)
				copy(m2[0], m[0])
				copy(m2[0][1<<20:], p)
				checkModel(t, j2, m2)
				if err := j2.Close(); err != nil {
					t.Fatal(err)
				}
				j3 := mustOpen(t, c)
				checkModel(t, j3, m2)
				j3.Close()
			}
		})
	}
}

// TestDirectAppendPlainFS: a filesystem without O_DIRECT (the FS seam's
// wrappers may hide it) gets plain appends.
func TestDirectAppendPlainFS(t *testing.T) {
	fsys := plainFS{vfs.NewMemFS()}
	cfg := testConfig(t, fsys, "/vm", 1<<20)
	j := mustOpen(t, cfg)
	p := fill(rand.New(rand.NewPCG(1, 2)), 512<<10)
	if _, err := j.Disk(0).WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	m := newModel(1 << 20)
	copy(m[0], p)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	hs, _ := journalRecords(t, fsys, cfg.Dir)
	if len(hs) != 1 || hs[0].LSN != segmentHeaderSize {
		t.Fatalf("records %+v, want one plain record right after the segment header", hs)
	}
	j2 := mustOpen(t, cfg)
	defer j2.Close()
	checkModel(t, j2, m)
}

// plainFS hides the optional capabilities of its files.
type plainFS struct{ vfs.FS }

type plainFile struct{ vfs.File }

func (p plainFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	f, err := p.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return plainFile{f}, nil
}

// TestWriteBackRun: a sequential stream of direct appends is written back in
// grouped runs; a record that a newer one partly overwrote breaks the run and
// is written back block by block. The data comes from the retained append
// buffers or, past their budget, from the journal. The image ends up equal to
// the disk, and a failing grouped write stops the journal without losing a
// flushed write.
func TestWriteBackRun(t *testing.T) {
	for _, tc := range []struct{ fail, retain bool }{{false, true}, {false, false}, {true, true}, {true, false}} {
		fail := tc.fail
		t.Run(fmt.Sprintf("fail-%v-retain-%v", tc.fail, tc.retain), func(t *testing.T) {
			mem := vfs.NewMemFS()
			efs := vfs.NewErrorFS(mem)
			cfg := testConfig(t, efs, "/vm", 4<<20)
			j := mustOpen(t, cfg)
			if !tc.retain { // no budget: the write-back reads the journal
				j.mu.retainLimit = 0
			}
			m := newModel(4 << 20)
			r := rand.New(rand.NewPCG(9, 9))
			write := func(off int64, n int) {
				p := fill(r, n)
				if _, err := j.Disk(0).WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(m[0][off:], p)
			}
			for k := int64(0); k < 12; k++ {
				write(k*256<<10, 256<<10)
			}
			write(5*256<<10+BlockSize, BlockSize) // breaks the run at record 5
			// Nothing is synced yet, so nothing was written back.
			j.mu.Lock()
			kept := j.mu.retained
			j.mu.Unlock()
			if tc.retain && kept == 0 || !tc.retain && kept != 0 {
				t.Fatalf("%d bytes of append buffers retained", kept)
			}
			if fail {
				// Before the flush: the flush kicks the background
				// write-back, which may run before the call below, and
				// whichever runs first must meet the fault.
				efs.InjectAfterPath(vfs.OpWrite, "disk0", 0, vfs.ErrInjected)
			}
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			if fail {
				// The fault reaches this call, or the background
				// write-back met it first and failed the journal.
				err := j.writeBack()
				j.mu.Lock()
				failed := j.mu.failed
				j.mu.Unlock()
				if !errors.Is(err, vfs.ErrInjected) && !errors.Is(failed, vfs.ErrInjected) {
					t.Fatalf("writeBack with a failing image write: %v (journal failure: %v)", err, failed)
				}
				efs.Reset()
				crashReopenCheck(t, j, mem, cfg, m)
				return
			}
			if err := j.writeBack(); err != nil {
				t.Fatal(err)
			}
			j.mu.Lock()
			kept = j.mu.retained
			j.mu.Unlock()
			if kept != 0 {
				t.Fatalf("%d bytes of append buffers still retained after the write-back", kept)
			}
			if n := j.npending.Load(); n != 0 {
				t.Fatalf("%d blocks still pending after the write-back", n)
			}
			if img := readImages(t, mem, cfg); firstDiff(img[0], m[0]) >= 0 {
				t.Fatalf("image differs from the disk at byte %d", firstDiff(img[0], m[0]))
			}
			checkModel(t, j, m)
			j.Close()
		})
	}
}

// TestBackPressure: a stream of direct appends faster than the write-back
// waits for the buffers kept for it instead of outrunning them, so the
// write-back never reads a record back from the journal; the buffers kept
// never pass their budget, and the image ends up equal to the disk.
func TestBackPressure(t *testing.T) {
	mem := vfs.NewMemFS()
	efs := vfs.NewErrorFS(mem)
	cfg := testConfig(t, efs, "/vm", 8<<20)
	j := mustOpen(t, cfg)
	defer j.Close()
	waitTreeBuilt(t, j) // its reads of the image are not the write-back's
	const rec = 256 << 10
	j.mu.retainLimit = 3 * cap(getAligned(vfs.DirectAlign+rec)) // three appends' buffers
	m := newModel(8 << 20)
	r := rand.New(rand.NewPCG(3, 3))
	reads := efs.Count(vfs.OpRead)
	for k := int64(0); k < 64; k++ {
		off := k % 32 * rec
		p := fill(r, rec)
		if _, err := j.Disk(0).WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(m[0][off:], p)
		j.mu.Lock()
		kept := j.mu.retained
		j.mu.Unlock()
		if kept > j.mu.retainLimit {
			t.Fatalf("after append %d: %d bytes of buffers kept, budget %d", k, kept, j.mu.retainLimit)
		}
	}
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	if n := efs.Count(vfs.OpRead) - reads; n != 0 {
		t.Fatalf("the write-back read the journal back %d times", n)
	}
	if img := readImages(t, mem, cfg); firstDiff(img[0], m[0]) >= 0 {
		t.Fatalf("image differs from the disk at byte %d", firstDiff(img[0], m[0]))
	}
	checkModel(t, j, m)
}

// TestReceiveWrite: payloads received straight into append buffers are
// journaled like WriteAt's, whether they can be appended from that buffer
// (large, on block boundaries) or take the copying path (small, unaligned);
// they survive a crash once flushed; a stream cut short or a write out of
// range changes nothing.
func TestReceiveWrite(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 8<<20)
	j := mustOpen(t, cfg)
	m := newModel(8 << 20)
	r := rand.New(rand.NewPCG(4, 4))
	d := j.Disk(0)
	if d.ReceiveMin() != directAppendMin {
		t.Fatalf("ReceiveMin %d, want %d", d.ReceiveMin(), directAppendMin)
	}
	for _, w := range []struct {
		off int64
		n   int
	}{
		{0, 1 << 20},           // appended from the receive buffer
		{1 << 20, 256 << 10},   // likewise
		{3<<20 + 512, 1 << 20}, // unaligned: read-modify-write of its edges
		{5 << 20, 4096},        // small: a plain record
		{512 << 10, 128 << 10}, // overwrites part of the first
	} {
		p := fill(r, w.n)
		write, err := d.ReceiveWrite(bytes.NewReader(p), w.n)
		if err != nil {
			t.Fatal(err)
		}
		if err := write(w.off); err != nil {
			t.Fatalf("write %d+%d: %v", w.off, w.n, err)
		}
		copy(m[0][w.off:], p)
	}
	if _, err := d.ReceiveWrite(bytes.NewReader(fill(r, 1000)), 256<<10); err == nil {
		t.Error("a payload cut short was received")
	}
	write, err := d.ReceiveWrite(bytes.NewReader(fill(r, 256<<10)), 256<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := write(8<<20 - 4096); err == nil {
		t.Error("a received write past the end of the disk was accepted")
	}
	checkModel(t, j, m)
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	crashReopenCheck(t, j, mem, cfg, m)
}

// crashReopenCheck crashes j (unsynced data of mem dropped), opens the journal
// again on what is left and checks that it reads as m.
func crashReopenCheck(t *testing.T, j *Journal, mem *vfs.MemFS, cfg Config, m model) {
	t.Helper()
	crashed := mem.CrashClone()
	j.abandon()
	cfg.FS = crashed
	j2 := mustOpen(t, cfg)
	defer j2.Close()
	checkModel(t, j2, m)
}

// TestPoolBuffersReturned: every append buffer taken from the shared pool of
// huge-page buffers goes back to it: after a received write is refused (a
// negative offset, as the daemon's gate does) or its stream is cut short,
// and on Close of a journal whose write-back failed while it kept buffers.
func TestPoolBuffersReturned(t *testing.T) {
	// A pool of its own: journals that earlier tests abandoned (crashes)
	// keep theirs, and a full pool would hand out heap buffers instead.
	shared := hugeBufs
	hugeBufs = vfs.NewHugePool(shared.Size(), 2*retainMax)
	defer func() { hugeBufs = shared }()
	base := hugeBufs.InUse()
	mem := vfs.NewMemFS()
	efs := vfs.NewErrorFS(mem)
	cfg := testConfig(t, efs, "/vm", 8<<20)
	j := mustOpen(t, cfg)
	d := j.Disk(0)
	p := fill(rand.New(rand.NewPCG(9, 9)), 1<<20)

	write, err := d.ReceiveWrite(bytes.NewReader(p), len(p))
	if err != nil {
		t.Fatal(err)
	}
	if hugeBufs.InUse() != base+1 {
		t.Fatalf("%d pool buffers in use while one write is received, want %d", hugeBufs.InUse(), base+1)
	}
	if err := write(-1); err == nil {
		t.Fatal("a write at offset -1 succeeded")
	}
	if _, err := d.ReceiveWrite(bytes.NewReader(p[:1000]), len(p)); err == nil {
		t.Fatal("a payload cut short was received")
	}
	if n := hugeBufs.InUse(); n != base {
		t.Fatalf("%d pool buffers in use after a refused and a cut-short write, want %d", n, base)
	}

	for k := range int64(4) {
		if _, err := d.WriteAt(p, k<<20); err != nil {
			t.Fatal(err)
		}
	}
	if hugeBufs.InUse() != base+4 {
		t.Fatalf("%d pool buffers in use with 4 writes kept for the write-back, want %d", hugeBufs.InUse(), base+4)
	}
	efs.InjectAlways(vfs.OpWrite, syscall.EIO) // the images (and all else) fail from here
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write-back onto a failing image: %v", err)
	}
	j.Close()
	if n := hugeBufs.InUse(); n != base {
		t.Fatalf("%d pool buffers in use after Close, want %d", n, base)
	}
}
