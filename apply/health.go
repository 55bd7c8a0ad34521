package apply

import (
	"fmt"
	"sort"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// Health levels of a replica VM (Health.Level): the words of the primary's
// health (ship.Status.Health).
const (
	HealthNormal   = "normal"
	HealthWarning  = "warning"
	HealthCritical = "critical"
)

// StateFailedOver is the state `replication status` gives a replica VM
// failed over on this host (Status.State; wire.Replica.State keeps the
// state of its images).
const StateFailedOver = "failed-over"

// Health thresholds (see the package documentation): no cycle applied for
// more than warnCycles frequencies is a warning, for more than critCycles
// frequencies or critAfter, whichever is less, but never less than
// minCritCycles frequencies, critical.
const (
	warnCycles    = 2
	critCycles    = 6
	minCritCycles = warnCycles + 1 // a warning stage at any frequency
	critAfter     = time.Hour
	maxGaps       = 4
)

// Health thresholds of a VM in a sync (see the package documentation): no
// sync progress for more than syncWarnAfter or warnCycles frequencies,
// whichever is more, is a warning; for more than critAfter or
// minCritCycles frequencies, whichever is more, critical.
const syncWarnAfter = 10 * time.Minute

// Health is the replica's own judgement of a replica VM: whether the
// cycles of its primary keep arriving.
type Health struct {
	Level  string // HealthNormal, HealthWarning or HealthCritical
	Reason string // why it is not normal, or what it waits for
	// LastCycleAt is when a cycle was last applied here (this host's
	// clock), or when the VM last became replicating; zero before.
	LastCycleAt time.Time
	// Frequency is the primary's cycle frequency as this host knows it
	// (0: not known yet).
	Frequency time.Duration
}

// Status is a replica VM as `replication status` shows it on this host.
type Status struct {
	wire.Replica
	// State is wire.Replica.State, or StateFailedOver while the VM is
	// failed over here.
	State  string
	Health Health
}

// Statuses lists the replica VMs with their health at the Server's clock,
// sorted by name.
func (s *Server) Statuses() []Status {
	s.mu.Lock()
	vms := make([]*vm, 0, len(s.vms))
	for _, v := range s.vms {
		vms = append(vms, v)
	}
	s.mu.Unlock()
	now := s.now()
	out := make([]Status, 0, len(vms))
	for _, v := range vms {
		r := v.replica()
		st := Status{Replica: r, State: r.State, Health: judge(v.snapshot(), now)}
		if r.FailedOver != nil {
			st.State = StateFailedOver
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out
}

// frequency is the primary's frequency: sent with the enable, else the
// largest barrier spacing of the last cycles (a `replication sync` seals
// early, so the spacing is never above the frequency but for a pause).
func (st *replicaState) frequency() time.Duration {
	if st.Frequency > 0 {
		return st.Frequency
	}
	var f time.Duration
	for _, g := range st.Gaps {
		f = max(f, g)
	}
	return f
}

// judge says whether cycles keep arriving for a VM in state st at now.
// A replicating VM expects cycles; a VM in an initial copy or resync
// expects pieces, at the pace of the link (judgeSync); a VM failed over
// here takes none.
func judge(st replicaState, now time.Time) Health {
	h := Health{Level: HealthNormal, LastCycleAt: st.LastCycleAt, Frequency: st.frequency()}
	switch {
	case st.Failover != nil:
		h.Reason = fmt.Sprintf("failed over on this host: takes no cycles from %s", st.Primary)
		return h
	case st.Sync != nil && (st.State == stateInitialCopy || st.State == stateResyncing):
		return judgeSync(st, h, now)
	case st.State != stateReplicating:
		h.Reason = fmt.Sprintf("%s from %s: cycles follow it", st.State, st.Primary)
		return h
	case h.LastCycleAt.IsZero() && st.AppliedAt.IsZero():
		return h
	case h.LastCycleAt.IsZero():
		// A replica.json written before last_cycle_at was kept: the
		// barrier of the last cycle is the best guess (the primary's
		// clock), until the next cycle arrives.
		h.LastCycleAt = st.AppliedAt
	}
	since := now.Sub(h.LastCycleAt)
	crit := critAfter
	if f := h.Frequency; f > 0 {
		crit = max(min(critCycles*f, critAfter), minCritCycles*f)
	}
	when := fmt.Sprintf("no cycle from %s since %s (%s ago", st.Primary, h.LastCycleAt.UTC().Format(time.RFC3339), since.Round(time.Second))
	switch {
	case since > crit:
		h.Level = HealthCritical
	case h.Frequency > 0 && since > warnCycles*h.Frequency:
		h.Level = HealthWarning
	default:
		return h
	}
	if h.Frequency > 0 {
		h.Reason = fmt.Sprintf("%s, frequency %s)", when, h.Frequency)
	} else {
		h.Reason = fmt.Sprintf("%s; frequency not known yet)", when)
	}
	return h
}

// judgeSync says whether a sync keeps making progress: h is the VM's
// health so far (normal, its frequency).
func judgeSync(st replicaState, h Health, now time.Time) Health {
	last := st.LastPieceAt
	if last.IsZero() {
		// A replica.json written before last_piece_at was kept: the
		// sync's start is the best guess until its next piece.
		last = st.Sync.Started
	}
	what := "the initial copy"
	if st.State == stateResyncing {
		what = "the resync"
	}
	since := now.Sub(last)
	f := h.Frequency
	switch {
	case since > max(critAfter, minCritCycles*f):
		h.Level = HealthCritical
	case since > max(syncWarnAfter, warnCycles*f):
		h.Level = HealthWarning
	default:
		h.Reason = fmt.Sprintf("%s from %s: cycles follow it", st.State, st.Primary)
		return h
	}
	h.Reason = fmt.Sprintf("no piece of %s from %s since %s (%s ago)", what, st.Primary, last.UTC().Format(time.RFC3339), since.Round(time.Second))
	if st.Held != nil {
		h.Reason = fmt.Sprintf("no cycle for %s from %s since %s (%s ago; its pieces are here, held for cycle %d)",
			what, st.Primary, last.UTC().Format(time.RFC3339), since.Round(time.Second), st.Held.ConsistentAt)
	}
	return h
}

// noteSync keeps the health bookkeeping of a sync in an update from prev
// to next at now: when it last made progress (began, committed a piece,
// or staged a cycle its held pieces wait for).
func noteSync(prev, next *replicaState, now time.Time) {
	switch {
	case next.Sync == nil:
		next.LastPieceAt = time.Time{}
	case prev.Sync == nil || prev.Sync.Gen != next.Sync.Gen,
		next.Sync.doneCount() > prev.Sync.doneCount(),
		next.Held != nil && (prev.Held == nil || len(next.Held.Cycles) > len(prev.Held.Cycles)):
		next.LastPieceAt = now.UTC()
	}
}

// noteCycle keeps the health bookkeeping of an update from prev to next
// at now: when a cycle was last applied and the spacing of the barriers.
func noteCycle(prev, next *replicaState, now time.Time) {
	applied := next.Applied != prev.Applied
	if applied || next.State != prev.State || (prev.Failover != nil && next.Failover == nil) {
		next.LastCycleAt = now.UTC()
	}
	if applied && next.Applied == prev.Applied+1 && !prev.AppliedAt.IsZero() && next.AppliedAt.After(prev.AppliedAt) {
		next.Gaps = append(next.Gaps, next.AppliedAt.Sub(prev.AppliedAt))
		if n := len(next.Gaps); n > maxGaps {
			next.Gaps = next.Gaps[n-maxGaps:]
		}
	}
}
