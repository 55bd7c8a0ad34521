package daemon

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vdrepl/vdrepl/apply"
)

// collector exports the daemon's replication and journal figures to
// Prometheus. It reads the same Status the CLI shows at every scrape, so the
// two never disagree and nothing is counted twice.
type collector struct {
	d    *Daemon
	desc map[string]*prometheus.Desc
}

// metricHelp names every metric; label "vm" on all of them.
var metricHelp = map[string]string{
	"vdrepl_replication_health":                     "0 normal, 1 warning (a cycle is late, a retry or resync is due), 2 critical (stopped, needs an admin)",
	"vdrepl_replication_lag_seconds":                "age of the newest barrier on the replica: the RPO achieved",
	"vdrepl_replication_frequency_seconds":          "configured cycle frequency",
	"vdrepl_replication_pending_bytes":              "journal bytes kept for what is written but not yet on the replica: closed cycles not yet applied and the open cycle",
	"vdrepl_replication_pending_cycles":             "cycles not yet on the replica: closed ones not yet applied, plus the open one once written to",
	"vdrepl_replication_last_applied_cycle":         "the last cycle the replica applied",
	"vdrepl_replication_cycles_shipped_total":       "cycles shipped and applied",
	"vdrepl_replication_cycles_missed_total":        "intervals whose cycle could not ship in time",
	"vdrepl_replication_cycle_wire_bytes_total":     "bytes sent for cycles",
	"vdrepl_replication_cycle_wire_bytes_max":       "largest cycle sent, bytes",
	"vdrepl_replication_ship_latency_seconds_avg":   "average time from seal to applied",
	"vdrepl_replication_sync_wire_bytes_total":      "bytes sent for initial copies and resyncs",
	"vdrepl_replication_retries_total":              "recoverable errors retried",
	"vdrepl_replication_sync_done_bytes":            "initial copy or resync progress",
	"vdrepl_replication_sync_total_bytes":           "initial copy or resync size",
	"vdrepl_replication_state":                      "1 for the VM's current state (label state)",
	"vdrepl_journal_bytes":                          "journal size on disk",
	"vdrepl_journal_cap_bytes":                      "journal cap",
	"vdrepl_journal_resync_required":                "1 when the journal passed its cap and a resync is required",
	"vdrepl_replica_applied_cycle":                  "replica role: last cycle applied for the VM",
	"vdrepl_replica_consistent":                     "replica role: 1 when the image equals the primary at the applied barrier",
	"vdrepl_replica_applied_barrier_age_seconds":    "replica role: age of the applied barrier",
	"vdrepl_certificate_expiry_seconds":             "seconds until this host's certificate expires",
	"vdrepl_replication_configured_vms":             "VMs this host replicates as primary",
	"vdrepl_replica_vms":                            "VMs this host keeps replicas of",
	"vdrepl_journal_failed":                         "1 when the VM's journal stopped on an I/O error",
	"vdrepl_replication_cycle_wire_bytes_avg":       "average cycle sent, bytes",
	"vdrepl_replication_ship_latency_seconds_max":   "longest time from seal to applied",
	"vdrepl_replication_sync_rate_bytes_per_second": "initial copy or resync rate",
	"vdrepl_replica_recovery_points":                "replica role: recovery points kept besides the latest state",
	"vdrepl_replica_recovery_point_bytes":           "replica role: undo data the recovery points take",
	"vdrepl_replica_failed_over":                    "replica role: 1 while the VM is failed over on this host",
	"vdrepl_replication_sync_read_bytes_total":      "bytes initial copies and resyncs read from the primary's images (a block-tree resync reads only what differs)",
	"vdrepl_replication_unverified_cycles_total":    "cycles shipped without the primary's block-tree roots (its tree was being built), so the replica could not check them",
	"vdrepl_replication_verified_cycle":             "the last cycle whose block-tree roots the replica found equal to the primary's",
	"vdrepl_replication_diverged":                   "1 while the replica reports that its block-tree roots after a cycle differed from the primary's; a resync repairs it",
	"vdrepl_replica_diverged":                       "replica role: 1 when the replica's block-tree roots after a cycle differed from the primary's at its barrier, until a resync repairs it",
	"vdrepl_replica_verified_cycle":                 "replica role: the last cycle whose block-tree roots equalled the primary's at its barrier",
	"vdrepl_replica_health":                         "replica role: 0 normal, 1 warning (no cycle applied for more than 2 x frequency), 2 critical (more than 6 x frequency or 1 hour, but not before 3 x frequency); in an initial copy or resync, by the time since its last piece",
	"vdrepl_verify_last_timestamp_seconds":          "when the last vdrepl verify of the VM finished (unix time)",
	"vdrepl_verify_last_mismatch_blocks":            "4 KiB blocks the last vdrepl verify found different on the replica",
	"vdrepl_vm_fenced":                              "1 while the VM is fenced: failed over on its replica host while this host was away, served read-only here",
}

func newCollector(d *Daemon) *collector {
	c := &collector{d: d, desc: map[string]*prometheus.Desc{}}
	for name, help := range metricHelp {
		labels := []string{"vm"}
		switch name {
		case "vdrepl_replication_state":
			labels = []string{"vm", "state"}
		case "vdrepl_certificate_expiry_seconds", "vdrepl_replication_configured_vms", "vdrepl_replica_vms":
			labels = nil
		}
		c.desc[name] = prometheus.NewDesc(name, help, labels, nil)
	}
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.desc {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.desc[name], prometheus.GaugeValue, v, labels...)
	}
	counter := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.desc[name], prometheus.CounterValue, v, labels...)
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for _, v := range c.d.VMs() {
		if !v.ReplicaOnly {
			gauge("vdrepl_vm_fenced", b2f(v.Fenced != nil), v.Name)
		}
		if j := v.Journal; j != nil {
			gauge("vdrepl_journal_bytes", float64(j.JournalBytes), v.Name)
			gauge("vdrepl_journal_cap_bytes", float64(j.Cap), v.Name)
			gauge("vdrepl_journal_resync_required", b2f(j.ResyncRequired), v.Name)
			gauge("vdrepl_journal_failed", b2f(j.Failed != ""), v.Name)
		}
	}
	r, _ := c.d.ReplicationStatus("")
	gauge("vdrepl_replication_configured_vms", float64(len(r.Primaries)))
	gauge("vdrepl_replica_vms", float64(len(r.Replicas)))
	for _, p := range r.Primaries {
		m := p.Status.Metrics
		gauge("vdrepl_replication_health", float64(m.Health), p.VM)
		gauge("vdrepl_replication_lag_seconds", m.LagSeconds, p.VM)
		gauge("vdrepl_replication_frequency_seconds", time.Duration(p.Spec.Frequency).Seconds(), p.VM)
		gauge("vdrepl_replication_pending_bytes", float64(m.PendingBytes), p.VM)
		gauge("vdrepl_replication_pending_cycles", float64(m.PendingCycles), p.VM)
		gauge("vdrepl_replication_last_applied_cycle", float64(p.Status.LastApplied), p.VM)
		counter("vdrepl_replication_cycles_shipped_total", float64(m.CyclesShippedTotal), p.VM)
		counter("vdrepl_replication_cycles_missed_total", float64(m.CyclesMissedTotal), p.VM)
		counter("vdrepl_replication_cycle_wire_bytes_total", float64(m.CycleWireBytesTotal), p.VM)
		gauge("vdrepl_replication_cycle_wire_bytes_avg", m.AvgCycleWireBytes, p.VM)
		gauge("vdrepl_replication_cycle_wire_bytes_max", float64(m.MaxCycleWireBytes), p.VM)
		gauge("vdrepl_replication_ship_latency_seconds_avg", m.AvgLatencySeconds, p.VM)
		gauge("vdrepl_replication_ship_latency_seconds_max", m.MaxLatencySeconds, p.VM)
		counter("vdrepl_replication_sync_wire_bytes_total", float64(m.SyncWireBytesTotal), p.VM)
		counter("vdrepl_replication_sync_read_bytes_total", float64(m.SyncReadBytesTotal), p.VM)
		counter("vdrepl_replication_unverified_cycles_total", float64(m.UnverifiedCyclesTotal), p.VM)
		gauge("vdrepl_replication_verified_cycle", float64(p.Verified), p.VM)
		gauge("vdrepl_replication_diverged", b2f(p.Diverged != nil), p.VM)
		counter("vdrepl_replication_retries_total", float64(m.RetriesTotal), p.VM)
		gauge("vdrepl_replication_sync_done_bytes", float64(m.SyncDoneBytes), p.VM)
		gauge("vdrepl_replication_sync_total_bytes", float64(m.SyncTotalBytes), p.VM)
		gauge("vdrepl_replication_sync_rate_bytes_per_second", m.SyncRate, p.VM)
		gauge("vdrepl_replication_state", 1, p.VM, p.Status.State)
		verifyMetrics(gauge, p)
	}
	now := time.Now()
	for _, rep := range r.Replicas {
		gauge("vdrepl_replica_applied_cycle", float64(rep.Applied), rep.VM)
		gauge("vdrepl_replica_consistent", b2f(rep.Consistent), rep.VM)
		gauge("vdrepl_replica_recovery_points", float64(rep.Points), rep.VM)
		gauge("vdrepl_replica_recovery_point_bytes", float64(rep.PointBytes), rep.VM)
		gauge("vdrepl_replica_failed_over", b2f(rep.FailedOver != nil), rep.VM)
		gauge("vdrepl_replica_health", replicaHealthValue(rep.Health), rep.VM)
		gauge("vdrepl_replica_diverged", b2f(rep.Diverged != nil), rep.VM)
		gauge("vdrepl_replica_verified_cycle", float64(rep.Verified), rep.VM)
		if !rep.AppliedAt.IsZero() {
			gauge("vdrepl_replica_applied_barrier_age_seconds", now.Sub(rep.AppliedAt).Seconds(), rep.VM)
		}
	}
	if id := c.d.identity; id != nil {
		gauge("vdrepl_certificate_expiry_seconds", id.Leaf().NotAfter.Sub(now).Seconds())
	}
}

// replicaHealthValue is a replica health as vdrepl_replica_health has it.
func replicaHealthValue(h string) float64 {
	switch h {
	case apply.HealthWarning:
		return 1
	case apply.HealthCritical:
		return 2
	}
	return 0
}

// serveMetrics serves /metrics on MetricsListen.
func (d *Daemon) serveMetrics(errc chan<- error) (func(), error) {
	reg := prometheus.NewRegistry()
	for _, c := range append(append(d.replicaEv.collectors(), d.shipEv.collectors()...), newCollector(d)) {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}
	l, err := net.Listen("tcp", d.cfg.MetricsListen)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", d.cfg.MetricsListen, err)
	}
	d.mu.Lock()
	d.metricsAddr = l.Addr().String()
	d.mu.Unlock()
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("metrics listener: %w", err)
		}
	}()
	d.log.Info("metrics", "listen", l.Addr().String())
	return func() { srv.Close() }, nil
}
