package ship

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// SyncTimeoutError is Sync's error when its context's deadline comes
// before the cycle is applied: what Sync waited for and why it did not
// come, e.g.
//
//	ship: cycle 7 of vm1 not applied within 10s: the replica at
//	10.0.0.2:7443 has not answered since 2026-03-02T12:03:04Z (last error:
//	... dial tcp 10.0.0.2:7443: connect: connection refused); next retry in 8s
//
// It unwraps to the context's error (context.DeadlineExceeded).
type SyncTimeoutError struct {
	VM string
	// Cycle is the cycle waited for; 0 if none was sealed yet, because an
	// initial copy or resync had to end first.
	Cycle  uint64
	Waited time.Duration
	Why    string
	Err    error
}

func (e *SyncTimeoutError) Error() string {
	if e.Cycle == 0 {
		return fmt.Sprintf("ship: no cycle of %s sealed within %s: %s", e.VM, roughly(e.Waited), e.Why)
	}
	return fmt.Sprintf("ship: cycle %d of %s not applied within %s: %s", e.Cycle, e.VM, roughly(e.Waited), e.Why)
}

func (e *SyncTimeoutError) Unwrap() error { return e.Err }

// timedOut turns err, Sync's wait for cycle (0: for the end of a sync,
// before sealing one) since start, into a *SyncTimeoutError if it is the
// end of ctx's deadline; any other error is returned as it is.
func (s *Shipper) timedOut(ctx context.Context, err error, cycle uint64, start time.Time) error {
	if !errors.Is(err, context.DeadlineExceeded) || ctx.Err() == nil {
		return err
	}
	return &SyncTimeoutError{VM: s.cfg.VM, Cycle: cycle, Waited: time.Since(start), Why: s.whyNotApplied(), Err: err}
}

// whyNotApplied says why the cycles sealed so far are not on the replica
// yet: a sync under way, and the replica's trouble (not answering, or
// answering with errors, and when it is asked again) or, without any, how
// far it got.
func (s *Shipper) whyNotApplied() string {
	pending := len(s.j.Cycles())
	now := s.now()
	answered := s.c.lastAnswer()
	s.mu.Lock()
	defer s.mu.Unlock()
	var why []string
	switch rec := s.st.Sync; {
	case rec != nil && rec.Offline != "":
		why = append(why, "the replica has not imported the offline copy in "+rec.Offline+" yet")
	case rec != nil:
		what := syncWhat(rec.Kind) + " is under way"
		if s.prog.total > 0 {
			what += fmt.Sprintf(" (%d of %d pieces, %d%%)", s.prog.doneCount, s.prog.pieces, s.prog.done*100/s.prog.total)
		}
		why = append(why, what)
	case !s.st.InitialDone:
		why = append(why, "the initial copy has not begun")
	}
	rep := "the replica at " + s.cfg.Replica
	var re *ReplicaError
	switch {
	case s.attempt == 0 && answered.IsZero():
		why = append(why, rep+" has not answered yet")
	case s.attempt == 0:
		why = append(why, fmt.Sprintf("%s last answered at %s and has applied cycle %d; %d closed cycles are still to ship, and nothing failed since the last success",
			rep, stamp(answered), s.st.Applied, pending))
	case errors.As(s.lastFail, &re) && re.Wire.Code != "":
		why = append(why, fmt.Sprintf("%s answers with an error (last error: %s)", rep, s.lastErr))
	case answered.IsZero():
		why = append(why, fmt.Sprintf("%s has not answered since shipping started at %s (last error: %s)", rep, stamp(s.runAt), s.lastErr))
	case answered.Before(s.failingAt):
		why = append(why, fmt.Sprintf("%s has not answered since %s (last error: %s)", rep, stamp(answered), s.lastErr))
	default:
		why = append(why, fmt.Sprintf("%s last answered at %s, but shipping fails (last error: %s)", rep, stamp(answered), s.lastErr))
	}
	if s.attempt > 0 {
		if d := s.retryAt.Sub(now); d > 0 {
			why[len(why)-1] += "; next retry in " + roughly(d)
		} else {
			why[len(why)-1] += "; retrying now"
		}
	}
	return strings.Join(why, "; ")
}

// stamp is a time for a message: RFC 3339 in UTC, to the second.
func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// roughly renders a wait: to a tenth of a second from a second up, else to
// the millisecond.
func roughly(d time.Duration) string {
	if d >= time.Second {
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Millisecond).String()
}
