package ship

import (
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// pipelineEnv is an env replicating, with the cycle sealed after the
// initial copy shipped, and a hook that holds the commit of one cycle.
type pipelineEnv struct {
	*env
	r *run

	mu     sync.Mutex
	put    bool          // hold a chunk of the cycle, not its commit
	hold   uint64        // the cycle whose commit is held
	held   chan struct{} // closed when that commit arrived
	answer chan func() (int, string)
}

func newPipelineEnv(t *testing.T) *pipelineEnv {
	e := &pipelineEnv{env: newEnv(t, 2<<20)}
	e.cfg.Compress = false
	e.j.onRelease = func(c uint64) {
		if got := e.rep.applied("vm1"); got < c {
			t.Errorf("cycle %d released while the replica has applied %d", c, got)
		}
	}
	e.r = e.start(e.cfg)
	waitReplicating(t, e.r.s)
	if _, err := e.r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	e.rep.mu.Lock()
	e.rep.fail = e.intercept
	e.rep.mu.Unlock()
	return e
}

// holdCommit makes the replica hold the commit of cycle c until release
// is given the answer (0: let it through).
func (e *pipelineEnv) holdCommit(c uint64) { e.holdRequest(c, false) }

// holdRequest holds the commit of cycle c, or with put its first chunk.
func (e *pipelineEnv) holdRequest(c uint64, put bool) {
	e.mu.Lock()
	answer := make(chan func() (int, string), 1)
	e.hold, e.put, e.held, e.answer = c, put, make(chan struct{}), answer
	e.mu.Unlock()
	// A test that fails before release must not leave the commit held:
	// the server's Close would wait for it.
	e.t.Cleanup(func() {
		select {
		case answer <- func() (int, string) { return 0, "" }:
		default:
		}
	})
}

func (e *pipelineEnv) intercept(r *http.Request) (int, string) {
	e.mu.Lock()
	hold, held, answer := e.hold, e.held, e.answer
	want := "/uploads/" + wire.CycleUploadID(hold) + "/commit"
	if e.put {
		want = "/uploads/" + wire.CycleUploadID(hold)
	}
	if hold != 0 && strings.HasSuffix(r.URL.Path, want) && (r.Method == http.MethodPut) == e.put {
		e.hold = 0 // once
	} else {
		hold = 0
	}
	e.mu.Unlock()
	if hold == 0 {
		return 0, ""
	}
	close(held)
	return (<-answer)()
}

// release answers the held commit with what fn returns.
func (e *pipelineEnv) release(fn func() (int, string)) { e.answer <- fn }

// waitHeld waits until the held commit arrived.
func (e *pipelineEnv) waitHeld() {
	e.t.Helper()
	e.mu.Lock()
	held := e.held
	e.mu.Unlock()
	waitFor(e.t, e.r.s, "the held commit", func() bool {
		select {
		case <-held:
			return true
		default:
			return false
		}
	})
}

// staged reports whether the replica holds the whole stream of cycle c
// (its BLAKE3 end hash included), uncommitted.
func (e *pipelineEnv) staged(c uint64) bool {
	e.rep.mu.Lock()
	defer e.rep.mu.Unlock()
	vm := e.rep.vms["vm1"]
	if vm == nil {
		return false
	}
	_, _, err := readStream(vm.staged[wire.CycleUploadID(c)])
	return err == nil
}

// twoCycles seals cycle a with 512 KiB of new data and starts a Sync that
// seals cycle b with 512 KiB more; the Sync's result comes on the channel.
// The commit of a is held.
func (e *pipelineEnv) twoCycles() (a, b uint64, res chan error) {
	return e.twoCyclesHolding(false)
}

// twoCyclesHolding is twoCycles holding, with put, the first chunk of b
// instead.
func (e *pipelineEnv) twoCyclesHolding(put bool) (a, b uint64, res chan error) {
	e.t.Helper()
	e.j.write(0, 0, random(512<<10))
	info, err := e.j.Seal(0)
	if err != nil {
		e.t.Fatal(err)
	}
	a, b = info.Cycle, info.Cycle+1
	if put {
		e.holdRequest(b, true)
	} else {
		e.holdCommit(a)
	}
	e.j.write(0, 1<<20, random(512<<10))
	res = make(chan error, 1)
	ctx := syncCtx(e.t)
	go func() {
		c, err := e.r.s.Sync(ctx, false)
		if err == nil && c != b {
			e.t.Errorf("Sync sealed cycle %d, want %d", c, b)
		}
		res <- err
	}()
	return a, b, res
}

// sent is how many body bytes the replica received for cycle c's upload,
// and the size of the stream it committed.
func (e *pipelineEnv) sent(c uint64) (received, size int64) {
	id := wire.CycleUploadID(c)
	e.rep.mu.Lock()
	defer e.rep.mu.Unlock()
	return e.rep.uploadBytes[id], e.rep.streamSize[id]
}

// checkCommits: the last cycle commits the replica saw are a, then b.
func (e *pipelineEnv) checkCommits(t *testing.T, a, b uint64) {
	t.Helper()
	if got := e.cycleCommits(); len(got) < 2 || !slices.Equal(got[len(got)-2:], []uint64{a, b}) {
		t.Fatalf("commits %v, want ... %d %d", got, a, b)
	}
}

// checkSentOnce: every byte of each cycle's stream was sent exactly once.
func (e *pipelineEnv) checkSentOnce(t *testing.T, cycles ...uint64) {
	t.Helper()
	for _, c := range cycles {
		if got, size := e.sent(c); got != size {
			t.Fatalf("cycle %d: %d bytes sent for a %d-byte stream", c, got, size)
		}
	}
}

func (e *pipelineEnv) cycleCommits() []uint64 {
	e.rep.mu.Lock()
	defer e.rep.mu.Unlock()
	var out []uint64
	for _, id := range e.rep.commits {
		if c, ok := cycleOf(id); ok {
			out = append(out, c)
		}
	}
	return out
}

// The replica answers a commit once the cycle is applied; meanwhile the
// next cycle is uploaded, and committed only after that answer. The cycle
// is released and counted applied only after its own answer.
func TestNextCycleUploadsWhileCommitIsApplied(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCycles()
	e.waitHeld()
	waitFor(t, e.r.s, "cycle b staged while the commit of a is held", func() bool { return e.staged(b) })
	if st := e.r.s.Status(); st.LastApplied >= a || st.Committing != a {
		t.Fatalf("status says cycle %d applied, %d committing, while the commit of %d is unanswered", st.LastApplied, st.Committing, a)
	}
	if cs := e.j.Cycles(); len(cs) == 0 || cs[0].Cycle != a {
		t.Fatalf("journal keeps %v while the commit of %d is unanswered", cs, a)
	}
	if slices.Contains(e.cycleCommits(), b) {
		t.Fatalf("cycle %d committed before the answer for %d", b, a)
	}
	e.release(func() (int, string) { return 0, "" })
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	e.checkImages(b)
	e.checkCommits(t, a, b)
	e.checkSentOnce(t, a, b)
	waitFor(t, e.r.s, "no commit in flight", func() bool { return e.r.s.Status().Committing == 0 })
	if st := e.r.s.Status(); st.LastApplied != b || st.Metrics.RetriesTotal != 0 {
		t.Fatalf("status %+v", st)
	}
}

// A commit that fails while the next cycle was uploaded behind it is
// retried; the next cycle, staged on the replica, is not sent again.
func TestFailedCommitKeepsNextCycleStaged(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCycles()
	e.waitHeld()
	waitFor(t, e.r.s, "cycle b staged", func() bool { return e.staged(b) })
	e.release(func() (int, string) { return http.StatusInternalServerError, wire.CodeInternal })
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	e.checkImages(b)
	e.checkCommits(t, a, b)
	e.checkSentOnce(t, a, b)
	if st := e.r.s.Status(); st.Metrics.RetriesTotal != 1 || !strings.Contains(st.LastError, "injected") {
		t.Fatalf("status %+v", st)
	}
}

// A cycle the replica found corrupt at commit (as after damage at rest,
// apply/doc.go) is sent again and committed before the one uploaded
// behind it.
func TestCorruptCommitResendsBeforeTheNextCycle(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCycles()
	e.waitHeld()
	waitFor(t, e.r.s, "cycle b staged", func() bool { return e.staged(b) })
	e.release(func() (int, string) {
		// The replica drops a corrupt upload.
		e.rep.mu.Lock()
		delete(e.rep.vms["vm1"].staged, wire.CycleUploadID(a))
		e.rep.mu.Unlock()
		return http.StatusUnprocessableEntity, wire.CodeCorrupt
	})
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	e.checkImages(b)
	e.checkCommits(t, a, b)
	if got, size := e.sent(a); got != 2*size {
		t.Fatalf("cycle %d: %d bytes sent for a %d-byte stream sent twice", a, got, size)
	}
	if got, size := e.sent(b); got != size {
		t.Fatalf("cycle %d: %d bytes sent for a %d-byte stream", b, got, size)
	}
}

// A "gap" answer for a cycle (the replica lost cycles before it) makes a
// resync due; the cycle uploaded behind it is not committed (it does not
// follow what the replica holds), the resync repairs the replica.
func TestGapStopsBeforeTheNextCycle(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCycles()
	e.waitHeld()
	waitFor(t, e.r.s, "cycle b staged", func() bool { return e.staged(b) })
	e.release(func() (int, string) { return http.StatusConflict, wire.CodeGap })
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if got := e.cycleCommits(); slices.Contains(got, a) || slices.Contains(got, b) {
		t.Fatalf("commits %v after a gap at %d", got, a)
	}
	e.checkImages(b)
	if st := e.r.s.Status(); st.Metrics.RetriesTotal != 0 || st.LastApplied < b {
		t.Fatalf("status %+v", st)
	}
}

// A pause cuts the commit of a cycle short while the replica applies it:
// after Resume the shipper asks the replica, finds the cycle applied and
// does not send it again.
func TestCommitCutShortIsNotSentAgain(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCycles()
	e.waitHeld()
	if err := e.r.s.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err == nil {
		t.Fatal("Sync succeeded while paused")
	}
	waitFor(t, e.r.s, "the cut commit noted", func() bool {
		e.r.s.opMu.Lock()
		defer e.r.s.opMu.Unlock()
		return e.r.s.unanswered == a
	})
	// The replica goes on with the commit whose client is gone.
	e.release(func() (int, string) { return 0, "" })
	waitFor(t, e.r.s, "cycle a applied", func() bool { return e.rep.applied("vm1") >= a })
	if err := e.r.s.Resume(); err != nil {
		t.Fatal(err)
	}
	c, err := e.r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	if got, size := e.sent(a); got != size {
		t.Fatalf("cycle %d: %d bytes sent for a %d-byte stream", a, got, size)
	}
	if got := e.cycleCommits(); !slices.Contains(got, b) {
		t.Fatalf("commits %v", got)
	}
}

// The answer to a commit is recorded when it comes, not once the upload
// of the next cycle is done: Sync, the lag and the journal's space do not
// wait for that upload.
func TestCommitRecordedWhileNextCycleUploads(t *testing.T) {
	e := newPipelineEnv(t)
	a, b, res := e.twoCyclesHolding(true)
	e.waitHeld() // the first chunk of b is held
	waitFor(t, e.r.s, "cycle a recorded applied while b uploads", func() bool { return e.r.s.Status().LastApplied >= a })
	if cs := e.j.Cycles(); len(cs) == 0 || cs[0].Cycle != b {
		t.Fatalf("journal keeps %v after cycle %d was applied", cs, a)
	}
	e.release(func() (int, string) { return 0, "" })
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	e.checkImages(b)
}
