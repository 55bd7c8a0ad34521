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
		{"initial copy", copying, 5 * time.Hour, HealthNormal, 30 * time.Second},
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
