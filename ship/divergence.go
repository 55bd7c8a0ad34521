package ship

import (
	"fmt"
	"slices"
	"strings"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// The replica compares its block-tree roots with the primary's (sent in
// each cycle's header) once it applied a cycle, and says in every answer
// (wire.Replica.Diverged) when they differed: its images are not what the
// primary had. The shipper then starts a resync at once, outside the
// resync window too (the replica is wrong now, and a tree resync reads
// and sends only the blocks that differ), unless a sync is under way,
// which repairs it all the same. The replica clears Diverged when a
// resync finishes; the divergence a resync was started for is kept as
// Repaired, so an answer that still names it starts nothing more.

// sameDivergence says whether a and b are the same report.
func sameDivergence(a, b *wire.Divergence) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Cycle == b.Cycle && a.At.Equal(b.At) && slices.Equal(a.Disks, b.Disks)
}

// divergenceReason is the resync reason of d.
func divergenceReason(d *wire.Divergence) string {
	return fmt.Sprintf("the replica's disks %s differ from the primary's at cycle %d (block-tree roots)", strings.Join(d.Disks, ", "), d.Cycle)
}

// noteReplica records what an answer of the replica says of its
// verification: the cycle it last verified, and a divergence, which
// starts a resync (see above).
func (s *Shipper) noteReplica(rep wire.Replica) error {
	d := rep.Diverged
	due := func(st *persisted) bool {
		return d != nil && st.Sync == nil && !sameDivergence(d, st.Repaired) &&
			(st.Resync == nil || !sameDivergence(d, st.Resync.Divergence))
	}
	s.mu.Lock()
	changed := rep.Verified > s.st.Verified || !sameDivergence(d, s.st.Diverged) || due(&s.st)
	s.mu.Unlock()
	if !changed {
		return nil
	}
	started := false
	err := s.update(func(st *persisted) {
		st.Verified = max(st.Verified, rep.Verified)
		if d != nil {
			c := *d
			c.Disks = slices.Clone(d.Disks)
			st.Diverged = &c
		} else {
			st.Diverged = nil
		}
		if due(st) {
			st.Resync = &pendingResync{Reason: divergenceReason(d), Manual: true, Divergence: st.Diverged}
			started = true
		}
	})
	if started {
		s.log.Error("replica diverged from the primary, starting a resync", "cycle", d.Cycle,
			"disks", strings.Join(d.Disks, ","), "at", d.At, "reason", divergenceReason(d))
	}
	return err
}
