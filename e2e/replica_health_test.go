package e2e

import (
	"encoding/json"
	"strings"
	"testing"
)

// replicaHealth is a replica VM in `replication status --json` on the
// replica host.
type replicaHealth struct {
	State        string `json:"state"`
	Applied      uint64 `json:"applied"`
	Health       string `json:"health"`
	HealthReason string `json:"health_reason"`
}

func (h *host) replicaHealth(vm string) replicaHealth {
	h.t.Helper()
	var s struct {
		Replicas []replicaHealth `json:"replicas"`
	}
	if err := json.Unmarshal([]byte(h.run("replication", "status", vm, "--json")), &s); err != nil || len(s.Replicas) != 1 {
		h.t.Fatalf("replication status %s --json: %v %+v", vm, err, s)
	}
	return s.Replicas[0]
}

// TestReplicaHealthStatusAfterPrimaryKilled (issue 15 items 4 and 5): the
// primary dies; the replica's status, `vdrepl status` and `doctor` there
// turn critical and say since when no cycle came; after an unplanned
// failover it reads "failed-over" and no longer waits for cycles.
func TestReplicaHealthStatusAfterPrimaryKilled(t *testing.T) {
	p := newPair(t)
	p.prim.addVM("vm1", "8M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1s")
	p.prim.run("replication", "sync", "vm1")
	first := p.rep.replicaHealth("vm1").Applied
	// A few cycles one after the other teach the replica the frequency.
	waitFor(t, "cycles applied every second", func() bool {
		r := p.rep.replicaHealth("vm1")
		return r.Applied >= first+4 && r.Health == "normal" && r.State == "replicating"
	})
	p.prim.kill()
	waitFor(t, "replica health critical", func() bool { return p.rep.replicaHealth("vm1").Health == "critical" })
	r := p.rep.replicaHealth("vm1")
	if !strings.HasPrefix(r.HealthReason, "no cycle from primary.test since ") {
		t.Errorf("health reason %q", r.HealthReason)
	}
	if out := p.rep.run("replication", "status", "vm1"); !strings.Contains(out, "health:       critical: no cycle from primary.test since ") {
		t.Errorf("replication status on the replica:\n%s", out)
	}
	if out := p.rep.run("status"); !strings.Contains(out, "warning: replica VM vm1: health critical: no cycle from primary.test since ") {
		t.Errorf("vdrepl status on the replica:\n%s", out)
	}
	out, _, err := p.rep.try("doctor")
	if err == nil || !strings.Contains(out, "replica-health") || !strings.Contains(out, "no cycle from primary.test since") ||
		!strings.Contains(out, "check the primary host primary.test and `vdrepl doctor` there") {
		t.Errorf("doctor on the replica (err %v):\n%s", err, out)
	}

	p.rep.run("failover", "unplanned", "vm1")
	r = p.rep.replicaHealth("vm1")
	if r.State != "failed-over" || r.Health != "normal" {
		t.Errorf("after the failover: %+v", r)
	}
	if out := p.rep.run("replication", "status", "vm1"); !strings.Contains(out, "state:        failed over (unplanned) to the latest state at ") || strings.Contains(out, "replicating") {
		t.Errorf("replication status after the failover:\n%s", out)
	}
}
