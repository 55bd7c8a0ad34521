package ship

import (
	"context"
	"errors"
	"time"
)

// rootsWait bounds how long a cycle's upload waits for the journal's
// write-back to pass the cycle's barrier, which it must before the
// journal knows the block-tree roots at that barrier. The write-back
// trails the guest by well under a second on a healthy host; a cycle that
// waits longer ships without roots (unverified) instead of holding
// replication back behind a slow or stuck image.
const rootsWait = 10 * time.Second

// cycleRoots returns the primary's block-tree roots at cycle c's barrier,
// one per replicated disk in hex (wire.Header.Roots), or nil when the
// journal does not know them in time: the cycle then ships unverified and
// is counted so. The answer is kept until a later cycle is asked for, so
// that a cycle sent again (a resumed upload, a resend after "corrupt")
// has the same header: a different header would make the replica find
// the resumed stream corrupt. A cycle that folds several journal cycles carries
// the roots of the last one, which is c. Call with opMu held.
func (s *Shipper) cycleRoots(ctx context.Context, c uint64) ([]string, error) {
	if r, ok := s.roots[c]; ok {
		return r, nil
	}
	// The cycle before c may still be sent again (its commit is in flight
	// while c uploads, and answered "corrupt" it is resent): keep it.
	for k := range s.roots {
		if k+1 < c {
			delete(s.roots, k)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, s.rootsWait)
	roots, err := s.j.RootsAt(wctx, c)
	cancel()
	if err != nil && ctx.Err() != nil {
		return nil, ctx.Err() // paused or closed: not an answer
	}
	var out []string
	why := ""
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		why = "the write-back did not reach the cycle's barrier in " + s.rootsWait.String()
	case err != nil:
		why = err.Error()
	case roots == nil:
		why = "the primary's block tree did not know them (it is being built)"
	default:
		for _, jd := range s.cfg.DiskIndex {
			if jd >= len(roots) {
				why = "the journal named fewer roots than the VM has disks"
				out = nil
				break
			}
			out = append(out, roots[jd].String())
		}
	}
	s.roots[c] = out
	if out == nil {
		s.mu.Lock()
		s.st.Counters.UnverifiedCycles++
		s.mu.Unlock()
		if !s.unverified {
			s.log.Warn("cycles ship without block-tree roots: the replica cannot check its images against them", "cycle", c, "why", why)
		}
		s.unverified = true
		return nil, nil
	}
	if s.unverified {
		s.log.Info("cycles ship with block-tree roots again", "cycle", c)
	}
	s.unverified = false
	return out, nil
}
