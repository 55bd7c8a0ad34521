package ship

import (
	"context"
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/journal"
)

// Application-consistent barriers.
//
// Every Config.AppConsistentEvery (and on Sync with app set) the shipper
// seals through Config.Quiesce instead of sealing plainly: Quiesce freezes
// the guest, calls the barrier with appConsistent true while frozen, and
// thaws. When the freeze fails or times out it thaws anyway and calls the
// barrier with appConsistent false: the cycle is then sealed with
// journal.SealPoint, so the replica still records a (standard) recovery
// point there, and status says why it is not application-consistent. Guest
// writes are never held longer than the quiesce's timeout: the journal's
// seal itself takes no I/O lock on the guest's writes beyond its own.

// QuiesceFunc is quiesce.QuiescedBarrier bound to a VM's quiescer: it
// freezes, calls barrier while frozen (true) or after a failed freeze
// (false), thaws, and reports the barrier's result, whether it was taken
// frozen, what went wrong with the quiesce (reason) and the barrier's own
// error.
type QuiesceFunc func(ctx context.Context, barrier func(appConsistent bool) (journal.CycleInfo, error)) (info journal.CycleInfo, appConsistent bool, reason, err error)

// appSealDue says whether the next scheduled seal should be quiesced.
// Caller holds mu.
func (s *Shipper) appSealDue(now time.Time) bool {
	every := s.cfg.AppConsistentEvery
	if every <= 0 || s.cfg.Quiesce == nil {
		return false
	}
	return s.st.LastAppSeal.IsZero() || now.Sub(s.st.LastAppSeal) >= every
}

// seal closes the open cycle, quiesced when app is set and a quiescer is
// configured.
func (s *Shipper) seal(ctx context.Context, app bool) (journal.CycleInfo, error) {
	if !app || s.cfg.Quiesce == nil {
		return s.j.Seal(0)
	}
	info, frozen, reason, err := s.cfg.Quiesce(ctx, func(appConsistent bool) (journal.CycleInfo, error) {
		if appConsistent {
			return s.j.Seal(journal.SealAppConsistent)
		}
		return s.j.Seal(journal.SealPoint)
	})
	if err != nil {
		return info, err
	}
	now := s.now()
	why := ""
	if reason != nil {
		why = reason.Error()
		if frozen {
			s.log.Warn("application-consistent point taken, but thawing the guest failed", "cycle", info.Cycle, "err", reason)
		} else {
			s.log.Warn("guest could not be quiesced: a standard recovery point was recorded instead", "cycle", info.Cycle, "err", reason)
			why = fmt.Sprintf("cycle %d is a standard recovery point, not application-consistent: %s", info.Cycle, why)
		}
	} else {
		s.log.Info("application-consistent barrier", "cycle", info.Cycle)
	}
	uerr := s.update(func(p *persisted) {
		p.LastAppSeal = now
		if frozen {
			p.LastAppConsistent = info.Sealed
		}
		p.QuiesceError = why
	})
	return info, uerr
}
