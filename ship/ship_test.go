package ship

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// cycleOf parses an upload id "c<N>"; ok is false for sync pieces.
func cycleOf(id string) (uint64, bool) {
	if !strings.HasPrefix(id, "c") {
		return 0, false
	}
	n, err := strconv.ParseUint(id[1:], 10, 64)
	return n, err == nil
}

// pieceOf parses an upload id "s<gen>-<piece>".
func pieceOf(id string) (gen uint64, piece int64, ok bool) {
	g, p, found := strings.Cut(strings.TrimPrefix(id, "s"), "-")
	if !strings.HasPrefix(id, "s") || !found {
		return 0, 0, false
	}
	gen, err1 := strconv.ParseUint(g, 10, 64)
	piece, err2 := strconv.ParseInt(p, 10, 64)
	return gen, piece, err1 == nil && err2 == nil
}

func TestInitialCopyThenCyclesInOrder(t *testing.T) {
	e := newEnv(t, 1<<20, 512<<10)
	e.j.write(0, 0, random(64<<10))
	e.j.write(1, 40<<10, random(8<<10))
	e.j.onRelease = func(c uint64) {
		if got := e.rep.applied("vm1"); got < c {
			t.Errorf("cycle %d released while the replica has applied %d", c, got)
		}
	}
	// A write while the initial copy runs lands in a cycle after the
	// barrier and must reach the replica too.
	var once sync.Once
	e.rep.afterCommit = func(id string) {
		if _, p, ok := pieceOf(id); ok && p == 0 {
			once.Do(func() { e.j.write(0, 4096, random(16<<10)) })
		}
	}
	r := e.start(e.cfg)
	waitReplicating(t, r.s)

	var shipped []uint64
	for i := range 6 {
		e.j.write(i%2, int64(i)*8192, random(12<<10))
		if i == 3 {
			e.j.zero(0, 512<<10, 64<<10, journal.KindTrim)
			e.j.zero(1, 0, 4096, journal.KindZeroAlloc)
		}
		c, err := r.s.Sync(syncCtx(t), false)
		if err != nil {
			t.Fatal(err)
		}
		e.checkImages(c)
		shipped = append(shipped, c)
	}

	e.rep.mu.Lock()
	commits := slices.Clone(e.rep.commits)
	chunkMax := e.rep.chunkMax
	e.rep.mu.Unlock()
	var cycles []uint64
	for i, id := range commits {
		c, ok := cycleOf(id)
		if !ok {
			if len(cycles) > 0 {
				t.Fatalf("sync piece %s committed after cycles %v", id, cycles)
			}
			continue
		}
		if len(cycles) > 0 && c != cycles[len(cycles)-1]+1 {
			t.Fatalf("commit %d: cycle %d after %d (commits %v)", i, c, cycles[len(cycles)-1], commits)
		}
		cycles = append(cycles, c)
	}
	if cycles[len(cycles)-1] != shipped[len(shipped)-1] {
		t.Fatalf("last committed cycle %d, Sync returned %d", cycles[len(cycles)-1], shipped[len(shipped)-1])
	}
	e.j.mu.Lock()
	released := slices.Clone(e.j.released)
	e.j.mu.Unlock()
	if !slices.Equal(released, cycles) {
		t.Fatalf("released %v, committed %v", released, cycles)
	}
	if chunkMax > int(e.chunk) || chunkMax > wire.MaxChunk {
		t.Fatalf("a chunk of %d bytes (limit %d)", chunkMax, e.chunk)
	}
	st := r.s.Status()
	if st.State != StateReplicating || st.Health != HealthNormal || st.LastApplied != shipped[len(shipped)-1] {
		t.Fatalf("status %+v", st)
	}
	if st.Metrics.CyclesShippedTotal != int64(len(cycles)) || st.Metrics.MaxCycleWireBytes <= 0 {
		t.Fatalf("metrics %+v", st.Metrics)
	}
}

func TestCutConnectionResumesFromReplicaOffset(t *testing.T) {
	e := newEnv(t, 4<<20)
	e.cfg.Compress = false
	e.chunk = 128 << 10
	r := e.start(e.cfg)
	waitReplicating(t, r.s)

	e.j.write(0, 0, random(1<<20))
	// Cut in the middle of the fourth chunk of the cycle's upload.
	e.px.arm(3*e.chunk+e.chunk/2, false)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	if e.px.trips() != 1 {
		t.Fatalf("the proxy cut %d times", e.px.trips())
	}
	e.checkImages(c)
	id := wire.CycleUploadID(c)
	e.rep.mu.Lock()
	sent, size := e.rep.uploadBytes[id], e.rep.streamSize[id]
	e.rep.mu.Unlock()
	// Everything once, plus at most the chunks in flight when it was cut.
	if sent < size || sent >= size+inFlight*e.chunk {
		t.Fatalf("replica received %d bytes for a %d-byte stream in %d-byte chunks", sent, size, e.chunk)
	}
	if st := r.s.Status(); st.Metrics.RetriesTotal != 1 || st.LastError == "" {
		t.Fatalf("status after one cut: %+v", st)
	}
}

func TestCorruptChunkIsRejectedAndResent(t *testing.T) {
	e := newEnv(t, 2<<20)
	e.cfg.Compress = false
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	// Ship the cycle sealed after the initial copy first: the damage is
	// meant for the next cycle.
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}

	e.j.write(0, 64<<10, random(512<<10))
	e.rep.mu.Lock()
	e.rep.corruptChunks = 1
	e.rep.mu.Unlock()
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	id := wire.CycleUploadID(c)
	e.rep.mu.Lock()
	seen, sent, size := e.rep.corruptSeen, e.rep.uploadBytes[id], e.rep.streamSize[id]
	e.rep.mu.Unlock()
	if seen != 1 {
		t.Fatalf("replica rejected %d chunks", seen)
	}
	if sent <= size || sent > size+inFlight*e.chunk {
		t.Fatalf("replica received %d bytes for a %d-byte stream: the damaged chunk and the one in flight after it alone should be resent", sent, size)
	}
}

func TestByteFlippedBelowTLSIsRetried(t *testing.T) {
	e := newEnv(t, 2<<20)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)

	e.j.write(0, 0, random(256<<10))
	e.px.arm(100<<10, true)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	if e.px.trips() != 1 {
		t.Fatalf("proxy flipped %d bytes", e.px.trips())
	}
	e.checkImages(c)
}

func TestForbiddenStopsUntilResume(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.rep.allow = map[string]bool{}
	var mu sync.Mutex
	var errs []string // reasons of each change into the error state
	e.cfg.Events.StateChanged = func(state, reason string) {
		if state == StateError {
			mu.Lock()
			errs = append(errs, reason)
			mu.Unlock()
		}
	}
	r := e.start(e.cfg)
	waitFor(t, r.s, "critical", func() bool { return r.s.Status().Health == HealthCritical })
	st := r.s.Status()
	if st.State != StateError || !st.NextRetry.IsZero() || !strings.Contains(st.Reason, "forbidden") {
		t.Fatalf("status after 403: %+v", st)
	}
	if _, err := r.s.Sync(syncCtx(t), false); !errors.Is(err, ErrStopped) {
		t.Fatalf("Sync while stopped: %v", err)
	}
	var re *wire.Error
	r.s.mu.Lock()
	stopped := r.s.stopped
	r.s.mu.Unlock()
	if !errors.As(stopped, &re) || re.Code != wire.CodeForbidden {
		t.Fatalf("stopped by %v", stopped)
	}
	// The change is reported just after waiters wake: wait for it.
	waitFor(t, r.s, "the change into the error state", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(errs) > 0
	})
	mu.Lock()
	got := slices.Clone(errs)
	mu.Unlock()
	if len(got) != 1 || !strings.Contains(got[0], "forbidden") {
		t.Fatalf("changes into the error state %q, want one, for the 403", got)
	}

	e.rep.mu.Lock()
	e.rep.allow["primary"] = true
	e.rep.mu.Unlock()
	if err := r.s.Resume(); err != nil {
		t.Fatal(err)
	}
	waitReplicating(t, r.s)
	if st := r.s.Status(); st.Health != HealthNormal {
		t.Fatalf("after Resume: %+v", st)
	}
}

func TestFullReplicaBacksOffThenRecovers(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.cfg.RetryScale = 0.01 // 20ms, 40ms, ... less up to a fifth of jitter
	var mu sync.Mutex
	var failedAt []time.Time
	var events []string
	e.cfg.Events.StateChanged = func(state, reason string) {
		mu.Lock()
		events = append(events, state+": "+reason)
		mu.Unlock()
	}
	r := e.start(e.cfg)
	waitReplicating(t, r.s)

	e.rep.mu.Lock()
	e.rep.fail = func(req *http.Request) (int, string) {
		if req.Method != http.MethodPost || !strings.HasSuffix(req.URL.Path, "/commit") {
			return 0, ""
		}
		mu.Lock()
		defer mu.Unlock()
		if len(failedAt) < 3 {
			failedAt = append(failedAt, time.Now())
			return http.StatusInsufficientStorage, wire.CodeFull
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	e.j.write(0, 0, random(32<<10))
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	// Copies: failing with mu held would deadlock with the shipper's events.
	mu.Lock()
	failed, evs := slices.Clone(failedAt), slices.Clone(events)
	mu.Unlock()
	if len(failed) != 3 {
		t.Fatalf("%d failed commits", len(failed))
	}
	for i := 1; i < len(failed); i++ {
		if d, min := failed[i].Sub(failed[i-1]), jitter(backoff(i, e.cfg.RetryScale), 1); d < min {
			t.Fatalf("retry %d after %v, back-off is %v", i, d, min)
		}
	}
	st := r.s.Status()
	if st.Metrics.RetriesTotal != 3 || st.Health != HealthNormal || !st.NextRetry.IsZero() {
		t.Fatalf("status after recovery: %+v", st)
	}
	r.s.mu.Lock()
	attempt := r.s.attempt
	r.s.mu.Unlock()
	if attempt != 0 {
		t.Fatalf("back-off not reset: attempt %d", attempt)
	}
	if !slices.ContainsFunc(evs, func(s string) bool { return strings.Contains(s, "retrying after") && strings.Contains(s, "full") }) {
		t.Fatalf("no retry in the state events: %q", evs)
	}
}

func TestInitialCopyOfSparseDiskSendsZeroRanges(t *testing.T) {
	e := newEnv(t, 32<<20, 8<<20)
	e.cfg.PieceSize = 4 << 20
	e.cfg.Compress = false
	e.j.write(0, 0, random(4096))
	e.j.write(0, 17<<20, random(4096))
	e.j.write(1, 8<<20-4096, random(4096))
	r := e.start(e.cfg)
	waitReplicating(t, r.s)

	e.rep.mu.Lock()
	data, ranges, wireBytes := e.rep.dataBytes[wire.KindFull], e.rep.zeroRanges[wire.KindFull], e.rep.syncBytes
	e.rep.mu.Unlock()
	if data != 3*4096 {
		t.Fatalf("initial copy sent %d data bytes for 3 written blocks", data)
	}
	pieces := wire.PieceCount(e.cfg.Disks, e.cfg.PieceSize)
	if ranges < pieces || ranges > pieces+3 {
		t.Fatalf("%d zero ranges over %d pieces", ranges, pieces)
	}
	// Data plus a stream header and a few frames per piece.
	if limit := int64(3*4096) + pieces*1024; wireBytes > limit {
		t.Fatalf("%d bytes on the wire for a 40 MiB disk pair holding 12 KiB (limit %d)", wireBytes, limit)
	}
	for d := range e.cfg.Disks {
		if string(e.rep.image("vm1", d)) != string(e.j.live(d)) {
			t.Fatalf("disk %d differs after the initial copy", d)
		}
	}
}

// replicaCopy puts the VM on the fake replica with the given images, as a
// restored backup would.
func (e *env) replicaCopy(images ...[]byte) {
	e.rep.mu.Lock()
	defer e.rep.mu.Unlock()
	e.rep.vms[e.cfg.VM] = &fakeVM{primary: "primary", disks: e.cfg.Disks, images: images, state: "new", staged: map[string][]byte{}}
}

func TestResyncSendsOnlyDifferingBlocksAndResumesAfterRestart(t *testing.T) {
	const size = 2 << 20
	e := newEnv(t, size, size/2)
	e.cfg.Initial = "existing"
	e.cfg.BlockSize = 4096
	e.cfg.PieceSize = 256 << 10
	e.j.write(0, 0, random(size))
	e.j.write(1, 0, random(size/2))
	img0, img1 := e.j.live(0), e.j.live(1)
	// The replica differs in 10 blocks it holds other data in, and in 3
	// blocks the primary has zeroed since.
	changed := []int64{0, 7, 64, 65, 100, 300, 301, 302, 450, 511}
	for _, b := range changed {
		copy(img0[b*4096:], random(4096))
	}
	copy(img1[200*4096:], random(4096))
	e.j.write(0, 128*4096, make([]byte, 4096))
	e.j.write(0, 130*4096, make([]byte, 4096))
	e.j.write(1, 10*4096, make([]byte, 4096))
	e.replicaCopy(img0, img1)

	// Stop the primary right after the third piece is committed.
	stopped := make(chan struct{})
	var once sync.Once
	var r *run
	e.rep.afterCommit = func(id string) {
		if _, p, ok := pieceOf(id); ok && p == 2 {
			once.Do(func() { r.cancel(); close(stopped) })
		}
	}
	r = e.start(e.cfg)
	<-stopped
	r.stop()
	e.rep.mu.Lock()
	e.rep.afterCommit = nil
	before := len(e.rep.commits)
	e.rep.mu.Unlock()
	pieces := wire.PieceCount(e.cfg.Disks, e.cfg.PieceSize)
	if before < 3 || int64(before) >= pieces {
		t.Fatalf("%d pieces committed before the restart (of %d)", before, pieces)
	}

	r2 := e.start(e.cfg)
	waitReplicating(t, r2.s)
	// The replica holds the pieces until the cycle sealed after the last
	// one is applied: Sync waits for a cycle after it.
	c, err := r2.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	e.rep.mu.Lock()
	var commits []string
	for _, id := range e.rep.commits {
		if _, ok := cycleOf(id); !ok {
			commits = append(commits, id)
		}
	}
	resent := e.rep.resyncBlocks
	zeros := e.rep.zeroRanges[wire.KindResync]
	e.rep.mu.Unlock()
	seen := map[string]bool{}
	gen0, _, _ := pieceOf(commits[0])
	for _, id := range commits {
		if seen[id] {
			t.Fatalf("piece %s committed twice: %v", id, commits)
		}
		if gen, _, ok := pieceOf(id); !ok || gen != gen0 {
			t.Fatalf("commit %s after %s: the restart began a new generation", id, commits[0])
		}
		seen[id] = true
	}
	if int64(len(commits)) != pieces {
		t.Fatalf("%d pieces committed, want %d", len(commits), pieces)
	}
	if want := int64(len(changed)+1) * 4096; resent != want {
		t.Fatalf("resync sent %d data bytes, want %d (%d differing blocks)", resent, want, len(changed)+1)
	}
	if zeros != 3 {
		t.Fatalf("resync sent %d zero ranges, want 3", zeros)
	}
}

func TestOfflineInitialCopy(t *testing.T) {
	e := newEnv(t, 1<<20, 256<<10)
	dir := t.TempDir()
	e.cfg.Initial = "offline:" + dir
	e.j.write(0, 8192, random(100<<10))
	e.j.write(1, 0, random(4096))
	r := e.start(e.cfg)
	waitFor(t, r.s, "waiting for the import", func() bool {
		return strings.Contains(r.s.Status().Reason, "import the offline copy")
	})
	// Writes after the barrier ship as cycles once the replica imported.
	e.j.write(0, 0, random(4096))
	if err := e.rep.importOffline(dir); err != nil {
		t.Fatal(err)
	}
	waitReplicating(t, r.s)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	e.rep.mu.Lock()
	online := e.rep.syncBytes
	e.rep.mu.Unlock()
	if online != 0 {
		t.Fatalf("%d bytes of sync pieces went over the network", online)
	}
}

// startOutsideWindow starts a shipper, its initial copy done, whose clock
// stands at noon outside its resync window (18:30-06:00): an automatic
// resync waits for it.
func startOutsideWindow(t *testing.T) (*env, *run) {
	t.Helper()
	e := newEnv(t, 1<<20)
	clock := newClock(time.Date(2026, 3, 2, 12, 0, 0, 0, time.Local))
	e.cfg.Now = clock.Now
	e.j.now = clock.Now
	e.cfg.ResyncWindow = "18:30-06:00"
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	return e, r
}

// resyncNowThenSync starts the resync at once and checks a cycle synced
// after it leaves the replica equal to the primary.
func resyncNowThenSync(t *testing.T, e *env, r *run) {
	t.Helper()
	if err := r.s.Resync(); err != nil {
		t.Fatal(err)
	}
	waitReplicating(t, r.s)
	e.j.write(0, 4096, random(4096))
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
}

func TestGapWaitsForWindowThenManualResync(t *testing.T) {
	e, r := startOutsideWindow(t)
	e.j.write(0, 0, random(8192))
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}

	// The replica goes back to an old state (restored from a backup): the
	// next cycle does not follow what it has, and the journal no longer
	// holds the cycles in between.
	e.rep.mu.Lock()
	e.rep.vms["vm1"].applied = 0
	e.rep.mu.Unlock()
	e.j.write(0, 8192, random(4096))
	if _, err := r.s.Sync(syncCtx(t), false); !errors.Is(err, ErrResyncRequired) {
		t.Fatalf("Sync with a replica behind: %v", err)
	}
	st := r.s.Status()
	want := time.Date(2026, 3, 2, 18, 30, 0, 0, time.Local)
	if st.State != StateResyncRequired || st.Health != HealthWarning || !st.NextResync.Equal(want) {
		t.Fatalf("status: %+v", st)
	}
	resyncNowThenSync(t, e, r)
}

// TestDamagedJournalIsNeverShipped: a cycle whose journaled data does not
// verify is not shipped (nor any cycle after it): the VM is marked resync
// required with the damage named in the status, and the resync repairs the
// replica from the image.
func TestDamagedJournalIsNeverShipped(t *testing.T) {
	e, r := startOutsideWindow(t)
	e.j.write(0, 64<<10, random(64<<10))
	e.j.mu.Lock()
	e.j.damage = func(x journal.Extent) error {
		if x.Offset != 64<<10 {
			return nil
		}
		return &journal.DamageError{Disk: 0, DiskName: "disk0", Off: 64 << 10, Len: 64 << 10, LSN: 0x1234,
			Segment: "/j/0000000000000000.seg", Why: "payload checksum 0x1, want 0x2"}
	}
	e.j.mu.Unlock()
	if _, err := r.s.Sync(syncCtx(t), false); !errors.Is(err, ErrResyncRequired) {
		t.Fatalf("Sync of a damaged cycle: %v, want ErrResyncRequired (outside the resync window)", err)
	}
	st := r.s.Status()
	if st.State != StateResyncRequired || st.Health != HealthWarning ||
		!strings.Contains(st.Reason, "LSN 0x1234 in segment /j/0000000000000000.seg damaged: disk disk0 bytes [65536,131072)") {
		t.Fatalf("status does not name the damage: %+v", st)
	}
	e.rep.mu.Lock()
	commits := slices.Clone(e.rep.commits)
	e.rep.mu.Unlock()
	for _, id := range commits {
		if c, ok := cycleOf(id); ok && c > st.LastApplied {
			t.Fatalf("cycle %d was committed, past the last applied %d before the damage: %v", c, st.LastApplied, commits)
		}
	}
	if got := e.rep.applied("vm1"); got != st.LastApplied {
		t.Fatalf("the replica applied cycle %d, the primary says %d", got, st.LastApplied)
	}
	resyncNowThenSync(t, e, r)
}

func TestJournalOverflowResyncsInWindow(t *testing.T) {
	e := newEnv(t, 1<<20)
	clock := newClock(time.Date(2026, 3, 2, 12, 0, 0, 0, time.Local))
	e.cfg.Now = clock.Now
	e.cfg.ResyncWindow = "18:30-06:00"
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	r.s.Pause()
	e.j.overflow(t)
	r.s.Resume()
	waitState(t, r.s, StateResyncRequired)
	clock.Set(time.Date(2026, 3, 2, 19, 0, 0, 0, time.Local))
	r.s.signal()
	waitReplicating(t, r.s)
	waitState(t, r.s, StateReplicating)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
}

// TestSyncWaitsForHeldResyncApplied: Sync seals a cycle, the journal then
// passes its cap (the cycle is lost), and a resync replaces it. The replica
// holds the resync (apply/doc.go) until the cycle sealed after its last
// piece is applied, and answers the finish with its images still at their
// last consistent point: Applied must not move to the base on that answer,
// and Sync must not say its cycle is applied until the replica says so.
func TestSyncWaitsForHeldResyncApplied(t *testing.T) {
	e := newEnv(t, 1<<20)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	c0, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	// The replica refuses everything, so the cycle Sync seals stays in
	// the journal; later only cycle commits.
	refuse := func(match func(*http.Request) bool) {
		e.rep.mu.Lock()
		e.rep.fail = func(r *http.Request) (int, string) {
			if match(r) {
				return http.StatusServiceUnavailable, wire.CodeBusy
			}
			return 0, ""
		}
		e.rep.mu.Unlock()
	}
	refuse(func(*http.Request) bool { return true })
	e.j.write(0, 0, random(8192))
	type result struct {
		c   uint64
		err error
	}
	res := make(chan result, 1)
	ctx := syncCtx(t)
	go func() {
		c, err := r.s.Sync(ctx, false)
		res <- result{c, err}
	}()
	waitFor(t, r.s, "Sync to seal its cycle", func() bool { return len(e.j.Cycles()) > 0 })
	e.j.overflow(t)
	refuse(func(r *http.Request) bool {
		return r.Method == http.MethodPost && strings.Contains(r.URL.Path, "/uploads/c") && strings.HasSuffix(r.URL.Path, "/commit")
	})
	var held bool
	waitFor(t, r.s, "the replica to hold the resync and the shipper to record its end", func() bool {
		e.rep.mu.Lock()
		held = e.rep.vms["vm1"].held != nil
		e.rep.mu.Unlock()
		r.s.mu.Lock()
		defer r.s.mu.Unlock()
		return held && r.s.st.Sync == nil // finishSync ran
	})
	if st, got := r.s.Status(), e.rep.applied("vm1"); st.LastApplied != got {
		t.Fatalf("the shipper says cycle %d is applied; the replica, holding the resync, answered %d", st.LastApplied, got)
	}
	select {
	case rs := <-res:
		t.Fatalf("Sync returned cycle %d (%v) while the replica holds the resync at cycle %d", rs.c, rs.err, e.rep.applied("vm1"))
	default:
	}
	refuse(func(*http.Request) bool { return false })
	rs := <-res
	if rs.err != nil {
		t.Fatal(rs.err)
	}
	if rs.c <= c0 {
		t.Fatalf("Sync returned cycle %d, not one after %d", rs.c, c0)
	}
	if got := e.rep.applied("vm1"); got < rs.c {
		t.Fatalf("Sync returned cycle %d; the replica applied %d", rs.c, got)
	}
	for d := range e.cfg.Disks {
		if got, want := e.rep.image("vm1", d), e.j.live(d); string(got) != string(want) {
			t.Fatalf("disk %d of the replica differs from the primary after Sync (first difference at %d)", d, firstDiff(got, want))
		}
	}
}

// TestHeldCycleCommitIsNotApplied: a cycle sealed while a resync reads its
// pieces lies before the resync's ConsistentAt. The replica answers its
// commit once it is staged, with its images still at their last
// consistent point: the cycle is released, but not recorded as applied.
func TestHeldCycleCommitIsNotApplied(t *testing.T) {
	e := newEnv(t, 1<<20)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	pre := e.rep.applied("vm1")
	r.s.mu.Lock()
	shipped := r.s.st.Counters.Shipped
	r.s.mu.Unlock()
	e.j.write(0, 0, random(64<<10))

	// A cycle slips in before piece 1 is committed (so before the cycle
	// sealed after the last piece); every other cycle commit is refused.
	var mu sync.Mutex
	var slipped uint64
	e.rep.mu.Lock()
	e.rep.fail = func(r *http.Request) (int, string) {
		id, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/v1/replicas/vm1/uploads/"), "/commit")
		if r.Method != http.MethodPost || !ok {
			return 0, ""
		}
		mu.Lock()
		defer mu.Unlock()
		if _, p, ok := pieceOf(id); ok && p == 1 && slipped == 0 {
			info, err := e.j.Seal(0)
			if err != nil {
				t.Error(err)
			}
			e.j.write(0, 128<<10, random(8192))
			slipped = info.Cycle
		}
		if c, ok := cycleOf(id); ok && c != slipped {
			return http.StatusServiceUnavailable, wire.CodeBusy
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	if err := r.s.Resync(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, r.s, "the commit of the cycle sealed during the resync to be recorded", func() bool {
		r.s.mu.Lock()
		defer r.s.mu.Unlock()
		return r.s.st.Counters.Shipped > shipped
	})
	mu.Lock()
	c := slipped
	mu.Unlock()
	if got := r.s.Status().LastApplied; got != pre || e.rep.applied("vm1") != pre {
		t.Fatalf("cycle %d was staged in the held resync, the replica is at %d; the shipper says %d is applied", c, e.rep.applied("vm1"), got)
	}
	e.rep.mu.Lock()
	e.rep.fail = nil
	e.rep.mu.Unlock()
	last, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.rep.applied("vm1"); got < last {
		t.Fatalf("Sync returned cycle %d; the replica applied %d", last, got)
	}
	e.checkImages(last)
}

func TestPauseIsPersisted(t *testing.T) {
	e := newEnv(t, 1<<20)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if err := r.s.Pause(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.s.Sync(syncCtx(t), false); !errors.Is(err, ErrPaused) {
		t.Fatalf("Sync while paused: %v", err)
	}
	r.stop()
	r2 := e.start(e.cfg)
	if st := r2.s.Status(); st.State != StatePaused || st.Health != HealthWarning {
		t.Fatalf("after restart: %+v, want paused with health warning", st)
	}
	if err := r2.s.Resume(); err != nil {
		t.Fatal(err)
	}
	e.j.write(0, 0, random(4096))
	c, err := r2.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
}

func TestCertificateFailuresStop(t *testing.T) {
	for _, tc := range []struct {
		name string
		tls  func(e *env) *tls.Config
	}{
		{"replica of an unknown CA", func(e *env) *tls.Config {
			other := newEnv(t, 4096)
			return other.primary.ClientConfig("127.0.0.1")
		}},
		{"our certificate refused", func(e *env) *tls.Config {
			other := newEnv(t, 4096)
			c := other.primary.ClientConfig("127.0.0.1")
			c.RootCAs = e.primary.ClientConfig("127.0.0.1").RootCAs
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 1<<20)
			e.cfg.TLS = tc.tls(e)
			r := e.start(e.cfg)
			waitFor(t, r.s, "critical", func() bool { return r.s.Status().Health == HealthCritical })
			if st := r.s.Status(); st.State != StateError || !st.NextRetry.IsZero() {
				t.Fatalf("status: %+v", st)
			}
		})
	}
}

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestStatusLagAndMissedCycles(t *testing.T) {
	e := newEnv(t, 1<<20)
	t0 := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	clock := newClock(t0)
	e.cfg.Now = clock.Now
	e.j.now = clock.Now
	e.cfg.Frequency = time.Minute
	e.j.cap = 1 << 20
	s, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// As after an initial copy whose barrier was sealed 30s ago.
	s.st.InitialDone = true
	s.st.Applied, s.st.AppliedSealed = 0, t0.Add(-30*time.Second)

	e.j.write(0, 0, random(64<<10))
	s.tick(context.Background()) // seals cycle 1
	clock.Add(time.Minute)
	e.j.write(0, 0, random(64<<10))
	s.tick(context.Background()) // cycle 1 is still unshipped: missed
	clock.Add(time.Minute)
	e.j.write(0, 0, random(64<<10))
	s.tick(context.Background()) // and cycle 2 too
	clock.Add(time.Second)

	st := s.Status()
	if st.Metrics.CyclesMissedTotal != 2 {
		t.Fatalf("missed %d cycles, want 2", st.Metrics.CyclesMissedTotal)
	}
	if want := (2*time.Minute + 31*time.Second).Seconds(); st.Metrics.LagSeconds != want {
		t.Fatalf("lag %vs, want %vs", st.Metrics.LagSeconds, want)
	}
	if st.Metrics.PendingCycles != 3 || !st.OldestUnshipped.Equal(t0) {
		t.Fatalf("pending %d cycles, oldest %v", st.Metrics.PendingCycles, st.OldestUnshipped)
	}
	// The oldest unshipped cycle is 2m1s old at a 1m frequency.
	if st.Health != HealthWarning {
		t.Fatalf("health %s, want warning", st.Health)
	}
	// 64 KiB more every minute toward a 1 MiB cap: (1024-192)/64 = 13m.
	if st.Forecast != "journal full in 13m at the current rate" {
		t.Fatalf("forecast %q", st.Forecast)
	}
	if st.Metrics.PendingBytes != 192<<10 {
		t.Fatalf("pending %d bytes", st.Metrics.PendingBytes)
	}
}

func TestStateFile(t *testing.T) {
	e := newEnv(t, 1<<20)
	s, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.update(func(st *persisted) {
		st.Gen = 7
		st.Sync = &syncRecord{Gen: 7, Kind: wire.KindResync, Base: 42, PieceSize: 1 << 20, Pieces: 3}
	}); err != nil {
		t.Fatal(err)
	}
	s2, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s2.st.Gen != 7 || s2.st.Sync == nil || s2.st.Sync.Base != 42 {
		t.Fatalf("reloaded %+v", s2.st)
	}

	b, err := encodeState(&s.st)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data string
	}{
		{"flipped byte", strings.Replace(string(b), `"base":42`, `"base":43`, 1)},
		{"other format", strings.Replace(string(b), stateFormat, "something-else", 1)},
		{"newer version", strings.Replace(string(b), `"version":1`, `"version":2`, 1)},
		{"not json", "{"},
	} {
		if err := writeFile(e.cfg.StateFile, tc.data); err != nil {
			t.Fatal(err)
		}
		if _, err := New(e.cfg); !errors.Is(err, ErrState) {
			t.Errorf("%s: New: %v, want ErrState", tc.name, err)
		}
	}
	other := e.cfg
	other.VM = "vm2"
	if err := writeFile(e.cfg.StateFile, string(b)); err != nil {
		t.Fatal(err)
	}
	if _, err := New(other); !errors.Is(err, ErrState) {
		t.Errorf("state of another VM: %v", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	e := newEnv(t, 1<<20)
	for _, tc := range []struct {
		name string
		mod  func(c *Config)
	}{
		{"bad VM name", func(c *Config) { c.VM = "../x" }},
		{"no journal", func(c *Config) { c.Journal = nil }},
		{"no disks", func(c *Config) { c.Disks = nil }},
		{"short disk index", func(c *Config) { c.DiskIndex = []int{0, 1} }},
		{"no TLS", func(c *Config) { c.TLS = nil }},
		{"frequency", func(c *Config) { c.Frequency = time.Millisecond }},
		{"block size", func(c *Config) { c.BlockSize = 3000 }},
		{"piece size", func(c *Config) { c.PieceSize = 6000 }},
		{"window", func(c *Config) { c.ResyncWindow = "25:00-01:00" }},
		{"initial", func(c *Config) { c.Initial = "tape" }},
		{"initial time", func(c *Config) { c.Initial = "at:tomorrow" }},
		{"no state file", func(c *Config) { c.StateFile = "" }},
	} {
		c := e.cfg
		tc.mod(&c)
		if _, err := New(c); !errors.Is(err, ErrBadConfig) {
			t.Errorf("%s: %v, want ErrBadConfig", tc.name, err)
		}
	}
}

func TestRetryable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&ReplicaError{Status: 507, Wire: wire.Error{Code: wire.CodeFull}}, true},
		{&ReplicaError{Status: 503, Wire: wire.Error{Code: wire.CodeBusy}}, true},
		{&ReplicaError{Status: 500, Wire: wire.Error{Code: wire.CodeInternal}}, true},
		{&ReplicaError{Status: 422, Wire: wire.Error{Code: wire.CodeCorrupt}}, true},
		{&ReplicaError{Status: 502}, true},
		{&ReplicaError{Status: 429}, true},
		{&ReplicaError{Status: 403, Wire: wire.Error{Code: wire.CodeForbidden}}, false},
		{&ReplicaError{Status: 403}, false},
		{&ReplicaError{Status: 401}, false},
		{&ReplicaError{Status: 404, Wire: wire.Error{Code: wire.CodeUnknownVM}}, false},
		{&ReplicaError{Status: 409, Wire: wire.Error{Code: wire.CodeMismatch}}, false},
		{fmt.Errorf("ship: read: %w", journal.ErrFailed), false},
		{errors.New("connection reset"), true},
		{fmt.Errorf("x: %w", ErrProtocol), true},
	} {
		if got := retryable(tc.err); got != tc.want {
			t.Errorf("retryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func writeFile(name, data string) error { return os.WriteFile(name, []byte(data), 0o600) }

// countingLimiter is an unlimited schedule that counts the uploads it paces
// (WaitN asks its Now for every read of an upload body).
func countingLimiter(t *testing.T) (*Limiter, func() int) {
	l, err := ParseBandwidth("unlimited")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	n := 0
	l.Now = func() time.Time {
		mu.Lock()
		n++
		mu.Unlock()
		return time.Now()
	}
	return l, func() int {
		mu.Lock()
		defer mu.Unlock()
		return n
	}
}

func TestLimitersPaceTheirTraffic(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.j.write(0, 0, random(128<<10))
	var vmN, hostN, syncN func() int
	e.cfg.Limit, vmN = countingLimiter(t)
	e.cfg.HostLimit, hostN = countingLimiter(t)
	e.cfg.SyncLimit, syncN = countingLimiter(t)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if vmN() == 0 || hostN() == 0 || syncN() == 0 {
		t.Fatalf("initial copy paced by VM %d, host %d, sync %d reads: want all three", vmN(), hostN(), syncN())
	}
	v, h, s := vmN(), hostN(), syncN()
	e.j.write(0, 0, random(128<<10))
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	if vmN() == v || hostN() == h || syncN() != s {
		t.Fatalf("a cycle paced by VM %d, host %d, sync %d reads: want the first two only", vmN()-v, hostN()-h, syncN()-s)
	}
}

func TestStatusSyncProgress(t *testing.T) {
	e := newEnv(t, 1<<20)
	now := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	e.cfg.Now = func() time.Time { return now }
	s, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.st.Sync = &syncRecord{Gen: 9, Kind: wire.KindFull, Base: 3, Pieces: 800, Reason: "initial copy"}
	// 10 GiB of 50 in the 10 minutes since this process took it up (2 GiB
	// were done before a restart).
	s.prog = progress{kind: wire.KindFull, total: 50 << 30, done: 12 << 30, startDone: 2 << 30,
		started: now.Add(-10 * time.Minute), pieces: 800, doneCount: 192}
	st := s.Status()
	if st.State != StateInitialCopy || st.Sync == nil || st.Sync.Done != 192 || st.Sync.Gen != 9 {
		t.Fatalf("status %+v", st)
	}
	if want := float64(10<<30) / 600; st.Metrics.SyncRate != want {
		t.Fatalf("rate %v, want %v", st.Metrics.SyncRate, want)
	}
	if st.Metrics.SyncETASeconds != 38*60 || st.Forecast != "initial copy done in 38m" {
		t.Fatalf("eta %vs, forecast %q", st.Metrics.SyncETASeconds, st.Forecast)
	}
}

// Pending counts the open cycle: a write is pending from the moment it is
// made, not from the next seal (issue 15: status said nothing was pending
// until the cycle closed).
func TestStatusPendingCountsOpenCycle(t *testing.T) {
	e := newEnv(t, 1<<20)
	s, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.st.InitialDone = true
	pending := func(bytes int64, cycles int) {
		t.Helper()
		m := s.Status().Metrics
		if m.PendingBytes != bytes || m.PendingCycles != cycles {
			t.Fatalf("pending %d bytes in %d cycle(s), want %d in %d", m.PendingBytes, m.PendingCycles, bytes, cycles)
		}
	}
	pending(0, 0)
	e.j.write(0, 0, random(64<<10))
	pending(64<<10, 1) // before any seal
	if _, err := e.j.Seal(0); err != nil {
		t.Fatal(err)
	}
	pending(64<<10, 1) // sealed, not shipped: the same cycle
	e.j.write(0, 128<<10, random(8<<10))
	pending(72<<10, 2)
	e.j.zero(0, 512<<10, 4<<10, journal.KindTrim)
	pending(72<<10+64, 2) // a trim is a change of the open cycle, no new one
	if err := e.j.Release(1); err != nil {
		t.Fatal(err)
	}
	pending(8<<10+64, 1) // the replica has cycle 1: only the open cycle is left
}
