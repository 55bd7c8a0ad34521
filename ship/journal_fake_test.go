package ship

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/journal"
)

// fakeJournal is an in-memory journal with the semantics the shipper relies
// on: writes land in the open cycle and the live disks; Seal closes the
// cycle and remembers the disks at the barrier; past Cap retained bytes it
// drops every cycle and reports ResyncRequired until BeginResync.
type fakeJournal struct {
	mu        sync.Mutex
	now       func() time.Time
	disks     [][]byte
	cycle     uint64 // open cycle
	open      *fakeCycle
	closed    []*fakeCycle
	barriers  map[uint64][][]byte // disks at each barrier
	dirty     bool
	base      uint64 // resync under way from this barrier
	cap       int64
	released  []uint64
	onRelease func(c uint64)
	// damage, if set, is asked first by ReadExtent: an error it returns
	// is damage at rest in the journal (a *journal.DamageError).
	damage func(e journal.Extent) error

	// tree, if set (withTree), is a real block tree of the disks, updated
	// with every write as the journal's write-back does (the fake writes
	// back at once); roots are its roots at each barrier.
	tree  *blocktree.Tree
	roots map[uint64][]blocktree.Root
	// holdWriteBack makes WaitWrittenBack and RootsAt wait for their
	// context, as a write-back that does not reach the barrier;
	// onWrittenBack runs when WaitWrittenBack returns.
	holdWriteBack bool
	onWrittenBack func()
}

type fakeCycle struct {
	info   journal.CycleInfo
	blocks map[[2]int64][]byte // {disk, block} -> data
	ranges []journal.Extent
}

func newFakeJournal(sizes ...int64) *fakeJournal {
	j := &fakeJournal{now: time.Now, cycle: 1, barriers: map[uint64][][]byte{}}
	for _, n := range sizes {
		j.disks = append(j.disks, make([]byte, n))
	}
	j.open = j.newCycle()
	return j
}

func (j *fakeJournal) newCycle() *fakeCycle {
	return &fakeCycle{info: journal.CycleInfo{Cycle: j.cycle}, blocks: map[[2]int64][]byte{}}
}

const bs = journal.BlockSize

// write stores p (4 KiB aligned, whole blocks except at a disk's end).
func (j *fakeJournal) write(disk int, off int64, p []byte) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if off%bs != 0 {
		panic("unaligned fake write")
	}
	copy(j.disks[disk][off:], p)
	if j.tree != nil {
		b := j.tree.Batch()
		b.Data(disk, off, p)
		if err := b.Commit(); err != nil {
			panic(err)
		}
	}
	if !j.dirty {
		for b := off; b < off+int64(len(p)); b += bs {
			blk := make([]byte, bs)
			copy(blk, j.disks[disk][b:min(b+bs, int64(len(j.disks[disk])))])
			j.open.blocks[[2]int64{int64(disk), b / bs}] = blk
		}
		j.open.info.Bytes += int64(len(p))
	}
	j.checkCapLocked()
}

// zero records a trim/zero range of kind.
func (j *fakeJournal) zero(disk int, off, n int64, kind uint8) {
	j.mu.Lock()
	defer j.mu.Unlock()
	clear(j.disks[disk][off : off+n])
	if j.tree != nil {
		b := j.tree.Batch()
		b.Zero(disk, off, n)
		if err := b.Commit(); err != nil {
			panic(err)
		}
	}
	if j.dirty {
		return
	}
	for k := range j.open.blocks {
		if k[0] == int64(disk) && k[1]*bs >= off && k[1]*bs < off+n {
			delete(j.open.blocks, k)
		}
	}
	j.open.ranges = append(j.open.ranges, journal.Extent{Disk: disk, Offset: off, Length: n, Kind: kind})
}

func (j *fakeJournal) retainedLocked() int64 {
	var n int64
	for _, c := range append(slices.Clone(j.closed), j.open) {
		n += int64(len(c.blocks))*bs + int64(len(c.ranges))*64
	}
	return n
}

func (j *fakeJournal) checkCapLocked() {
	if j.cap > 0 && !j.dirty && j.retainedLocked() > j.cap {
		j.dirty = true
		j.base = 0
		j.closed = nil
		j.open = j.newCycle()
	}
}

func (j *fakeJournal) sealLocked() journal.CycleInfo {
	c := j.open
	c.info.Sealed = j.now()
	c.info.Blocks = int64(len(c.blocks))
	c.info.Ranges = int64(len(c.ranges))
	snap := make([][]byte, len(j.disks))
	for i, d := range j.disks {
		snap[i] = slices.Clone(d)
	}
	j.barriers[c.info.Cycle] = snap
	if j.tree != nil {
		j.roots[c.info.Cycle] = j.tree.Roots()
	}
	if !j.dirty {
		j.closed = append(j.closed, c)
	}
	j.cycle++
	j.open = j.newCycle()
	return c.info
}

func (j *fakeJournal) Seal(flags uint64) (journal.CycleInfo, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.open.info.AppConsistent = flags&journal.SealAppConsistent != 0
	j.open.info.Point = flags&journal.SealPoint != 0
	return j.sealLocked(), nil
}

func (j *fakeJournal) Cycles() []journal.CycleInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []journal.CycleInfo
	for _, c := range j.closed {
		out = append(out, c.info)
	}
	return out
}

func (j *fakeJournal) find(c uint64) *fakeCycle {
	for _, fc := range j.closed {
		if fc.info.Cycle == c {
			return fc
		}
	}
	return nil
}

func (j *fakeJournal) Extents(c uint64, fn func(journal.Extent) error) error {
	j.mu.Lock()
	fc := j.find(c)
	j.mu.Unlock()
	if fc == nil {
		return fmt.Errorf("%w: %d", journal.ErrUnknownCycle, c)
	}
	for _, r := range fc.ranges {
		if err := fn(r); err != nil {
			return err
		}
	}
	keys := make([][2]int64, 0, len(fc.blocks))
	for k := range fc.blocks {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(a, b int) bool {
		if keys[a][0] != keys[b][0] {
			return keys[a][0] < keys[b][0]
		}
		return keys[a][1] < keys[b][1]
	})
	for i := 0; i < len(keys); {
		n := 1
		for i+n < len(keys) && keys[i+n][0] == keys[i][0] && keys[i+n][1] == keys[i][1]+int64(n) && n < 64 {
			n++
		}
		e := journal.Extent{Disk: int(keys[i][0]), Offset: keys[i][1] * bs, Length: int64(n) * bs, Kind: journal.KindWrite}
		if err := fn(e); err != nil {
			return err
		}
		i += n
	}
	return nil
}

func (j *fakeJournal) ReadExtent(e journal.Extent, p []byte) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if e.Kind != journal.KindWrite || int64(len(p)) != e.Length {
		return fmt.Errorf("fake: bad ReadExtent")
	}
	if j.damage != nil {
		if err := j.damage(e); err != nil {
			return err
		}
	}
	for _, fc := range j.closed {
		if _, ok := fc.blocks[[2]int64{int64(e.Disk), e.Offset / bs}]; !ok {
			continue
		}
		for b := int64(0); b < e.Length; b += bs {
			blk, ok := fc.blocks[[2]int64{int64(e.Disk), (e.Offset + b) / bs}]
			if !ok {
				return fmt.Errorf("fake: extent not in cycle")
			}
			copy(p[b:], blk)
		}
		return nil
	}
	return journal.ErrUnknownCycle
}

func (j *fakeJournal) Release(c uint64) error {
	if j.onRelease != nil {
		j.onRelease(c)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for len(j.closed) > 0 && j.closed[0].info.Cycle <= c {
		j.released = append(j.released, j.closed[0].info.Cycle)
		j.closed = j.closed[1:]
	}
	return nil
}

func (j *fakeJournal) Stats() journal.Stats {
	j.mu.Lock()
	defer j.mu.Unlock()
	return journal.Stats{
		OpenCycle: j.cycle, ClosedCycles: len(j.closed), RetainedBytes: j.retainedLocked(),
		OpenBytes: j.open.info.Bytes, OpenChanged: !j.dirty && (len(j.open.blocks) > 0 || len(j.open.ranges) > 0),
		Cap: j.cap, ResyncRequired: j.dirty, ResyncBase: j.base,
	}
}

func (j *fakeJournal) BeginResync() (journal.CycleInfo, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	info := j.sealLocked()
	for len(j.closed) > 0 && j.closed[0].info.Cycle <= info.Cycle {
		j.closed = j.closed[1:]
	}
	j.dirty = false
	j.base = info.Cycle
	return info, nil
}

func (j *fakeJournal) EndResync(base uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.base == base {
		j.base = 0
	}
	return nil
}

func (j *fakeJournal) ReadAt(disk int, p []byte, off int64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(j.disks[disk])) {
		return journal.ErrOutOfRange
	}
	copy(p, j.disks[disk][off:])
	return nil
}

// overflow lowers the cap to 64 KiB and writes 160 KiB past it on disk 0:
// every cycle is dropped and ResyncRequired reported.
func (j *fakeJournal) overflow(t *testing.T) {
	t.Helper()
	j.mu.Lock()
	j.cap = 64 << 10
	j.mu.Unlock()
	for i := range 20 {
		j.write(0, int64(i)*8192, random(8192))
	}
	if !j.Stats().ResyncRequired {
		t.Fatal("fake journal did not overflow")
	}
}

// barrier is disk d as it was at cycle c's barrier.
func (j *fakeJournal) barrier(c uint64, d int) []byte {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.barriers[c][d])
}

func (j *fakeJournal) live(d int) []byte {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.disks[d])
}

var _ Journal = (*fakeJournal)(nil)

// withTree gives the journal a block tree over an in-memory BadgerDB,
// built from the disks as they are now (call it before the shipper runs).
func (j *fakeJournal) withTree(t *testing.T) *fakeJournal {
	t.Helper()
	tree, err := memTree(t, j.disks)
	if err != nil {
		t.Fatal(err)
	}
	j.mu.Lock()
	j.tree, j.roots = tree, map[uint64][]blocktree.Root{}
	j.mu.Unlock()
	return j
}

// memTree builds a block tree of images over an in-memory BadgerDB,
// closed when the test ends.
func memTree(t *testing.T, images [][]byte) (*blocktree.Tree, error) {
	db, err := badger.Open(blocktree.Options("").WithInMemory(true))
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { db.Close() })
	var sizes []int64
	for _, img := range images {
		sizes = append(sizes, int64(len(img)))
	}
	tree, _, err := blocktree.Open(db, nil, sizes)
	if err != nil {
		return nil, err
	}
	for d, img := range images {
		for done := false; !done; {
			if done, err = tree.BuildStep(d, bytes.NewReader(img), 4<<20, nil); err != nil {
				return nil, err
			}
		}
	}
	return tree, nil
}

// BlockTree is nil unless withTree gave the journal one: the shipper then
// compares BLAKE3 sums.
func (j *fakeJournal) BlockTree() *blocktree.Tree {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.tree
}

func (j *fakeJournal) held() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.holdWriteBack
}

func (j *fakeJournal) WaitWrittenBack(ctx context.Context, c uint64) error {
	if j.held() {
		<-ctx.Done()
		return ctx.Err()
	}
	j.mu.Lock()
	f := j.onWrittenBack
	j.mu.Unlock()
	if f != nil {
		f()
	}
	return ctx.Err()
}

func (j *fakeJournal) RootsAt(ctx context.Context, c uint64) ([]blocktree.Root, error) {
	if j.held() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.roots[c]), ctx.Err()
}
