package main

import (
	"bytes"
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/ship"
)

// The human status names the cycle whose commit is in flight, beside the
// last one applied; with none in flight it says nothing of it.
func TestPrintReplicationCommitting(t *testing.T) {
	render := func(committing uint64) string {
		app := newApp()
		var out bytes.Buffer
		app.Writer = &out
		st := control.ReplicationStatus{VM: "vm1", Role: "primary"}
		st.Spec.Replica = "replica:8443"
		st.Spec.Frequency = control.Duration(30 * time.Second)
		st.Status = ship.Status{VM: "vm1", State: "replicating", Health: ship.HealthNormal,
			LastApplied: 41, LastAppliedSealed: time.Now(), Committing: committing}
		printReplication(cli.NewContext(app, flag.NewFlagSet("status", flag.ContinueOnError), nil),
			control.Replication{Primaries: []control.ReplicationStatus{st}}, false)
		return out.String()
	}
	out := render(42)
	if !strings.Contains(out, "last applied: cycle 41") || !strings.Contains(out, "applying:     cycle 42 ") {
		t.Errorf("status with cycle 42 in flight:\n%s", out)
	}
	if out := render(0); strings.Contains(out, "applying:") {
		t.Errorf("status with nothing in flight:\n%s", out)
	}
}
