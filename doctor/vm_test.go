package doctor

import (
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

func TestVMReplication(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	vm := control.VMInfo{VMSpec: control.VMSpec{Name: "web1", Replication: &control.ReplicationSpec{Replica: "r:8443"}}, Journal: &journal.Stats{}}
	base := ship.Status{VM: "web1", Replica: "r:8443", State: ship.StateReplicating, Health: ship.HealthNormal, LastApplied: 7,
		LastAppliedSealed: now.Add(-20 * time.Second), LastAppliedAt: now.Add(-19 * time.Second),
		Metrics: ship.Metrics{LagSeconds: 20, FrequencySeconds: 30, JournalCapBytes: 1 << 30, PendingBytes: 1 << 20, PendingCycles: 1}}
	with := func(edit func(*ship.Status)) control.Replication {
		st := base
		edit(&st)
		return control.Replication{Primaries: []control.ReplicationStatus{{VM: "web1", Spec: *vm.Replication, Status: st}}}
	}
	type expect struct {
		check string
		sev   Severity
		words []string
	}
	for _, tc := range []struct {
		name string
		vms  []control.VMInfo
		repl control.Replication
		want []expect
	}{
		{"healthy", []control.VMInfo{vm}, with(func(*ship.Status) {}), []expect{
			{CheckVM, OK, []string{"replicating to r:8443: cycle 7"}},
			{CheckVMLag, OK, []string{"lag 20s against a frequency of 30s"}},
			{CheckVMJournal, OK, []string{"journal 0% full", "1 unshipped"}},
		}},
		{"stopped", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.State, s.Health, s.Reason = ship.StateError, ship.HealthCritical, "the replica refused: primary not on the allow-list"
		}), []expect{{CheckVM, Problem, []string{"stopped: the replica refused", "vdrepl replication resume web1"}}}},
		{"paused", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.State, s.Health, s.Reason = ship.StatePaused, ship.HealthWarning, "paused by the admin"
		}), []expect{{CheckVM, Warning, []string{"paused by the admin", "vdrepl replication resume web1"}}}},
		{"resync required", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.State, s.Health, s.Reason, s.NextResync = ship.StateResyncRequired, ship.HealthWarning, "the journal passed its cap", now.Add(time.Hour)
		}), []expect{{CheckVM, Warning, []string{"needs a resync: the journal passed its cap", "resync window", "vdrepl replication resync web1"}}}},
		{"initial copy", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.State, s.LastAppliedSealed = ship.StateInitialCopy, time.Time{}
			s.Metrics.SyncDoneBytes, s.Metrics.SyncTotalBytes, s.Forecast = 1<<30, 4<<30, "initial copy done in 3m"
		}), []expect{{CheckVM, OK, []string{"initial copy to r:8443 under way: 1.0 GiB of 4.0 GiB", "done in 3m"}}}},
		{"initial copy just below a GiB", []control.VMInfo{vm}, with(func(s *ship.Status) {
			// Sizes read as vdrepl status prints them: "1.0 GiB", not "1024.0 MiB".
			s.State, s.LastAppliedSealed = ship.StateInitialCopy, time.Time{}
			s.Metrics.SyncDoneBytes, s.Metrics.SyncTotalBytes = 1<<30-1, 4<<30-1
		}), []expect{{CheckVM, OK, []string{"under way: 1.0 GiB of 4.0 GiB"}}}},
		{"behind", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.Health, s.Reason, s.NextRetry = ship.HealthWarning, "retrying after: connection refused", now.Add(time.Minute)
			s.LastError, s.LastErrorAt = "connection refused", now.Add(-time.Second)
			s.Metrics.LagSeconds = 100
		}), []expect{
			{CheckVM, Warning, []string{"behind: retrying after: connection refused", "next try"}},
			{CheckVMLag, Warning, []string{"lag 1m40s against a frequency of 30s", "over 2 cycles"}},
			{CheckVMError, Warning, []string{"connection refused", "not followed by a cycle applied"}},
		}},
		{"far behind", []control.VMInfo{vm}, with(func(s *ship.Status) { s.Metrics.LagSeconds = 3600 }), []expect{
			{CheckVMLag, Problem, []string{"lag 1h", "over 10 cycles"}},
		}},
		{"journal filling", []control.VMInfo{vm}, with(func(s *ship.Status) { s.Metrics.PendingBytes = 950 << 20 }), []expect{
			{CheckVMJournal, Warning, []string{"journal 93% full", "--journal-cap"}},
		}},
		{"error since recovered", []control.VMInfo{vm}, with(func(s *ship.Status) {
			s.LastError, s.LastErrorAt = "timeout", now.Add(-time.Hour)
		}), []expect{{CheckVMError, OK, []string{"since recovered: timeout"}}}},
		{"journal failed", []control.VMInfo{{VMSpec: vm.VMSpec, Journal: &journal.Stats{Failed: "write: no space left on device"}}}, with(func(*ship.Status) {}), []expect{
			{CheckVMJournal, Problem, []string{"journal failed: write: no space", "free space"}},
		}},
		{"not served", []control.VMInfo{{VMSpec: control.VMSpec{Name: "web1"}, Error: "disk d0: /x.img does not exist"}}, control.Replication{}, []expect{
			{CheckVM, Problem, []string{"not served: disk d0", "restart `vdrepl serve`"}},
		}},
		{"not replicated", []control.VMInfo{{VMSpec: control.VMSpec{Name: "web1"}}}, control.Replication{}, []expect{
			{CheckVM, Warning, []string{"not replicated", "vdrepl replication enable web1"}},
		}},
		{"unknown", nil, control.Replication{}, []expect{{CheckVM, Problem, []string{"no VM and no replica of that name", "vdrepl vm list"}}}},
		{"replica here", nil, control.Replication{Replicas: []control.ReplicaStatus{{Replica: wire.Replica{VM: "web1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true}}}}, []expect{
			{CheckVM, OK, []string{`replica from "p1"`, "cycle 9", "consistent"}},
		}},
		{"replica not consistent", nil, control.Replication{Replicas: []control.ReplicaStatus{{Replica: wire.Replica{VM: "web1", Primary: "p1", State: "initial-copy"}}}}, []expect{
			{CheckVM, Warning, []string{"not consistent yet", "failover"}},
		}},
		{"replica without cycles", nil, control.Replication{Replicas: []control.ReplicaStatus{{Replica: wire.Replica{VM: "web1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true},
			Health: "warning", HealthReason: "no cycle from p1 since 2026-03-01T11:58:46Z (1m14s ago, frequency 30s)"}}}, []expect{
			{CheckReplicaHealth, Warning, []string{"no cycle from p1 since 2026-03-01T11:58:46Z", "check the primary host p1 and `vdrepl doctor` there"}},
		}},
		{"replica failed over", nil, control.Replication{Replicas: []control.ReplicaStatus{{Replica: wire.Replica{VM: "web1", Primary: "p1", State: "failed-over", Applied: 9, Consistent: true,
			FailedOver: &wire.FailedOver{Kind: "unplanned", Point: "7", Latest: 9, At: now}}, Health: "normal"}}}, []expect{
			{CheckReplicaHealth, OK, []string{"failed over on this host (unplanned) to recovery point 7", `takes no cycles from "p1"`}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := VMReplication("web1", tc.vms, tc.repl, now)
			for _, w := range tc.want {
				want(t, fs, w.check, w.sev, w.words...)
			}
		})
	}
}

// TestReplicaHealth: `vdrepl doctor` on a replica host reports each
// replica VM's health, with its cause and fix.
func TestReplicaHealth(t *testing.T) {
	reps := []control.ReplicaStatus{
		{Replica: wire.Replica{VM: "web1", Primary: "p1", State: "replicating", Consistent: true}, Health: "normal", LastCycleAt: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)},
		{Replica: wire.Replica{VM: "db1", Primary: "p2", State: "replicating", Consistent: true}, Health: "critical",
			HealthReason: "no cycle from p2 since 2026-03-01T11:00:00Z (1h0m0s ago, frequency 5m0s)"},
	}
	fs := ReplicaHealth(reps)
	if len(fs) != 2 {
		t.Fatalf("findings: %s", dump(fs))
	}
	if fs[0].Subject != "web1" || fs[0].Severity != OK || fs[0].Check != CheckReplicaHealth {
		t.Errorf("web1: %+v", fs[0])
	}
	if f := fs[1]; f.Subject != "db1" || f.Severity != Problem || f.Cause != "replica health critical: no cycle from p2 since 2026-03-01T11:00:00Z (1h0m0s ago, frequency 5m0s)" ||
		f.Fix != "check the primary host p2 and `vdrepl doctor` there (`vdrepl replication status db1` there says why cycles do not arrive)" {
		t.Errorf("db1: %+v", f)
	}
}
