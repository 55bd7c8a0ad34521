package ship

import (
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// States and healths of Status.
const (
	StateInitialCopy    = "initial-copy"
	StateReplicating    = "replicating"
	StatePaused         = "paused"
	StateResyncRequired = "resync-required"
	StateResyncing      = "resyncing"
	StateError          = "error"

	HealthNormal   = "normal"
	HealthWarning  = "warning"
	HealthCritical = "critical"
)

// Status is the replication status of one VM (vdrepl's Measure-VMReplication).
type Status struct {
	VM      string `json:"vm"`
	Replica string `json:"replica"`
	State   string `json:"state"`
	Health  string `json:"health"`
	Reason  string `json:"reason,omitempty"`
	// LastApplied is the last cycle the replica applied; LastAppliedSealed
	// its barrier time, LastAppliedAt when the replica answered.
	LastApplied       uint64    `json:"last_applied_cycle"`
	LastAppliedSealed time.Time `json:"last_applied_sealed,omitzero"`
	LastAppliedAt     time.Time `json:"last_applied_at,omitzero"`
	// Committing is the cycle the replica is applying now: uploaded whole,
	// its commit sent and not yet answered (the next cycle is uploaded
	// meanwhile). It counts as applied only once the replica answered.
	Committing uint64 `json:"committing_cycle,omitempty"`
	// OldestUnshipped is the barrier time of the oldest closed cycle not yet
	// on the replica.
	OldestUnshipped time.Time   `json:"oldest_unshipped,omitzero"`
	LastError       string      `json:"last_error,omitempty"`
	LastErrorAt     time.Time   `json:"last_error_at,omitzero"`
	NextRetry       time.Time   `json:"next_retry,omitzero"`
	NextResync      time.Time   `json:"next_resync,omitzero"` // when the resync window opens
	Sync            *SyncStatus `json:"sync,omitempty"`
	// Forecast is a sentence about what comes next, where one can be made:
	// "journal full in 3h at the current rate", "initial copy done in 40m".
	Forecast string `json:"forecast,omitempty"`
	// LastAppConsistent is the barrier of the last application-consistent
	// cycle; QuiesceError why the last quiesce failed, if it did.
	LastAppConsistent time.Time `json:"last_app_consistent,omitzero"`
	QuiesceError      string    `json:"quiesce_error,omitempty"`
	// Verify is the verify under way; LastVerify the last one that
	// finished (verify.go).
	Verify     *VerifyProgress `json:"verify,omitempty"`
	LastVerify *LastVerify     `json:"last_verify,omitempty"`
	// Verified is the last cycle at whose barrier the replica found its
	// block-tree roots equal to the primary's ("verified at cycle N"); 0
	// when none was. Diverged is set while the replica reports that its
	// roots differed (divergence.go): a resync repairs it.
	Verified uint64           `json:"verified_cycle,omitempty"`
	Diverged *wire.Divergence `json:"diverged,omitempty"`
	Metrics  Metrics          `json:"metrics"`
}

// SyncStatus is an initial copy or resync under way.
type SyncStatus struct {
	Kind    string `json:"kind"` // wire.KindFull or wire.KindResync
	Gen     uint64 `json:"gen"`
	Base    uint64 `json:"base"`
	Reason  string `json:"reason,omitempty"`
	Offline string `json:"offline,omitempty"`
	Pieces  int64  `json:"pieces"`
	Done    int64  `json:"pieces_done"`
}

// Metrics are Status's figures as numbers, for Prometheus: every field is
// a gauge or (Total) a counter.
type Metrics struct {
	Health           int     `json:"health"` // 0 normal, 1 warning, 2 critical
	LagSeconds       float64 `json:"lag_seconds"`
	FrequencySeconds float64 `json:"frequency_seconds"`
	// PendingBytes and PendingCycles are what is written but not yet on
	// the replica: the journal bytes kept for it (record headers included),
	// and the closed cycles not yet applied plus the open cycle once it
	// holds a write, a trim or a zero.
	PendingBytes        int64   `json:"pending_bytes"`
	PendingCycles       int     `json:"pending_cycles"`
	JournalCapBytes     int64   `json:"journal_cap_bytes"`
	CyclesShippedTotal  int64   `json:"cycles_shipped_total"`
	CyclesMissedTotal   int64   `json:"cycles_missed_total"`
	CycleWireBytesTotal int64   `json:"cycle_wire_bytes_total"`
	AvgCycleWireBytes   float64 `json:"avg_cycle_wire_bytes"`
	MaxCycleWireBytes   int64   `json:"max_cycle_wire_bytes"`
	AvgLatencySeconds   float64 `json:"avg_latency_seconds"`
	MaxLatencySeconds   float64 `json:"max_latency_seconds"`
	SyncWireBytesTotal  int64   `json:"sync_wire_bytes_total"`
	RetriesTotal        int64   `json:"retries_total"`
	SyncDoneBytes       int64   `json:"sync_done_bytes"`
	SyncTotalBytes      int64   `json:"sync_total_bytes"`
	SyncRate            float64 `json:"sync_rate_bytes_per_second"`
	SyncETASeconds      float64 `json:"sync_eta_seconds"`
	// SyncReadBytesTotal are the disk bytes syncs read from the primary's
	// images; UnverifiedCyclesTotal the cycles shipped without block-tree
	// roots.
	SyncReadBytesTotal    int64 `json:"sync_read_bytes_total"`
	UnverifiedCyclesTotal int64 `json:"unverified_cycles_total"`
}

// Status reports the replication state and figures.
func (s *Shipper) Status() Status {
	js := s.j.Stats()
	cycles := s.j.Cycles()
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{
		VM: s.cfg.VM, Replica: s.cfg.Replica,
		LastApplied: s.st.Applied, LastAppliedSealed: s.st.AppliedSealed, LastAppliedAt: s.st.AppliedAt,
		Committing: s.committing,
		LastError:  s.lastErr, LastErrorAt: s.lastErrAt,
		LastAppConsistent: s.st.LastAppConsistent, QuiesceError: s.st.QuiesceError,
	}
	st.State, st.Reason = s.stateLocked(js)
	s.verifyStatusLocked(&st)
	st.Verified = s.st.Verified
	if d := s.st.Diverged; d != nil {
		c := *d
		st.Diverged = &c
	}
	if s.stopped == nil && now.Before(s.retryAt) {
		st.NextRetry = s.retryAt
	}
	if s.waiting == "window" {
		st.NextResync = s.waitUntil
	}
	if len(cycles) > 0 {
		st.OldestUnshipped = cycles[0].Sealed
	}
	c := s.st.Counters
	m := &st.Metrics
	m.FrequencySeconds = s.cfg.Frequency.Seconds()
	if !s.st.AppliedSealed.IsZero() {
		m.LagSeconds = max(now.Sub(s.st.AppliedSealed), 0).Seconds()
	}
	m.PendingBytes, m.PendingCycles, m.JournalCapBytes = js.RetainedBytes, len(cycles), js.Cap
	if js.OpenChanged {
		m.PendingCycles++ // written, not yet sealed: pending as much as a closed one
	}
	m.CyclesShippedTotal, m.CyclesMissedTotal = c.Shipped, c.Missed
	m.CycleWireBytesTotal, m.MaxCycleWireBytes = c.WireBytes, c.MaxCycleWire
	m.MaxLatencySeconds = c.MaxLatency.Seconds()
	if c.Shipped > 0 {
		m.AvgCycleWireBytes = float64(c.WireBytes) / float64(c.Shipped)
		m.AvgLatencySeconds = c.Latency.Seconds() / float64(c.Shipped)
	}
	m.SyncWireBytesTotal, m.RetriesTotal = c.SyncBytes, c.Retries
	m.SyncReadBytesTotal, m.UnverifiedCyclesTotal = c.SyncReadBytes, c.UnverifiedCycles

	if rec := s.st.Sync; rec != nil {
		st.Sync = &SyncStatus{Kind: rec.Kind, Gen: rec.Gen, Base: rec.Base, Reason: rec.Reason,
			Offline: rec.Offline, Pieces: rec.Pieces, Done: s.prog.doneCount}
		m.SyncDoneBytes, m.SyncTotalBytes = s.prog.done, s.prog.total
		if el := now.Sub(s.prog.started).Seconds(); el > 0 && s.prog.done > s.prog.startDone {
			m.SyncRate = float64(s.prog.done-s.prog.startDone) / el
			m.SyncETASeconds = float64(s.prog.total-s.prog.done) / m.SyncRate
			st.Forecast = fmt.Sprintf("%s done in %s", syncWhat(rec.Kind), approx(time.Duration(m.SyncETASeconds*float64(time.Second))))
		}
	}

	// Warning when replication falls behind or is paused (as Hyper-V
	// shows it): a retry is pending or running, a resync is due, the
	// replica diverged, or the oldest closed cycle not yet on the replica was sealed
	// more than two cycles ago (the newest unshipped one is at most one
	// cycle old while seals go on, so it would never tell).
	switch {
	case s.stopped != nil:
		st.Health = HealthCritical
	case st.State == StateResyncRequired || st.State == StatePaused ||
		s.st.Resync != nil || js.ResyncRequired || s.st.Diverged != nil ||
		!s.retryAt.IsZero() || // a retry is scheduled or under way
		(len(cycles) > 0 && now.Sub(cycles[0].Sealed) > 2*s.cfg.Frequency):
		st.Health = HealthWarning
	default:
		st.Health = HealthNormal
	}
	m.Health = map[string]int{HealthNormal: 0, HealthWarning: 1, HealthCritical: 2}[st.Health]

	if st.Forecast == "" && js.Cap > 0 && len(s.samples) >= 2 {
		first, last := s.samples[0], s.samples[len(s.samples)-1]
		if dt := last.t.Sub(first.t).Seconds(); dt > 0 && last.bytes > first.bytes && js.RetainedBytes < js.Cap {
			rate := float64(last.bytes-first.bytes) / dt
			eta := time.Duration(float64(js.Cap-js.RetainedBytes) / rate * float64(time.Second))
			st.Forecast = fmt.Sprintf("journal full in %s at the current rate", approx(eta))
		}
	}
	return st
}

// stateLocked is the state and its reason.
func (s *Shipper) stateLocked(js journal.Stats) (string, string) {
	rec := s.st.Sync
	switch {
	case s.st.Paused:
		switch {
		case s.st.Resync != nil:
			return StatePaused, "paused by the admin; a resync will follow: " + s.st.Resync.Reason
		case js.ResyncReason != "":
			return StatePaused, "paused by the admin; a resync will follow: " + js.ResyncReason
		case js.ResyncRequired:
			return StatePaused, "paused by the admin; the journal passed its cap, so a resync will follow"
		}
		return StatePaused, "paused by the admin"
	case s.stopped != nil:
		return StateError, s.stopped.Error()
	case rec != nil && rec.Kind == wire.KindFull:
		if s.waiting == "import" {
			return StateInitialCopy, "waiting for the replica to import the offline copy in " + rec.Offline
		}
		return StateInitialCopy, rec.Reason
	case rec != nil:
		return StateResyncing, rec.Reason
	case !s.st.InitialDone:
		if s.waiting == "at" {
			return StateInitialCopy, "initial copy scheduled for " + s.waitUntil.Format(time.RFC3339)
		}
		return StateInitialCopy, "initial copy not begun"
	case s.st.Resync != nil || js.ResyncRequired:
		why := "the journal passed its cap"
		switch {
		case s.st.Resync != nil:
			why = s.st.Resync.Reason
		case js.ResyncReason != "":
			why = js.ResyncReason
		}
		if s.waiting == "window" {
			why += "; waiting for the resync window " + s.window.String()
		}
		return StateResyncRequired, why
	case !s.retryAt.IsZero() && s.lastErr != "":
		return StateReplicating, "retrying after: " + s.lastErr
	}
	return StateReplicating, ""
}

// notifyState calls Events.StateChanged when the state or reason changed.
func (s *Shipper) notifyState() {
	js := s.j.Stats()
	s.mu.Lock()
	state, why := s.stateLocked(js)
	changed := state != s.lastState || why != s.lastWhy
	s.lastState, s.lastWhy = state, why
	s.mu.Unlock()
	if !changed {
		return
	}
	s.log.Info("replication state", "state", state, "reason", why)
	if f := s.cfg.Events.StateChanged; f != nil {
		f(state, why)
	}
}

// approx renders a duration for people: "45s", "40m", "3h10m", "2d4h".
func approx(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()+0.5))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()+0.5))
	case d < 48*time.Hour:
		d = d.Round(time.Minute)
		h, m := int(d.Hours()), int(d.Minutes())%60
		if m == 0 {
			return fmt.Sprintf("%dh", h)
		}
		return fmt.Sprintf("%dh%dm", h, m)
	}
	d = d.Round(time.Hour)
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}
