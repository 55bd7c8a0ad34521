package ship

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/journal"
)

// fakeQuiesce plays quiesce.QuiescedBarrier: it records its calls and
// fails the freeze when fail is set.
type fakeQuiesce struct {
	calls []string
	fail  error
}

func (q *fakeQuiesce) quiesce(ctx context.Context, barrier func(bool) (journal.CycleInfo, error)) (journal.CycleInfo, bool, error, error) {
	if q.fail != nil {
		q.calls = append(q.calls, "freeze-failed", "thaw")
		info, err := barrier(false)
		return info, false, q.fail, err
	}
	q.calls = append(q.calls, "freeze")
	info, err := barrier(true)
	q.calls = append(q.calls, "thaw")
	return info, true, nil, err
}

// TestAppConsistentSeals: a scheduled seal is quiesced once per
// AppConsistentEvery; a failed freeze seals a point that is not
// application-consistent and says so in status; the replica gets both
// flags in the cycle header.
func TestAppConsistentSeals(t *testing.T) {
	e := newEnv(t, 1<<20)
	t0 := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	clock := newClock(t0)
	e.cfg.Now, e.j.now = clock.Now, clock.Now
	q := &fakeQuiesce{}
	e.cfg.Quiesce, e.cfg.AppConsistentEvery = q.quiesce, time.Hour
	e.cfg.RecoveryPoints, e.cfg.PointInterval = 3, time.Minute
	r := e.start(e.cfg)
	s := r.s
	waitReplicating(t, s)
	ctx := context.Background()

	e.j.write(0, 0, random(4096))
	s.tick(ctx) // the first scheduled seal is quiesced
	clock.Add(time.Minute)
	s.tick(ctx) // a minute later: not due
	clock.Add(time.Hour)
	q.fail = errors.New("freeze: timed out after 30s")
	s.tick(ctx) // due; the freeze fails
	if strings.Join(q.calls, ",") != "freeze,thaw,freeze-failed,thaw" {
		t.Fatalf("quiesce calls %v", q.calls)
	}
	st := s.Status()
	if st.LastAppConsistent.IsZero() || !strings.Contains(st.QuiesceError, "is a standard recovery point") || !strings.Contains(st.QuiesceError, "timed out") {
		t.Fatalf("status: last app-consistent %v, quiesce error %q", st.LastAppConsistent, st.QuiesceError)
	}
	q.fail = nil
	if _, err := s.Sync(syncCtx(t), true); err != nil {
		t.Fatal(err)
	}
	if st := s.Status(); st.QuiesceError != "" {
		t.Fatalf("quiesce error after a good freeze: %q", st.QuiesceError)
	}
	// The replica learns the policy and the flags.
	en := e.rep.lastEnable()
	if en.RecoveryPoints != 3 || en.PointInterval != time.Minute || en.Frequency != e.cfg.Frequency || en.Frequency == 0 {
		t.Fatalf("enable sent %+v (frequency %v)", en, e.cfg.Frequency)
	}
	hs := e.rep.cycleHeaders() // the cycle sealed by the initial copy first
	if len(hs) != 5 {
		t.Fatalf("%d cycles applied, want 5", len(hs))
	}
	if hs = hs[1:]; !hs[0].AppConsistent || hs[1].AppConsistent || hs[1].Point || hs[2].AppConsistent || !hs[2].Point || !hs[3].AppConsistent {
		t.Fatalf("headers the replica got: %+v", hs)
	}
	s.cfg.Quiesce = nil
	if _, err := s.Sync(syncCtx(t), true); !errors.Is(err, ErrBadConfig) {
		t.Fatalf("app-consistent sync without a quiescer: %v", err)
	}
}
