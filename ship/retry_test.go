package ship

import (
	"errors"
	"testing"
	"time"
)

// TestBackoffSchedule is the retry schedule of issue 15: a few seconds at
// first, doubling, at most 30 minutes (Hyper-V's ceiling), times the scale.
func TestBackoffSchedule(t *testing.T) {
	for _, tc := range []struct {
		n     int
		scale float64
		want  time.Duration
	}{
		{1, 1, 2 * time.Second},
		{2, 1, 4 * time.Second},
		{3, 1, 8 * time.Second},
		{4, 1, 16 * time.Second},
		{5, 1, 32 * time.Second},
		{6, 1, 64 * time.Second},
		{10, 1, 1024 * time.Second},
		{11, 1, 30 * time.Minute},
		{12, 1, 30 * time.Minute},
		{100, 1, 30 * time.Minute},
		{1000, 1, 30 * time.Minute},
		{0, 0, 2 * time.Second},
		{1, 0.001, 2 * time.Millisecond},
		{11, 0.001, 1800 * time.Millisecond},
	} {
		if got := backoff(tc.n, tc.scale); got != tc.want {
			t.Errorf("backoff(%d, %v) = %v, want %v", tc.n, tc.scale, got, tc.want)
		}
	}
}

func TestJitterStaysBelowTheBackoff(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		r    float64
		want time.Duration
	}{
		{2 * time.Second, 0, 2 * time.Second},
		{2 * time.Second, 0.5, 1800 * time.Millisecond},
		{30 * time.Minute, 1, 24 * time.Minute},
	} {
		if got := jitter(tc.d, tc.r); got != tc.want {
			t.Errorf("jitter(%v, %v) = %v, want %v", tc.d, tc.r, got, tc.want)
		}
	}
}

// TestFirstRetryComesWithinSeconds drives the shipper's failure handling
// at the real scale: the first retry is due within 2 s (not 1 minute), the
// waits double up to 30 minutes and never pass it, and a success starts
// the schedule over.
func TestFirstRetryComesWithinSeconds(t *testing.T) {
	e := newEnv(t, 1<<20)
	clock := newClock(time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC))
	e.cfg.Now = clock.Now
	e.cfg.RetryScale = 1
	s, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	down := errors.New("dial tcp 127.0.0.1:1: connect: connection refused")
	wait := func() time.Duration {
		t.Helper()
		s.fail(down)
		st := s.Status()
		if st.NextRetry.IsZero() {
			t.Fatalf("no retry scheduled: %+v", st)
		}
		return st.NextRetry.Sub(clock.Now())
	}
	for round := range 2 {
		for n, want := range []time.Duration{2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second} {
			if got := wait(); got > want || got <= want*4/5 {
				t.Fatalf("round %d: retry %d in %v, want (%v, %v]", round, n+1, got, want*4/5, want)
			}
		}
		for range 20 {
			if got := wait(); got > retryMax {
				t.Fatalf("round %d: retry in %v, past the ceiling of %v", round, got, retryMax)
			}
		}
		if got := wait(); got <= retryMax*4/5 {
			t.Fatalf("round %d: retry in %v after 25 failures, want the ceiling of %v less jitter", round, got, retryMax)
		}
		s.succeeded()
		if st := s.Status(); !st.NextRetry.IsZero() {
			t.Fatalf("round %d: a retry still due after a success: %+v", round, st)
		}
	}
}
