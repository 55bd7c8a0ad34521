package ship

import (
	"bytes"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// treeResyncEnv is a primary whose journal keeps a block tree, over two
// disks full of data (the second one's size not a multiple of 4 KiB), and
// a replica holding them as a restored backup would, except for the
// blocks damage changes there. It returns the bytes that differ.
func treeResyncEnv(t *testing.T, size0, size1 int64, damage func(img [][]byte)) (*env, int64) {
	t.Helper()
	e := newEnv(t, size0, size1)
	e.j.withTree(t)
	e.cfg.Initial = "existing"
	e.cfg.PieceSize = 1 << 20
	e.j.write(0, 0, random(int(size0)))
	e.j.write(1, 0, random(int(size1)))
	imgs := [][]byte{e.j.live(0), e.j.live(1)}
	damage(imgs)
	var differ int64
	for d, img := range imgs {
		live := e.j.live(d)
		for off := int64(0); off < int64(len(img)); off += blocktree.BlockSize {
			end := min(off+blocktree.BlockSize, int64(len(img)))
			if !bytes.Equal(img[off:end], live[off:end]) {
				differ += end - off
			}
		}
	}
	e.replicaCopy(imgs...)
	return e, differ
}

// resyncDone runs the shipper until the initial resync is done and a
// cycle after it applied, and checks the replica equals the primary.
func resyncDone(t *testing.T, e *env) *run {
	t.Helper()
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	return r
}

// After 1% of the blocks changed, a resync that compares block trees
// reads exactly the blocks that differ (zeroed ones included), sends them
// and leaves the replica equal, without one BLAKE3 sums request.
func TestTreeResyncReadsOnlyDifferingBlocks(t *testing.T) {
	const size0, size1 = 32 << 20, 1<<20 + 12388
	rng := rand.New(rand.NewPCG(1, 2))
	var zeroed int64
	e, differ := treeResyncEnv(t, size0, size1, func(img [][]byte) {
		blocks := int64(size0 / blocktree.BlockSize)
		for range blocks / 100 {
			b := 16 + rng.Int64N(blocks-16)
			if b == 1000 {
				continue
			}
			copy(img[0][b*blocktree.BlockSize:], random(blocktree.BlockSize))
		}
		// The last, short block of disk 1.
		img[1][size1-5] ^= 0xff
	})
	// Blocks the primary zeroed since: sent as zero ranges.
	for _, b := range []int64{3, 4, 1000} {
		e.j.write(0, b*blocktree.BlockSize, make([]byte, blocktree.BlockSize))
		zeroed += blocktree.BlockSize
	}
	differ += zeroed
	r := resyncDone(t, e)

	m := r.s.Status().Metrics
	if m.SyncReadBytesTotal != differ {
		t.Fatalf("the resync read %d bytes of the primary's disks, want the %d that differ", m.SyncReadBytesTotal, differ)
	}
	if total := int64(size0 + size1); m.SyncReadBytesTotal > total/10 {
		t.Fatalf("the resync read %d of %d bytes", m.SyncReadBytesTotal, total)
	}
	e.rep.mu.Lock()
	sent, zeros, kinds := e.rep.resyncBlocks, e.rep.zeroRanges[wire.KindResync], e.rep.sumsKinds
	e.rep.mu.Unlock()
	if sent != differ-zeroed {
		t.Fatalf("the resync sent %d data bytes for %d that differ (%d of them zeroed)", sent, differ, zeroed)
	}
	if zeros != 2 {
		t.Fatalf("%d zero ranges, want 2 (blocks 3-4 and 1000)", zeros)
	}
	if kinds[""] != 0 || kinds[wire.SumsLeaves] == 0 || kinds[wire.SumsBlocks] == 0 {
		t.Fatalf("sums requests by kind: %v", kinds)
	}
	if !strings.Contains(e.log.String(), "resync compares block trees") {
		t.Fatal("the path the resync took was not logged")
	}
}

// A replica that does not answer tree sums (an older vdrepl, or its tree
// being built) is compared by BLAKE3 sums: the older one after the first
// request for the rest of the sync, the busy one piece by piece. Either
// way the replica ends equal, and the log says why.
func TestTreeResyncFallsBackToSums(t *testing.T) {
	for _, tc := range []struct {
		mode, why string
		leaves    func(pieces int) int
	}{
		{"old", "does not answer block-tree sums", func(int) int { return 1 }},
		{"unavailable", "block tree cannot answer", func(p int) int { return p }},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			const size0, size1 = 4 << 20, 512<<10 + 100
			e, _ := treeResyncEnv(t, size0, size1, func(img [][]byte) {
				copy(img[0][1<<20:], random(8192))
				img[1][0] ^= 1
			})
			e.rep.treeSums = tc.mode
			r := resyncDone(t, e)
			e.rep.mu.Lock()
			kinds := e.rep.sumsKinds
			e.rep.mu.Unlock()
			pieces := int(wire.PieceCount(e.cfg.Disks, e.cfg.PieceSize))
			if kinds[wire.SumsLeaves] != tc.leaves(pieces) || kinds[wire.SumsBlocks] != 0 || kinds[""] != pieces {
				t.Fatalf("sums requests by kind: %v (%d pieces)", kinds, pieces)
			}
			if got := r.s.Status().Metrics.SyncReadBytesTotal; got != size0+size1 {
				t.Fatalf("the sums path read %d bytes, want the whole %d", got, size0+size1)
			}
			logs := e.log.String()
			if !strings.Contains(logs, "resync compares BLAKE3 sums") || !strings.Contains(logs, tc.why) {
				t.Fatalf("the fallback and why were not logged:\n%s", logs)
			}
		})
	}
}

// A journal without a tree, or with one not yet built, resyncs by sums.
func TestTreeResyncNeedsACompletePrimaryTree(t *testing.T) {
	e, _ := treeResyncEnv(t, 1<<20, 64<<10, func(img [][]byte) { img[0][0] ^= 1 })
	if err := e.j.tree.Reset(1); err != nil {
		t.Fatal(err)
	}
	resyncDone(t, e)
	e.rep.mu.Lock()
	kinds := e.rep.sumsKinds
	e.rep.mu.Unlock()
	if kinds[wire.SumsLeaves] != 0 || kinds[""] == 0 {
		t.Fatalf("sums requests by kind: %v", kinds)
	}
	if !strings.Contains(e.log.String(), "block tree of disk disk1 is incomplete") {
		t.Fatal("why the resync compared sums was not logged")
	}
}

// A hash either side does not know is a difference: the block is sent,
// though its data is the same on both sides.
func TestTreeResyncSendsUnknownBlocks(t *testing.T) {
	e, differ := treeResyncEnv(t, 2<<20, 64<<10, func([][]byte) {})
	if differ != 0 {
		t.Fatal("the replica differs")
	}
	// The replica knows neither leaf 0 nor, of its blocks, block 5.
	e.rep.treeUnknown = func(kind string, disk int, off int64) bool {
		return disk == 0 && (kind == wire.SumsLeaves && off == 0 || kind == wire.SumsBlocks && off == 5*blocktree.BlockSize)
	}
	// The primary's tree forgets block 100 once the resync looked at it
	// (a write that covered the block in part, racing the resync).
	e.j.onWrittenBack = func() {
		b := e.j.tree.Batch()
		b.Invalidate(0, 100*blocktree.BlockSize, 1)
		if err := b.Commit(); err != nil {
			t.Error(err)
		}
	}
	r := resyncDone(t, e)
	e.rep.mu.Lock()
	sent := e.rep.resyncBlocks
	e.rep.mu.Unlock()
	if want := int64(2 * blocktree.BlockSize); sent != want || r.s.Status().Metrics.SyncReadBytesTotal != want {
		t.Fatalf("sent %d bytes and read %d, want blocks 5 and 100 (%d bytes)", sent, r.s.Status().Metrics.SyncReadBytesTotal, want)
	}
}

// Each cycle's header carries the roots of the primary's tree at its
// barrier, which equal those of a tree built from the images at that
// barrier; the replica finds them equal and says it verified the cycle.
// When the write-back does not reach the barrier in time, the cycle ships
// without roots, counted as unverified.
func TestCycleHeadersCarryRoots(t *testing.T) {
	e := newEnv(t, 1<<20, 64<<10+512)
	e.j.withTree(t)
	e.rootsWait = 50 * time.Millisecond
	e.j.write(0, 0, random(1<<20))
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	e.j.write(1, 8192, random(8192))
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	hs := e.rep.cycleHeaders()
	h := hs[len(hs)-1]
	fresh, err := memTree(t, [][]byte{e.j.barrier(c, 0), e.j.barrier(c, 1)})
	if err != nil {
		t.Fatal(err)
	}
	want := fresh.Roots()
	if h.Cycle != c || len(h.Roots) != 2 || h.Roots[0] != want[0].String() || h.Roots[1] != want[1].String() {
		t.Fatalf("cycle %d header roots %v, want %v", h.Cycle, h.Roots, want)
	}
	waitFor(t, r.s, "the replica's verified cycle", func() bool { return r.s.Status().Verified == c })
	if n := r.s.Status().Metrics.UnverifiedCyclesTotal; n != 0 {
		t.Fatalf("%d cycles unverified", n)
	}

	e.j.mu.Lock()
	e.j.holdWriteBack = true
	e.j.mu.Unlock()
	e.j.write(0, 0, random(4096))
	c2, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c2)
	hs = e.rep.cycleHeaders()
	if h := hs[len(hs)-1]; h.Cycle != c2 || h.Roots != nil {
		t.Fatalf("cycle %d shipped with roots %v while the write-back was held", h.Cycle, h.Roots)
	}
	st := r.s.Status()
	if st.Metrics.UnverifiedCyclesTotal != 1 || st.Verified != c {
		t.Fatalf("unverified %d, verified at %d; want 1 and %d", st.Metrics.UnverifiedCyclesTotal, st.Verified, c)
	}
	if !strings.Contains(e.log.String(), "cycles ship without block-tree roots") {
		t.Fatal("unverified cycles were not logged")
	}
}

// A replica whose images went wrong finds its roots different from the
// primary's after the next cycle and says so: the shipper starts a resync
// naming the cycle and the disk, shows the divergence in its status,
// repairs only the damaged blocks (logging them) and the replica ends
// equal.
func TestDivergenceStartsATreeResync(t *testing.T) {
	e := newEnv(t, 2<<20, 256<<10)
	e.j.withTree(t)
	e.j.write(0, 0, random(2<<20))
	e.j.write(1, 0, random(256<<10))
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	// The replica's disk1 goes wrong in two blocks, and its tree with it
	// (as when it applied data that was not the primary's).
	e.rep.mu.Lock()
	vm := e.rep.vms["vm1"]
	vm.images[1][40960] ^= 0xff
	vm.images[1][200000] ^= 0xff
	vm.tree = nil
	e.rep.mu.Unlock()

	var hold atomic.Bool
	hold.Store(true)
	e.rep.mu.Lock()
	e.rep.fail = func(r *http.Request) (int, string) {
		if hold.Load() && strings.HasSuffix(r.URL.Path, "/sync") {
			return http.StatusServiceUnavailable, wire.CodeBusy
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	e.j.write(0, 0, random(4096))
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	want := "the replica's disks disk1 differ from the primary's at cycle " + strconv.FormatUint(c, 10) + " (block-tree roots)"
	waitFor(t, r.s, "the divergence in the status", func() bool {
		st := r.s.Status()
		return st.State == StateResyncing && strings.Contains(st.Reason, want) && st.Diverged != nil && st.Diverged.Cycle == c
	})
	if st := r.s.Status(); st.Health != HealthWarning || st.Diverged.Disks[0] != "disk1" {
		t.Fatalf("status of a diverged VM: %+v", st)
	}
	read := r.s.Status().Metrics.SyncReadBytesTotal
	hold.Store(false)
	c2, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c2)
	st := r.s.Status()
	if st.Diverged != nil || st.Verified != c2 {
		t.Fatalf("after the repair: diverged %+v, verified %d (want %d)", st.Diverged, st.Verified, c2)
	}
	if got := st.Metrics.SyncReadBytesTotal - read; got != 2*blocktree.BlockSize {
		t.Fatalf("the repair read %d bytes, want the 2 damaged blocks", got)
	}
	logs := e.log.String()
	if n := strings.Count(logs, "replica diverged from the primary"); n != 1 {
		t.Fatalf("the divergence was logged %d times", n)
	}
	if !strings.Contains(logs, "resync repaired the replica's ranges") || !strings.Contains(logs, "disk1 [40960,45056) disk1 [196608,200704)") {
		t.Fatalf("the repaired ranges were not logged:\n%s", logs)
	}
}

// What an answer's Diverged and Verified do to the state: a new
// divergence makes a resync due at once, unless a sync is under way or the
// last resync was started for it; an answer without one clears the
// status; Verified never goes back.
func TestNoteReplica(t *testing.T) {
	at := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	d := &wire.Divergence{Cycle: 7, Disks: []string{"disk0"}, At: at}
	for _, tc := range []struct {
		name   string
		before persisted
		rep    wire.Replica
		resync bool // a resync for d is due after
		div    bool // Status.Diverged set after
		verif  uint64
	}{
		{"new divergence", persisted{Verified: 5}, wire.Replica{Diverged: d, Verified: 6}, true, true, 6},
		{"sync under way", persisted{Sync: &syncRecord{Gen: 1}}, wire.Replica{Diverged: d}, false, true, 0},
		{"repaired already", persisted{Repaired: d}, wire.Replica{Diverged: d}, false, true, 0},
		{"another after a repair", persisted{Repaired: &wire.Divergence{Cycle: 3, At: at}}, wire.Replica{Diverged: d}, true, true, 0},
		{"cleared", persisted{Diverged: d, Verified: 9}, wire.Replica{Verified: 2}, false, false, 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 1<<20)
			s, err := New(e.cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			s.st = tc.before
			if err := s.noteReplica(tc.rep); err != nil {
				t.Fatal(err)
			}
			st := s.Status()
			due := s.st.Resync != nil && sameDivergence(s.st.Resync.Divergence, d) && s.st.Resync.Manual &&
				s.st.Resync.Reason == "the replica's disks disk0 differ from the primary's at cycle 7 (block-tree roots)"
			if due != tc.resync || (st.Diverged != nil) != tc.div || st.Verified != tc.verif {
				t.Fatalf("resync %+v, diverged %+v, verified %d", s.st.Resync, st.Diverged, st.Verified)
			}
		})
	}
}
