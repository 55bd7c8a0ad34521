package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

// replicaEvents counts what the replica role reports as it happens (the
// collector reads everything else from Status at each scrape). A rejected
// request carries no vm label: the name comes from a request that was not
// authorized, and a label per name sent would let anyone grow the series.
type replicaEvents struct {
	applied   *prometheus.CounterVec
	rejected  prometheus.Counter
	corrupt   *prometheus.CounterVec
	syncs     *prometheus.CounterVec
	recovered *prometheus.CounterVec
}

func newReplicaEvents() *replicaEvents {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, []string{"vm"})
	}
	return &replicaEvents{
		applied:   vec("vdrepl_replica_cycles_applied_total", "replica role: cycles applied to the VM's images"),
		rejected:  prometheus.NewCounter(prometheus.CounterOpts{Name: "vdrepl_replica_rejected_requests_total", Help: "replica role: requests refused for lack of authorization"}),
		corrupt:   vec("vdrepl_replica_corrupt_uploads_total", "replica role: uploads or staged streams that failed verification"),
		syncs:     vec("vdrepl_replica_syncs_finished_total", "replica role: initial copies and resyncs completed"),
		recovered: vec("vdrepl_replica_applies_recovered_total", "replica role: applies interrupted by a crash or an I/O error, then finished"),
	}
}

// events is the apply.Events that feed the counters.
func (e *replicaEvents) events() apply.Events {
	return apply.Events{
		CycleApplied: func(vm string, _ uint64) { e.applied.WithLabelValues(vm).Inc() },
		Rejected:     func(_, _, _ string) { e.rejected.Inc() },
		Corrupt:      func(vm, _ string, _ error) { e.corrupt.WithLabelValues(vm).Inc() },
		SyncFinished: func(vm string, _ uint64) { e.syncs.WithLabelValues(vm).Inc() },
		Recovered:    func(vm, _ string) { e.recovered.WithLabelValues(vm).Inc() },
	}
}

func (e *replicaEvents) collectors() []prometheus.Collector {
	return []prometheus.Collector{e.applied, e.rejected, e.corrupt, e.syncs, e.recovered}
}

// shipEvents counts what each VM's shipper reports as it happens: the
// spread of seal-to-applied latency (status keeps only its average and
// maximum) and the changes of replication state (a VM that flaps between
// states shows here, not in a gauge read at scrape time).
type shipEvents struct {
	latency *prometheus.HistogramVec
	changes *prometheus.CounterVec
}

func newShipEvents() *shipEvents {
	return &shipEvents{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vdrepl_replication_cycle_latency_seconds",
			Help:    "time from a cycle's seal to the replica's answer that it is applied",
			Buckets: []float64{0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600},
		}, []string{"vm"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vdrepl_replication_state_changes_total",
			Help: "changes of the VM's replication state, by the state entered",
		}, []string{"vm", "state"}),
	}
}

// events is the ship.Events of one VM's shipper.
func (e *shipEvents) events(vm string) ship.Events {
	return ship.Events{
		CycleShipped: func(_ journal.CycleInfo, _ int64, latency time.Duration) {
			e.latency.WithLabelValues(vm).Observe(latency.Seconds())
		},
		StateChanged: func(state, _ string) { e.changes.WithLabelValues(vm, state).Inc() },
	}
}

func (e *shipEvents) collectors() []prometheus.Collector {
	return []prometheus.Collector{e.latency, e.changes}
}

// forget drops the series of vm, whose replication ended: a removed or
// disabled VM leaves no stale histogram behind until the next restart.
func (e *shipEvents) forget(vm string) {
	e.latency.DeletePartialMatch(prometheus.Labels{"vm": vm})
	e.changes.DeletePartialMatch(prometheus.Labels{"vm": vm})
}
