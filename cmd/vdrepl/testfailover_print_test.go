package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// Issue 15 item 16: `replication status VM` on the replica host shows a
// running test failover of the VM, in text and as a test_failover object
// that is absent when none runs.
func TestPrintReplicaTestFailover(t *testing.T) {
	started := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	rep := control.ReplicaStatus{Role: "replica", Replica: wire.Replica{VM: "vm1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true}}
	if out := renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}}); strings.Contains(out, "test failover") {
		t.Errorf("status without a test failover mentions one:\n%s", out)
	}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(`"test_failover"`)) {
		t.Errorf("JSON without a test failover has the key: %s", b)
	}

	rep.TestFailover = &control.TestFailoverInfo{VM: "vm1", Point: "7", Cycle: 8, Started: started,
		Exports: []string{"vm1-test/root", "vm1-test/data"}}
	out := renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}})
	want := "  test failover: point 7 (cycle 8) since " + started.Local().Format(timeZone) + ", exports vm1-test/root, vm1-test/data\n"
	if !strings.Contains(out, want) {
		t.Errorf("status with a test failover, want %q:\n%s", want, out)
	}
	rep.TestFailover.Point = ""
	if out := renderReplication(control.Replication{Replicas: []control.ReplicaStatus{rep}}); !strings.Contains(out, "  test failover: the latest state (cycle 8) since ") {
		t.Errorf("status with a test failover of the latest state:\n%s", out)
	}
	b, err = json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		TestFailover *struct {
			VM      string   `json:"vm"`
			Cycle   uint64   `json:"cycle"`
			Exports []string `json:"exports"`
		} `json:"test_failover"`
	}
	if err := json.Unmarshal(b, &got); err != nil || got.TestFailover == nil || got.TestFailover.VM != "vm1" || got.TestFailover.Cycle != 8 || len(got.TestFailover.Exports) != 2 {
		t.Errorf("JSON with a test failover: %s (%v)", b, err)
	}
}

// Issue 15 item 16: `vm list` lists the exports of a test failover, a line
// each, and its JSON has test_exports, [] when none.
func TestPrintVMsTestExports(t *testing.T) {
	vm := control.VMInfo{VMSpec: control.VMSpec{Name: "web1", Disks: []control.DiskSpec{{Name: "root", Path: "/srv/web1.img", Size: 1 << 30}}},
		Exports: []string{"web1/root"}, TestExports: []string{}}
	test := control.TestFailoverInfo{VM: "vm1", Point: "7", Cycle: 8, Exports: []string{"vm1-test/root"}}
	replicaOnly := control.VMInfo{VMSpec: control.VMSpec{Name: "vm1", Disks: []control.DiskSpec{}}, Exports: []string{},
		TestExports: test.Exports, TestFailover: &test, ReplicaOnly: true}
	var out bytes.Buffer
	if err := printVMs(&out, []control.VMInfo{vm, replicaOnly}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[1], "web1/root ") ||
		!strings.HasPrefix(lines[2], "vm1-test/root ") || !strings.HasSuffix(lines[2], "test failover of vm1 from point 7 (cycle 8)") {
		t.Errorf("vm list with a test failover:\n%s", out.String())
	}
	b, err := json.Marshal([]control.VMInfo{vm, replicaOnly})
	if err != nil {
		t.Fatal(err)
	}
	var got []map[string]json.RawMessage
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if string(got[0]["test_exports"]) != "[]" || string(got[1]["test_exports"]) != `["vm1-test/root"]` ||
		string(got[1]["replica_only"]) != "true" || got[0]["test_failover"] != nil {
		t.Errorf("vm list JSON: %s", b)
	}
}
