package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestCLITestFailoverListed: issue 15 item 16. On the replica host a
// running test failover shows in `replication status VM` and its exports
// in `vm list`, text and JSON; once stopped, neither mentions it.
func TestCLITestFailoverListed(t *testing.T) {
	_, rep, _ := replicatingPair(t)
	type replicaJSON struct {
		Replicas []struct {
			VM           string `json:"vm"`
			Consistent   bool   `json:"consistent"`
			TestFailover *struct {
				Exports []string `json:"exports"`
			} `json:"test_failover"`
		} `json:"replicas"`
	}
	status := func() replicaJSON {
		t.Helper()
		var r replicaJSON
		if err := json.Unmarshal([]byte(rep.cli("replication", "status", "web1", "--json")), &r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, _, err := rep.try("replication", "status", "web1")
		if err == nil {
			if r := status(); len(r.Replicas) == 1 && r.Replicas[0].Consistent {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("web1 is not consistent on the replica after 60s")
		}
	}
	if r := status(); r.Replicas[0].TestFailover != nil {
		t.Errorf("test_failover before any test: %+v", r.Replicas[0].TestFailover)
	}
	rep.cli("failover", "test", "web1")

	if out := rep.cli("replication", "status", "web1"); !strings.Contains(out, "  test failover: ") || !strings.Contains(out, ", exports web1-test/root\n") {
		t.Errorf("replication status web1 during a test failover:\n%s", out)
	}
	if r := status(); len(r.Replicas) != 1 || r.Replicas[0].TestFailover == nil || !slices.Equal(r.Replicas[0].TestFailover.Exports, []string{"web1-test/root"}) {
		t.Errorf("replication status web1 --json during a test failover: %+v", r)
	}
	if out := rep.cli("vm", "list"); !strings.Contains(out, "\nweb1-test/root ") {
		t.Errorf("vm list during a test failover:\n%s", out)
	}
	var vms []struct {
		Name        string   `json:"name"`
		TestExports []string `json:"test_exports"`
	}
	if err := json.Unmarshal([]byte(rep.cli("vm", "list", "--json")), &vms); err != nil || len(vms) != 1 || vms[0].Name != "web1" || !slices.Equal(vms[0].TestExports, []string{"web1-test/root"}) {
		t.Errorf("vm list --json during a test failover: %+v (%v)", vms, err)
	}

	rep.cli("failover", "stop-test", "web1")
	if r := status(); r.Replicas[0].TestFailover != nil {
		t.Errorf("test_failover after stop-test: %+v", r.Replicas[0].TestFailover)
	}
	if out := rep.cli("vm", "list", "--json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("vm list --json after stop-test: %s", out)
	}
}
