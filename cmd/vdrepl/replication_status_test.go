package main

import (
	"bytes"
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/ship"
)

// renderReplication is printReplication's text for r.
func renderReplication(r control.Replication) string {
	app := newApp()
	var out bytes.Buffer
	app.Writer = &out
	printReplication(cli.NewContext(app, flag.NewFlagSet("status", flag.ContinueOnError), nil), r, false)
	return out.String()
}

// Issue 15 item 8: a lag far past the frequency is not an "RPO achieved".
func TestPrintPrimaryCurrentRPO(t *testing.T) {
	st := control.ReplicationStatus{VM: "vm1", Role: "primary"}
	st.Spec.Replica = "replica:8443"
	st.Spec.Frequency = control.Duration(30 * time.Second)
	st.Status = ship.Status{VM: "vm1", State: "replicating", Health: ship.HealthCritical,
		LastApplied: 41, LastAppliedSealed: time.Now().Add(-85 * time.Second), Metrics: ship.Metrics{LagSeconds: 85}}
	out := renderReplication(control.Replication{Primaries: []control.ReplicationStatus{st}})
	if !strings.Contains(out, "  lag:          current RPO 1m25s, target 30s\n") || strings.Contains(out, "achieved") {
		t.Errorf("status of a VM 85s behind at 30s:\n%s", out)
	}
}

// Issue 15 item 5: a replica VM failed over on this host does not read
// "replicating".
func TestPrintReplicaFailedOver(t *testing.T) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	rep := control.ReplicaStatus{Role: "replica", Replica: wire.Replica{VM: "vm1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true,
		FailedOver: &wire.FailedOver{Kind: "unplanned", Point: "7", Latest: 9, At: at}}}
	out := renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}})
	want := "  state:        failed over (unplanned) to recovery point 7 at " + at.Local().Format("2006-01-02 15:04:05 MST") + "; takes no data from p1\n"
	if !strings.Contains(out, want) || strings.Contains(out, "replicating") || strings.Contains(out, "consistent: true") {
		t.Errorf("status of a failed-over replica VM, want %q:\n%s", want, out)
	}
}

// Issue 15 item 4: the replica's health, with since when no cycle came.
func TestPrintReplicaHealth(t *testing.T) {
	rep := control.ReplicaStatus{Role: "replica", Replica: wire.Replica{VM: "vm1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true},
		Health: "warning", HealthReason: "no cycle from p1 since 2026-03-01T12:00:00Z (1m14s ago, frequency 30s)", FrequencySeconds: 30}
	out := renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}})
	if !strings.Contains(out, "  health:       warning: no cycle from p1 since 2026-03-01T12:00:00Z (1m14s ago, frequency 30s)\n") {
		t.Errorf("status of a replica VM without cycles:\n%s", out)
	}
	rep.Health, rep.HealthReason, rep.LastCycleAt = "normal", "", time.Now().Add(-10*time.Second)
	out = renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}})
	if !strings.Contains(out, "  health:       normal (last cycle applied 10s ago, frequency 30s)\n") {
		t.Errorf("status of a healthy replica VM:\n%s", out)
	}
}
