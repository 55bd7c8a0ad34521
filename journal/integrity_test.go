package journal

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// flipJournal flips one byte of the journal at lsn, as damage at rest would,
// through the open journal's own segment file.
func flipJournal(t *testing.T, j *Journal, lsn uint64) {
	t.Helper()
	j.mu.Lock()
	seg := j.segmentFor(lsn)
	j.mu.Unlock()
	b := []byte{0}
	if _, err := seg.f.ReadAt(b, int64(lsn-seg.base)); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := seg.f.WriteAt(b, int64(lsn-seg.base)); err != nil {
		t.Fatal(err)
	}
}

// lastQueued is the header of the newest record awaiting write-back.
func lastQueued(t *testing.T, j *Journal) Header {
	t.Helper()
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.mu.queue) == 0 {
		t.Fatal("no record queued")
	}
	return j.mu.queue[len(j.mu.queue)-1].h
}

func wantDamage(t *testing.T, err error, disk string, off, n int64, lsn uint64) {
	t.Helper()
	var de *DamageError
	if !errors.As(err, &de) || !errors.Is(err, ErrDamaged) {
		t.Fatalf("got %v, want a *DamageError", err)
	}
	if de.DiskName != disk || de.Off != off || de.Len != n || de.LSN != lsn || !strings.HasSuffix(de.Segment, segmentSuffix) {
		t.Fatalf("damage %+v, want disk %s [%d,%d) LSN %#x in a segment", de, disk, off, off+n, lsn)
	}
	if msg := de.Error(); !strings.Contains(msg, de.Segment) || !strings.Contains(msg, fmt.Sprintf("[%d,%d)", off, off+n)) {
		t.Fatalf("the error does not name the segment and range: %s", msg)
	}
}

// TestReadExtentVerifies: ReadExtent checks the payload CRC32C of the record
// an extent comes from. A flipped byte under a closed cycle makes it fail
// with a DamageError naming the record, for an extent that is a whole
// record and for one that covers part of it (the flip lying in the part a
// later write of the cycle replaced: the whole payload is still checked).
func TestReadExtentVerifies(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 1<<20)
	j := mustOpen(t, cfg)
	defer j.Close()
	r := rand.New(rand.NewPCG(3, 3))
	write := func(off int64, n int) ([]byte, Header) {
		p := fill(r, n)
		if _, err := j.Disk(0).WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		return p, lastQueued(t, j)
	}
	dataA, recA := write(0, 64<<10)       // A: one whole-record extent
	dataB, recB := write(256<<10, 64<<10) // B: its first block rewritten by C
	dataC, _ := write(256<<10, BlockSize) // C
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil { // the image is right; only the journal is damaged
		t.Fatal(err)
	}
	info, err := j.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	exts := map[int64]Extent{}
	if err := j.Extents(info.Cycle, func(e Extent) error { exts[e.Offset] = e; return nil }); err != nil {
		t.Fatal(err)
	}
	a, b, c := exts[0], exts[256<<10+BlockSize], exts[256<<10]
	if a.Length != 64<<10 || b.Length != 64<<10-BlockSize || c.Length != BlockSize {
		t.Fatalf("extents %+v", exts)
	}
	read := func(e Extent) ([]byte, error) {
		p := make([]byte, e.Length)
		return p, j.ReadExtent(e, p)
	}
	for i, e := range []Extent{a, b, c} {
		p, err := read(e)
		if err != nil {
			t.Fatalf("ReadExtent %+v: %v", e, err)
		}
		want := [][]byte{dataA, dataB[BlockSize:], dataC}[i]
		if k := firstDiff(p, want); k >= 0 {
			t.Fatalf("extent at %d differs at byte %d", e.Offset, k)
		}
	}

	flipJournal(t, j, recA.LSN+HeaderSize+100)
	_, err = read(a)
	wantDamage(t, err, "disk0.img", 0, 64<<10, recA.LSN)

	// B's first block is C's in the cycle; damage there still fails B's
	// extent, which covers the rest of the same record.
	flipJournal(t, j, recB.LSN+HeaderSize+10)
	_, err = read(b)
	wantDamage(t, err, "disk0.img", 256<<10, 64<<10, recB.LSN)

	if _, err := read(c); err != nil {
		t.Fatalf("an undamaged record of the same cycle: %v", err)
	}
}

// TestWriteBackDamageFailsJournal: a write-back that reads a record back
// from the journal (its append buffer not kept) verifies it before writing:
// damage fails the journal with the DamageError and none of the record
// reaches the image. Then, the damaged record being the journal's last,
// the next Open cuts it and marks its range dirty.
func TestWriteBackDamageFailsJournal(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []int // record sizes, written back to back from offset 0
		damage int   // which record to damage
	}{
		{"plain", []int{64 << 10}, 0},
		{"direct", []int{256 << 10}, 0},
		{"direct-run", []int{256 << 10, 256 << 10, 256 << 10}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMemFS()
			cfg := testConfig(t, mem, "/vm", 4<<20)
			j := mustOpen(t, cfg)
			j.mu.retainLimit = 0 // no append buffer kept: the write-back reads the journal
			r := rand.New(rand.NewPCG(4, 4))
			var hs []Header
			off := int64(0)
			for _, n := range tc.writes {
				if _, err := j.Disk(0).WriteAt(fill(r, n), off); err != nil {
					t.Fatal(err)
				}
				hs = append(hs, lastQueued(t, j))
				off += int64(n)
			}
			bad := hs[tc.damage]
			// Nothing is synced, so nothing was written back yet.
			flipJournal(t, j, bad.LSN+HeaderSize+uint64(bad.Length)/2)
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			// The flush kicked the background write-back, which meets the
			// damage and fails the journal.
			waitFor(t, func() bool { return j.failedErr() != nil })
			failed := j.failedErr()
			if !errors.Is(failed, ErrFailed) {
				t.Fatalf("journal failure %v, want ErrFailed", failed)
			}
			wantDamage(t, failed, "disk0.img", int64(bad.Offset), int64(bad.Length), bad.LSN)
			if st := j.Stats(); !strings.Contains(st.Failed, "damaged") {
				t.Fatalf("Stats.Failed %q does not say the journal is damaged", st.Failed)
			}
			img := readImages(t, mem, cfg)[0]
			for i := int64(bad.Offset); i < int64(bad.Offset+bad.Length); i++ {
				if img[i] != 0 {
					t.Fatalf("damaged data reached the image at byte %d", i)
				}
			}
			if _, err := j.Disk(0).WriteAt(make([]byte, BlockSize), 0); !errors.Is(err, ErrFailed) {
				t.Fatalf("a write after the failure: %v, want ErrFailed", err)
			}
			j.Close()

			// Reopened: the records from the damaged one on are a cut tail
			// whose first header verifies; their ranges are dirty.
			j2 := mustOpen(t, cfg)
			defer j2.Close()
			st := j2.Stats()
			// Every record is in the open cycle, which the dirty map
			// replaces: all of them are dirty.
			want := off / BlockSize
			if !st.ResyncRequired || st.DirtyBlocks != want {
				t.Fatalf("after reopening: resync required %v, %d dirty blocks, want %d", st.ResyncRequired, st.DirtyBlocks, want)
			}
		})
	}
}

// TestRecoveryKeepsCutWrite: a tail record whose header verifies but whose
// payload does not (damaged, or cut short) may already be in the image, so
// recovery cuts it and marks exactly its range dirty; a tail whose header
// does not verify (zeroes, stale bytes of a recycled segment) is an
// ordinary torn tail and marks nothing.
func TestRecoveryKeepsCutWrite(t *testing.T) {
	for _, tc := range []struct {
		name  string
		tear  func(t *testing.T, f vfs.File, at int64, h Header)
		dirty bool
	}{
		{"damaged-payload", func(t *testing.T, f vfs.File, at int64, h Header) {
			flipFile(t, f, at+HeaderSize+int64(h.Length)-1)
		}, true},
		{"short-payload", func(t *testing.T, f vfs.File, at int64, h Header) {
			if err := f.Truncate(at + HeaderSize + 1000); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"zeroed-header", func(t *testing.T, f vfs.File, at int64, h Header) {
			if _, err := f.WriteAt(make([]byte, HeaderSize), at); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"stale-header", func(t *testing.T, f vfs.File, at int64, h Header) {
			// A record of the file's earlier life: it verifies, at
			// another LSN than its position's.
			h.LSN += 64 << 20
			b := make([]byte, HeaderSize)
			encodeHeader(b, &h)
			if _, err := f.WriteAt(b, at); err != nil {
				t.Fatal(err)
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The Unknown leaves the cut leaves stay for the test to see.
			treeRepairOff.Store(true)
			defer treeRepairOff.Store(false)
			mem := vfs.NewMemFS()
			cfg := testConfig(t, mem, "/vm", 1<<20)
			cfg.IndexDir = t.TempDir() // the block tree outlives the crash
			j := mustOpen(t, cfg)
			waitTreeBuilt(t, j)
			r := rand.New(rand.NewPCG(5, 5))
			// Cycle 1 is shipped and released: its records stay in the
			// segment but need no resync.
			if _, err := j.Disk(0).WriteAt(fill(r, 16<<10), 0); err != nil {
				t.Fatal(err)
			}
			if _, err := j.Seal(0); err != nil {
				t.Fatal(err)
			}
			if err := j.Release(1); err != nil {
				t.Fatal(err)
			}
			if err := j.writeBack(); err != nil {
				t.Fatal(err)
			}
			if err := j.checkpoint(true); err != nil {
				t.Fatal(err)
			}
			// The last record: flushed and written back, then kill -9.
			p := fill(r, 64<<10)
			const off = 512 << 10
			if _, err := j.Disk(0).WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			h := lastQueued(t, j)
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := j.writeBack(); err != nil {
				t.Fatal(err)
			}
			j.mu.Lock()
			seg := j.segmentFor(h.LSN)
			j.mu.Unlock()
			j.abandon()
			f, err := mem.OpenFile(seg.name, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			tc.tear(t, f, int64(h.LSN-seg.base), h)
			f.Close()

			j2 := mustOpen(t, cfg)
			defer j2.Close()
			st := j2.Stats()
			// The tree claimed the record's hashes before the crash; the
			// cut makes them Unknown, whatever the image holds.
			hs, err := j2.BlockTree().Blocks(0, off, 64<<10)
			if err != nil {
				t.Fatal(err)
			}
			for i, h := range hs {
				if unknown := h == blocktree.Unknown; unknown != tc.dirty {
					t.Fatalf("block %d of the cut record: Unknown %v in the tree, want %v", i, unknown, tc.dirty)
				}
			}
			if want := map[bool]int64{true: 1}[tc.dirty]; st.TreeUnknownLeaves != want || st.TreeComplete == tc.dirty {
				t.Fatalf("tree: %d Unknown leaves (want %d), complete %v", st.TreeUnknownLeaves, want, st.TreeComplete)
			}
			if !tc.dirty {
				checkTreeAgrees(t, j2, readImages(t, mem, cfg))
				if st.ResyncRequired {
					t.Fatalf("an ordinary torn tail made the VM resync required: %+v", st)
				}
				return
			}
			if !st.ResyncRequired || st.DirtyBlocks != (64<<10)/BlockSize {
				t.Fatalf("resync required %v with %d dirty blocks, want exactly the cut record's %d", st.ResyncRequired, st.DirtyBlocks, (64<<10)/BlockSize)
			}
			j2.mu.Lock()
			for b := uint64(0); b < (1<<20)/BlockSize; b++ {
				set := j2.mu.dirty.words[0][b/64]&(1<<(b%64)) != 0
				if in := b >= off/BlockSize && b < (off+64<<10)/BlockSize; set != in {
					j2.mu.Unlock()
					t.Fatalf("block %d dirty %v, want %v", b, set, in)
				}
			}
			j2.mu.Unlock()
			rng := fmt.Sprintf("[%d,%d)", off, off+64<<10)
			if !strings.Contains(st.ResyncReason, rng) || !strings.Contains(st.ResyncReason, seg.name) {
				t.Fatalf("resync reason %q does not name the range %s and segment %s", st.ResyncReason, rng, seg.name)
			}
			// The image kept the data the write-back put there.
			if img := readImages(t, mem, cfg)[0]; firstDiff(img[off:off+64<<10], p) >= 0 {
				t.Fatal("the image lost the cut record's data")
			}
			// The dirty map survives another restart.
			j2.Close()
			j3 := mustOpen(t, cfg)
			defer j3.Close()
			if st := j3.Stats(); !st.ResyncRequired || st.DirtyBlocks != (64<<10)/BlockSize {
				t.Fatalf("after another restart: %+v", st)
			}
		})
	}
}

func flipFile(t *testing.T, f vfs.File, at int64) {
	t.Helper()
	b := []byte{0}
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}
