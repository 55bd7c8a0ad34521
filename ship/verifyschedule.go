package ship

import (
	"context"
	"errors"
	"time"
)

// verifyRetry bounds how long a scheduled verify that could not run (a
// sync under way, the replica unreachable) waits before it tries again.
const verifyRetry = 10 * time.Minute

// verifySchedule runs Verify every Config.VerifyEvery, counted from the
// last verify that finished (any: scheduled or an admin's), and from the
// shipper's start when none has. A verify that finds blocks that differ
// repairs them as an admin's would (a resync, or nothing where the
// primary's image is the damaged side); one that cannot run tries again
// after at most verifyRetry.
func (s *Shipper) verifySchedule(ctx context.Context) {
	every := s.cfg.VerifyEvery
	first := s.now().Add(every)
	var retryAt time.Time
	for {
		s.mu.Lock()
		due := first
		if l := s.st.LastVerify; l != nil {
			due = l.At.Add(every)
		}
		s.mu.Unlock()
		if retryAt.After(due) {
			due = retryAt
		}
		if wait := due.Sub(s.now()); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue // a verify may have finished meanwhile
		}
		s.log.Info("scheduled verify starting", "every", every)
		res, err := s.Verify(ctx, VerifyOptions{Rate: s.cfg.VerifyRate})
		switch {
		case ctx.Err() != nil || errors.Is(err, ErrClosed):
			return
		case err != nil:
			retryAt = s.now().Add(min(every, verifyRetry))
			s.log.Warn("scheduled verify could not run; trying again later", "err", err, "retry_at", retryAt)
		default:
			retryAt = time.Time{}
			if res.NothingCompared {
				s.log.Warn("scheduled verify compared nothing", "why", res.NotCompared)
			}
		}
	}
}
