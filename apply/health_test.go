package apply

import (
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// TestJudge: the thresholds of a replica VM's health.
func TestJudge(t *testing.T) {
	last := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	replicating := func(freq time.Duration, gaps ...time.Duration) replicaState {
		return replicaState{Primary: "p1", State: stateReplicating, Consistent: true, Frequency: freq, Gaps: gaps, LastCycleAt: last}
	}
	failedOver := replicating(30 * time.Second)
	failedOver.Failover = &failoverRecord{FailedOver: wire.FailedOver{Kind: "unplanned", At: last}}
	upgraded := replicating(30 * time.Second)
	upgraded.LastCycleAt, upgraded.AppliedAt = time.Time{}, last
	copying := replicating(30 * time.Second)
	copying.State = stateInitialCopy
	for _, tc := range []struct {
		name  string
		st    replicaState
		after time.Duration
		level string
		freq  time.Duration
	}{
		{"on time", replicating(30 * time.Second), 59 * time.Second, HealthNormal, 30 * time.Second},
		{"2x frequency", replicating(30 * time.Second), 61 * time.Second, HealthWarning, 30 * time.Second},
		{"74s after the primary died", replicating(30 * time.Second), 74 * time.Second, HealthWarning, 30 * time.Second},
		{"6x frequency", replicating(30 * time.Second), 181 * time.Second, HealthCritical, 30 * time.Second},
		{"15m: warning at 30m", replicating(15 * time.Minute), 31 * time.Minute, HealthWarning, 15 * time.Minute},
		{"15m: critical at 1h, before 6x", replicating(15 * time.Minute), 61 * time.Minute, HealthCritical, 15 * time.Minute},
		{"frequency from the barrier gaps", replicating(0, time.Minute, 20*time.Second, time.Minute), 121 * time.Second, HealthWarning, time.Minute},
		{"unknown frequency: 1h", replicating(0), 59 * time.Minute, HealthNormal, 0},
		{"unknown frequency: past 1h", replicating(0), 61 * time.Minute, HealthCritical, 0},
		{"kept before last_cycle_at: by the barrier", upgraded, 61 * time.Second, HealthWarning, 30 * time.Second},
		{"failed over takes no cycles", failedOver, 5 * time.Hour, HealthNormal, 30 * time.Second},
		{"initial copy without a sync record", copying, 5 * time.Hour, HealthNormal, 30 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := judge(tc.st, last.Add(tc.after))
			if h.Level != tc.level || h.Frequency != tc.freq {
				t.Fatalf("health %s, frequency %v (%s); want %s, %v", h.Level, h.Frequency, h.Reason, tc.level, tc.freq)
			}
			if tc.level != HealthNormal && !strings.Contains(h.Reason, "no cycle from p1 since 2026-03-01T12:00:00Z") {
				t.Fatalf("reason %q does not say since when", h.Reason)
			}
		})
	}
}

// TestJudgeStages: at every frequency the warning stage comes before
// critical, and critical never comes before 3 x frequency, so a normal
// gap between cycles of a frequency over 1 hour is not critical.
func TestJudgeStages(t *testing.T) {
	last := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		freq, warn, crit time.Duration
	}{
		{30 * time.Second, time.Minute, 3 * time.Minute},
		{5 * time.Minute, 10 * time.Minute, 30 * time.Minute},
		{15 * time.Minute, 30 * time.Minute, time.Hour},
		{time.Hour, 2 * time.Hour, 3 * time.Hour},
		{2 * time.Hour, 4 * time.Hour, 6 * time.Hour},
		{24 * time.Hour, 48 * time.Hour, 72 * time.Hour},
	} {
		t.Run(tc.freq.String(), func(t *testing.T) {
			st := replicaState{Primary: "p1", State: stateReplicating, Consistent: true, Frequency: tc.freq, LastCycleAt: last}
			for _, c := range []struct {
				after time.Duration
				level string
			}{
				{tc.freq, HealthNormal},
				{tc.warn, HealthNormal},
				{tc.warn + time.Second, HealthWarning},
				{tc.crit, HealthWarning},
				{tc.crit + time.Second, HealthCritical},
			} {
				if h := judge(st, last.Add(c.after)); h.Level != c.level {
					t.Errorf("%s after the last cycle: %s (%s); want %s", c.after, h.Level, h.Reason, c.level)
				}
			}
		})
	}
}

// testClock is a clock a test moves.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// clockedHarness is a replica whose clock the test moves, and a primary
// allowed to it.
func clockedHarness(t *testing.T) (*harness, *testClock, *client) {
	t.Helper()
	clock := &testClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h := newHarness(t, nil)
	h.clock = clock.now
	h.restart(nil)
	h.allow("*.example.com", h.storage, "")
	return h, clock, h.client("a.example.com")
}

func healthOf(t *testing.T, s *Server, vm string) Status {
	t.Helper()
	for _, st := range s.Statuses() {
		if st.VM == vm {
			return st
		}
	}
	t.Fatalf("no status of %s", vm)
	return Status{}
}

// TestReplicaHealth: the health of a replica VM follows the cycles applied
// at the frequency the primary sent, survives a restart, and a failed-over
// VM reads "failed-over" and expects no cycles.
func TestReplicaHealth(t *testing.T) {
	h, clock, a := clockedHarness(t)
	en := wire.Enable{Disks: testDisks, RecoveryPoints: 2, PointInterval: time.Minute, Frequency: 30 * time.Second}
	if status, e := a.call("PUT", vmPath("vm1"), en, nil); status != 200 {
		t.Fatalf("enable: %d %+v", status, e)
	}
	r := rand.New(rand.NewPCG(1, 2))
	send := func(c uint64) {
		a.send("vm1", wire.CycleUploadID(c), buildStream(t, cycleHeader("vm1", c, c-1), randomOps(r, testDisks, 4)))
	}
	send(1)
	send(2)
	applied := clock.now()
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthNormal || st.State != stateReplicating || !st.Health.LastCycleAt.Equal(applied) || st.Health.Frequency != 30*time.Second {
		t.Fatalf("after cycles: %+v", st)
	}
	clock.advance(74 * time.Second)
	st := healthOf(t, h.server(), "vm1")
	if st.Health.Level != HealthWarning || !strings.Contains(st.Health.Reason, "no cycle from a.example.com since 2026-03-01T12:00:00Z (1m14s ago, frequency 30s)") {
		t.Fatalf("74s later: %+v", st.Health)
	}
	h.restart(nil)
	clock.advance(2 * time.Minute)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthCritical {
		t.Fatalf("3m14s later, after a restart: %+v", st.Health)
	}
	send(3)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthNormal {
		t.Fatalf("after cycle 3: %+v", st.Health)
	}
	if _, err := h.server().FailOver("vm1", "unplanned", ""); err != nil {
		t.Fatal(err)
	}
	clock.advance(5 * time.Hour)
	st = healthOf(t, h.server(), "vm1")
	if st.State != StateFailedOver || st.Replica.State != stateReplicating || st.Health.Level != HealthNormal {
		t.Fatalf("failed over: state %q (images %q), health %+v", st.State, st.Replica.State, st.Health)
	}
	// Cancelled, the VM expects cycles again from then on.
	if err := h.server().CancelFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	clock.advance(40 * time.Second)
	if st := healthOf(t, h.server(), "vm1"); st.State != stateReplicating || st.Health.Level != HealthNormal {
		t.Fatalf("40s after the cancel: state %q, health %+v", st.State, st.Health)
	}
	clock.advance(40 * time.Second)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthWarning {
		t.Fatalf("80s after the cancel: %+v", st.Health)
	}
}

// TestReplicaHealthInfersFrequency: a primary that does not send its
// frequency; the replica goes by the spacing of the barriers (cycle c is
// sealed c minutes after `sealed`).
func TestReplicaHealthInfersFrequency(t *testing.T) {
	h, clock, a := clockedHarness(t)
	a.enable("vm1", testDisks)
	r := rand.New(rand.NewPCG(3, 4))
	for c := uint64(1); c <= 6; c++ {
		a.send("vm1", wire.CycleUploadID(c), buildStream(t, cycleHeader("vm1", c, c-1), randomOps(r, testDisks, 2)))
	}
	clock.advance(119 * time.Second)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthNormal || st.Health.Frequency != time.Minute {
		t.Fatalf("119s later: %+v", st.Health)
	}
	clock.advance(2 * time.Second)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthWarning {
		t.Fatalf("121s later: %+v", st.Health)
	}
}

// TestSyncHealth: a VM in an initial copy is judged by the time since its
// last piece was committed (or the copy began), across a restart, so a
// primary that dies mid-copy does not leave the replica normal.
func TestSyncHealth(t *testing.T) {
	h, clock, a := clockedHarness(t)
	en := wire.Enable{Disks: testDisks, RecoveryPoints: 2, PointInterval: time.Minute, Frequency: 30 * time.Second}
	if status, e := a.call("PUT", vmPath("vm1"), en, nil); status != 200 {
		t.Fatalf("enable: %d %+v", status, e)
	}
	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	start := wire.SyncStart{Gen: 1, Kind: wire.KindFull, Base: 0, PieceSize: pieceSize, Pieces: pieces}
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, nil); status != 200 {
		t.Fatalf("sync start: %d %+v", status, e)
	}
	clock.advance(10 * time.Minute)
	if st := healthOf(t, h.server(), "vm1"); st.State != stateInitialCopy || st.Health.Level != HealthNormal {
		t.Fatalf("10m after the copy began: state %q, health %+v", st.State, st.Health)
	}
	clock.advance(time.Second)
	st := healthOf(t, h.server(), "vm1")
	if st.Health.Level != HealthWarning || !strings.Contains(st.Health.Reason, "no piece of the initial copy from a.example.com since 2026-03-01T12:00:00Z (10m1s ago") {
		t.Fatalf("10m1s after the copy began: %+v", st.Health)
	}

	primary := newModel(testDisks)
	sendPieces(t, a, "vm1", testDisks, wire.KindFull, 1, pieceSize, primary, []int64{0})
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthNormal {
		t.Fatalf("after a piece: %+v", st.Health)
	}
	h.restart(nil)
	clock.advance(59 * time.Minute)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthWarning || !strings.Contains(st.Health.Reason, "since 2026-03-01T12:10:01Z") {
		t.Fatalf("59m after the piece, after a restart: %+v", st.Health)
	}
	clock.advance(time.Minute + time.Second)
	if st := healthOf(t, h.server(), "vm1"); st.Health.Level != HealthCritical {
		t.Fatalf("1h1s after the piece: %+v", st.Health)
	}

	var rest []int64
	for p := int64(1); p < pieces; p++ {
		rest = append(rest, p)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindFull, 1, pieceSize, primary, rest)
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", wire.SyncFinish{Gen: 1, Base: 0, ConsistentAt: 1}, nil); status != 200 {
		t.Fatalf("sync finish: %d %+v", status, e)
	}
	clock.advance(time.Minute)
	if st := healthOf(t, h.server(), "vm1"); st.State != stateReplicating || st.Health.Level != HealthNormal {
		t.Fatalf("a minute after the copy finished: state %q, health %+v", st.State, st.Health)
	}
}

// TestJudgeSync: the thresholds of a VM in a sync, by the time since its
// last piece (or its start, in a replica.json kept before last_piece_at).
func TestJudgeSync(t *testing.T) {
	began := time.Date(2026, 3, 1, 11, 0, 0, 0, time.UTC)
	last := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	syncing := func(state string, freq time.Duration) replicaState {
		return replicaState{Primary: "p1", State: state, Frequency: freq, LastPieceAt: last,
			Sync: &syncRecord{SyncStart: wire.SyncStart{Gen: 1, Kind: wire.KindFull}, Started: began}}
	}
	kept := syncing(stateInitialCopy, 30*time.Second)
	kept.LastPieceAt = time.Time{}
	held := syncing(stateResyncing, 30*time.Second)
	held.Held = &heldResync{Gen: 1, Base: 4, ConsistentAt: 6}
	for _, tc := range []struct {
		name   string
		st     replicaState
		after  time.Duration
		level  string
		reason string
	}{
		{"30s: a slow piece", syncing(stateInitialCopy, 30*time.Second), 10 * time.Minute, HealthNormal, ""},
		{"30s: warning past 10m", syncing(stateInitialCopy, 30*time.Second), 10*time.Minute + time.Second, HealthWarning, "no piece of the initial copy from p1 since 2026-03-01T12:00:00Z (10m1s ago)"},
		{"30s: critical past 1h", syncing(stateInitialCopy, 30*time.Second), time.Hour + time.Second, HealthCritical, "no piece of the initial copy"},
		{"unknown frequency: warning past 10m", syncing(stateResyncing, 0), 11 * time.Minute, HealthWarning, "no piece of the resync from p1 since"},
		{"15m: 30m", syncing(stateResyncing, 15*time.Minute), 30 * time.Minute, HealthNormal, ""},
		{"15m: warning past 30m", syncing(stateResyncing, 15*time.Minute), 31 * time.Minute, HealthWarning, "no piece of the resync"},
		{"2h: warning past 4h", syncing(stateResyncing, 2*time.Hour), 4 * time.Hour, HealthNormal, ""},
		{"2h: 6h", syncing(stateResyncing, 2*time.Hour), 6 * time.Hour, HealthWarning, "no piece of the resync"},
		{"2h: critical past 6h", syncing(stateResyncing, 2*time.Hour), 6*time.Hour + time.Second, HealthCritical, "no piece of the resync"},
		{"kept before last_piece_at: by the start", kept, 11 * time.Minute, HealthCritical, "since 2026-03-01T11:00:00Z (1h11m0s ago)"},
		{"held resync waits for cycles", held, 11 * time.Minute, HealthWarning, "no cycle for the resync from p1 since 2026-03-01T12:00:00Z (11m0s ago; its pieces are here, held for cycle 6)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := judge(tc.st, last.Add(tc.after))
			if h.Level != tc.level || !strings.Contains(h.Reason, tc.reason) {
				t.Fatalf("health %s (%s); want %s (%s)", h.Level, h.Reason, tc.level, tc.reason)
			}
		})
	}
}

// TestNoteSync: what moves last_piece_at.
func TestNoteSync(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	now := t0.Add(time.Minute)
	sync := func(gen uint64, done ...[2]int64) *syncRecord {
		return &syncRecord{SyncStart: wire.SyncStart{Gen: gen}, Done: done}
	}
	for _, tc := range []struct {
		name       string
		prev, next replicaState
		want       time.Time
	}{
		{"sync begins", replicaState{}, replicaState{Sync: sync(1)}, now},
		{"a new generation", replicaState{Sync: sync(1, [2]int64{0, 3}), LastPieceAt: t0}, replicaState{Sync: sync(2), LastPieceAt: t0}, now},
		{"a piece", replicaState{Sync: sync(1, [2]int64{0, 3}), LastPieceAt: t0}, replicaState{Sync: sync(1, [2]int64{0, 4}), LastPieceAt: t0}, now},
		{"no piece", replicaState{Sync: sync(1, [2]int64{0, 3}), LastPieceAt: t0}, replicaState{Sync: sync(1, [2]int64{0, 3}), LastPieceAt: t0}, t0},
		{"a lost piece unmarked", replicaState{Sync: sync(1, [2]int64{0, 3}), LastPieceAt: t0}, replicaState{Sync: sync(1, [2]int64{0, 2}), LastPieceAt: t0}, t0},
		{"a held cycle", replicaState{Sync: sync(1), Held: &heldResync{}, LastPieceAt: t0}, replicaState{Sync: sync(1), Held: &heldResync{Cycles: []heldCycle{{Cycle: 5}}}, LastPieceAt: t0}, now},
		{"sync finished", replicaState{Sync: sync(1), LastPieceAt: t0}, replicaState{LastPieceAt: t0}, time.Time{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			noteSync(&tc.prev, &tc.next, now)
			if !tc.next.LastPieceAt.Equal(tc.want) {
				t.Fatalf("last_piece_at %v, want %v", tc.next.LastPieceAt, tc.want)
			}
		})
	}
}
