package journal

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// history records the content of the disks after every operation so a
// recovered journal can be matched against "the state after op k".
type history struct {
	states  [][32]byte         // hash of all disks after op i (i=0: initial)
	blocks  []map[int][32]byte // per op: hash of every block that op changed
	seals   map[uint64]int     // cycle -> op index at its barrier
	flushed int                // op index covered by the last successful flush
	models  []model            // full states after each op, for diagnosing failures
}

func hashModel(m model) [32]byte {
	h := sha256.New()
	for _, d := range m {
		h.Write(d)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

func blockHash(b []byte) [32]byte { return sha256.Sum256(b) }

// abandon is kill -9 for tests: the background goroutine stops, files close,
// nothing is synced, written back or checkpointed.
func (j *Journal) abandon() { j.abandonWith(func() {}) }

// abandonWith is abandon that calls crash once the background has stopped
// and before the files close: where a test takes its crash clones when
// nothing may change between them and the tree's Badger.
func (j *Journal) abandonWith(crash func()) {
	j.mu.Lock()
	j.mu.closed = true
	j.mu.cond.Broadcast()
	j.mu.Unlock()
	close(j.stop)
	j.wg.Wait()
	crash()
	j.closeFiles()
	j.cycles.close()
}

// runWorkload applies ops to j and the model, recording history, and stops
// early (returning the error) when the journal fails.
func runWorkload(r *rand.Rand, j *Journal, m model, h *history, ops int) error {
	before := cloneModel(m)
	// step records the model as one more state a crash may leave behind.
	step := func() {
		changed := map[int][32]byte{}
		for d := range m {
			for b := 0; b < len(m[d])/BlockSize; b++ {
				blk := m[d][b*BlockSize : (b+1)*BlockSize]
				if string(blk) != string(before[d][b*BlockSize:(b+1)*BlockSize]) {
					changed[d<<20|b] = blockHash(blk)
				}
			}
		}
		h.states = append(h.states, hashModel(m))
		h.blocks = append(h.blocks, changed)
		h.models = append(h.models, cloneModel(m))
		before = cloneModel(m)
	}
	for k := 0; k < ops; k++ {
		var err error
		switch op := r.IntN(20); {
		case op == 0:
			err = j.Flush()
			if err == nil {
				h.flushed = len(h.states) - 1
			}
		case op == 1:
			c := j.OpenCycle()
			// A seal that failed may still have reached the journal.
			h.seals[c] = len(h.states) - 1
			if _, err = j.Seal(0); err == nil {
				h.flushed = len(h.states) - 1 // a seal is durable
			}
		default:
			// A failed op may or may not have happened (like a failed
			// write(2)): the model applies it, and the state without it
			// stays in the history just before.
			err = oneRandomOp(r, j, m, step)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// oneRandomOp is randomOps for a single op that reports errors instead of
// failing the test. It changes the model in the steps the journal records
// atomically, calling step after each: an unaligned trim or zero is a write
// of its head, a write of its tail, then the aligned range.
func oneRandomOp(r *rand.Rand, j *Journal, m model, step func()) error {
	d := r.IntN(len(m))
	size := int64(len(m[d]))
	var off, l int64
	if r.IntN(2) == 0 {
		l = int64(1+r.IntN(4)) * BlockSize
		off = r.Int64N(size/BlockSize) * BlockSize
	} else {
		l = 1 + r.Int64N(2*BlockSize)
		off = r.Int64N(size)
	}
	l = min(l, size-off)
	op := r.IntN(10)
	if op < 8 {
		p := fill(r, int(l))
		copy(m[d][off:], p)
		step()
		_, err := j.Disk(d).WriteAt(p, off)
		return err
	}
	start := (off + BlockSize - 1) &^ (BlockSize - 1)
	end := (off + l) &^ (BlockSize - 1)
	if end <= start {
		clear(m[d][off : off+l])
		step()
	} else {
		for _, rg := range [][2]int64{{off, start}, {end, off + l}, {start, end}} {
			if rg[1] > rg[0] {
				clear(m[d][rg[0]:rg[1]])
				step()
			}
		}
	}
	if op == 8 {
		return j.Disk(d).Trim(off, l)
	}
	return j.Disk(d).Zero(off, l, false)
}

// checkRecovered checks the crash invariants on a reopened journal:
//   - its content is the state after some op k >= the last flush (no flushed
//     write lost, and no reordering: a prefix of the writes survives);
//   - the image before recovery held, for every block, a version from some op
//     <= k (never a write the journal lacks);
//   - replaying the closed cycles from zeroed disks gives each barrier's state.
func checkRecovered(t *testing.T, j *Journal, h *history, imageBefore model, sizes []int64) {
	t.Helper()
	got := newModel(sizes...)
	for i := range got {
		if _, err := j.Disk(i).ReadAt(got[i], 0); err != nil {
			t.Fatalf("read after recovery: %v", err)
		}
	}
	gh := hashModel(got)
	k := -1
	for i := len(h.states) - 1; i >= h.flushed; i-- {
		if h.states[i] == gh {
			k = i
			break
		}
	}
	if k < 0 {
		older := -1
		for i := range h.states {
			if h.states[i] == gh {
				older = i
			}
		}
		for i := max(h.flushed, 1); i < len(h.states); i++ {
			var diff []string
			for d := range got {
				for b := 0; b < len(got[d])/BlockSize; b++ {
					if string(got[d][b*BlockSize:(b+1)*BlockSize]) != string(h.models[i][d][b*BlockSize:(b+1)*BlockSize]) {
						diff = append(diff, fmt.Sprintf("d%d/b%d", d, b))
					}
				}
			}
			t.Logf("state %d differs in blocks %v", i, diff)
		}
		t.Fatalf("recovered content is no state between the last flush (op %d) and the crash (op %d); it matches op %d (-1: none)", h.flushed, len(h.states)-1, older)
	}
	for d := range imageBefore {
		for b := 0; b < len(imageBefore[d])/BlockSize; b++ {
			hb := blockHash(imageBefore[d][b*BlockSize : (b+1)*BlockSize])
			ok := hb == blockHash(make([]byte, BlockSize))
			for i := 0; i <= k && !ok; i++ {
				ok = h.blocks[i][d<<20|b] == hb
			}
			if !ok {
				t.Fatalf("image held disk %d block %d from after the recovered op %d: a write the journal lacks", d, b, k)
			}
		}
	}
	replica := newModel(sizes...)
	for _, c := range j.Cycles() {
		applyCycle(t, j, c.Cycle, replica)
		want, ok := h.seals[c.Cycle]
		if !ok || want > k {
			t.Fatalf("cycle %d recovered but was not sealed before the recovered point", c.Cycle)
		}
		if hashModel(replica) != h.states[want] {
			t.Fatalf("replaying cycles through %d does not give the state at its barrier", c.Cycle)
		}
	}
}

func readImages(t *testing.T, fsys vfs.FS, cfg Config) model {
	t.Helper()
	m := make(model, len(cfg.Disks))
	for i, d := range cfg.Disks {
		m[i] = imageBytes(t, fsys, d.Path)
	}
	return m
}

var crashSizes = []int64{64 << 10, 128 << 10}

func crashConfig(t *testing.T, fsys vfs.FS, r *rand.Rand) Config {
	cfg := testConfig(t, fsys, "/vm", crashSizes...)
	cfg.SegmentSize = 1 // smallest: rotation happens
	if r.IntN(2) == 0 {
		// Background sync, write-back and checkpoints race with the workload.
		cfg.SyncInterval = time.Millisecond
		cfg.CheckpointInterval = time.Millisecond
	}
	return cfg
}

// directHalf sends, half the time, every write of two blocks or more through
// the O_DIRECT append (pad records, aligned payloads), mixed with plain ones.
func directHalf(r *rand.Rand, j *Journal) {
	if r.IntN(2) == 0 {
		j.directMin = 2 * BlockSize
	}
}

func newHistory() *history {
	return &history{models: []model{newModel(crashSizes...)}, states: [][32]byte{hashModel(newModel(crashSizes...))}, blocks: []map[int][32]byte{{}}, seals: map[uint64]int{}}
}

// TestPowerCut: random workloads, then a power cut that keeps only synced
// data (and, half the time, a random part of the unsynced data), then recovery.
func TestPowerCut(t *testing.T) {
	for seed := uint64(1); seed <= 60; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 77))
			mem := vfs.NewMemFS()
			cfg := crashConfig(t, mem, r)
			j := mustOpen(t, cfg)
			directHalf(r, j)
			m := newModel(crashSizes...)
			h := newHistory()
			if err := runWorkload(r, j, m, h, 150+r.IntN(150)); err != nil {
				t.Fatal(err)
			}
			var crashed *vfs.MemFS
			if seed%2 == 0 {
				crashed = mem.CrashClone()
			} else {
				crashed = mem.CrashCloneRandom(rand.New(rand.NewPCG(seed, 5)))
			}
			j.abandon()
			recoverAndCheck(t, cfg, crashed, h)
		})
	}
}

// recoverAndCheck opens the journal on what a crash left in fsys and checks
// the crash invariants against the history.
func recoverAndCheck(t *testing.T, cfg Config, fsys vfs.FS, h *history) *Journal {
	t.Helper()
	cfg.FS = fsys
	before := readImages(t, fsys, cfg)
	j := mustOpen(t, cfg)
	t.Cleanup(func() { j.Close() })
	checkRecovered(t, j, h, before, crashSizes)
	// The tree (rebuilt: the index is in memory here) agrees with the
	// images recovery left.
	waitTreeBuilt(t, j)
	checkTreeAgrees(t, j, readImages(t, fsys, cfg))
	return j
}

// TestProcessCrash: kill -9 keeps everything written; recovery must give the
// state after the very last acknowledged op.
func TestProcessCrash(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		r := rand.New(rand.NewPCG(seed, 78))
		mem := vfs.NewMemFS()
		cfg := crashConfig(t, mem, r)
		j := mustOpen(t, cfg)
		directHalf(r, j)
		m := newModel(crashSizes...)
		h := newHistory()
		if err := runWorkload(r, j, m, h, 200); err != nil {
			t.Fatal(err)
		}
		j.abandon()
		h.flushed = len(h.states) - 1
		checkModel(t, recoverAndCheck(t, cfg, mem, h), m)
	}
}

// TestFailureThenCrash fails each kind of filesystem call at several points,
// then cuts the power: the journal must either have refused the operation or
// kept it, and recovery must hold the invariants either way.
func TestFailureThenCrash(t *testing.T) {
	ops := []vfs.Op{vfs.OpWrite, vfs.OpSync, vfs.OpSyncDir, vfs.OpRename, vfs.OpRemove, vfs.OpTruncate, vfs.OpPunch}
	for _, op := range ops {
		for _, n := range []int{0, 3, 17, 60} {
			t.Run(fmt.Sprintf("%s-%d", op, n), func(t *testing.T) {
				r := rand.New(rand.NewPCG(uint64(op), uint64(n)))
				mem := vfs.NewMemFS()
				efs := vfs.NewErrorFS(mem)
				cfg := crashConfig(t, efs, r)
				cfg.SyncInterval = time.Millisecond
				cfg.CheckpointInterval = time.Millisecond
				j := mustOpen(t, cfg)
				directHalf(r, j)
				m := newModel(crashSizes...)
				h := newHistory()
				efs.InjectAfter(op, n, vfs.ErrInjected)
				err := runWorkload(r, j, m, h, 300)
				if err != nil && !errors.Is(err, vfs.ErrInjected) && !errors.Is(err, ErrFailed) {
					t.Fatalf("workload failed with %v", err)
				}
				if err != nil {
					// Once failed, it stays failed: nothing more is promised.
					if ferr := j.Flush(); ferr == nil {
						t.Fatal("Flush succeeded on a failed journal")
					}
				}
				crashed := mem.CrashClone()
				j.abandon()
				recoverAndCheck(t, cfg, crashed, h)
			})
		}
	}
}

// TestCorruptMiddleIsRefused: damage below the durable watermark is data
// loss; Open must refuse instead of silently dropping flushed writes.
func TestCorruptMiddleIsRefused(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 64<<10)
	j := mustOpen(t, cfg)
	for k := 0; k < 8; k++ {
		if _, err := j.Disk(0).WriteAt(make([]byte, BlockSize), int64(k)*BlockSize); err != nil {
			t.Fatal(err)
		}
		if err := j.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	j.abandon()
	names, _ := mem.ReadDir(cfg.Dir)
	var seg string
	for _, n := range names {
		if _, ok := parseSegmentName(n); ok {
			seg = cfg.Dir + "/" + n
		}
	}
	f, err := mem.OpenFile(seg, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Flip a byte in the second record's payload.
	pos := int64(segmentHeaderSize + HeaderSize + BlockSize + HeaderSize + 100)
	b := []byte{0}
	f.ReadAt(b, pos)
	b[0] ^= 0xff
	f.WriteAt(b, pos)
	f.Sync()
	f.Close()
	// Recovery that replays from the start verifies every payload.
	if err := mem.Remove(cfg.Dir + "/" + checkpointFile); err != nil {
		t.Fatal(err)
	}
	_, err = Open(cfg)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open over a corrupt middle: %v, want ErrCorrupt", err)
	}
}

// TestTornTailIsCut: a half-written last record is the normal end after a
// crash; Open cuts it and keeps everything before.
func TestTornTailIsCut(t *testing.T) {
	mem := vfs.NewMemFS()
	cfg := testConfig(t, mem, "/vm", 64<<10)
	j := mustOpen(t, cfg)
	m := newModel(64 << 10)
	r := rand.New(rand.NewPCG(1, 1))
	for k := 0; k < 4; k++ {
		p := fill(r, BlockSize)
		j.Disk(0).WriteAt(p, int64(k)*BlockSize)
		copy(m[0][k*BlockSize:], p)
	}
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	j.Disk(0).WriteAt(fill(r, BlockSize), 5*BlockSize) // the one to tear
	seg := j.mu.segs[len(j.mu.segs)-1]
	end := int64(j.mu.head - seg.base) // the file is preallocated beyond
	j.abandon()
	f, _ := mem.OpenFile(seg.name, 2, 0)
	f.Truncate(end - 1000)
	f.Close()
	j2 := mustOpen(t, cfg)
	defer j2.Close()
	checkModel(t, j2, m)
	// The journal goes on after the cut tail.
	p := fill(r, BlockSize)
	if _, err := j2.Disk(0).WriteAt(p, 9*BlockSize); err != nil {
		t.Fatal(err)
	}
	copy(m[0][9*BlockSize:], p)
	checkModel(t, j2, m)
}

// TestRecycledSegmentRestart: a recycled segment that the journal left for
// the next one keeps bytes of its earlier life past its last record. After a
// kill -9 that is its end, not a torn tail: Open must keep the segments after
// it (it once cut them, losing flushed writes), with plain and direct appends.
func TestRecycledSegmentRestart(t *testing.T) {
	for _, directMin := range []int{1 << 30, directAppendMin} {
		t.Run(fmt.Sprint("direct-min-", directMin), func(t *testing.T) {
			mem := vfs.NewMemFS()
			cfg := testConfig(t, mem, "/vm", 8<<20)
			cfg.Retain = false
			j := mustOpen(t, cfg)
			j.directMin = directMin
			m := newModel(8 << 20)
			r := rand.New(rand.NewPCG(1, 1))
			for k := 0; k < 60; k++ {
				p := fill(r, (1+r.IntN(4))<<20)
				off := int64(r.IntN(2)) << 22
				if _, err := j.Disk(0).WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(m[0][off:], p)
				if k%5 == 0 && k < 40 { // segments are removed and recycled
					if err := j.Flush(); err != nil {
						t.Fatal(err)
					}
					if err := j.writeBack(); err != nil {
						t.Fatal(err)
					}
					if err := j.checkpoint(true); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			if len(j.mu.segs) < 3 || j.mu.freeSeq == 0 {
				t.Fatalf("%d segments, %d recycled: the test needs several, recycled", len(j.mu.segs), j.mu.freeSeq)
			}
			crashed := mem.CrashClone()
			j.abandon()
			for _, fsys := range []vfs.FS{mem, crashed} {
				c := cfg
				c.FS = fsys
				j2 := mustOpen(t, c)
				checkModel(t, j2, m)
				j2.Close()
			}
		})
	}
}
