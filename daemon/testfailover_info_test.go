package daemon

import (
	"slices"
	"testing"

	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/snapshot"
)

// fakeTests makes d's test failovers open copies that serve nothing: of
// point 7, cycle 8, with a disk "root".
func fakeTests(d *Daemon) {
	d.tests = failover.NewTests(failover.TestsConfig[*testFailover]{StateDir: d.cfg.StateDir, Taken: d.testTaken,
		Open: func(name, id, scratch string) (*testFailover, error) {
			return &testFailover{d: d, vm: name, point: snapshot.Point{ID: "7", Cycle: 8}, disks: []string{"root"}}, nil
		}})
}

// Issue 15 item 16: VMs lists the exports of a test failover: under the VM
// when it is registered here, and as a replica-only entry when this host
// only keeps its replica; every VM has test_exports, [] when none.
func TestVMsListTestExports(t *testing.T) {
	d := newTestDaemon(t)
	fakeTests(d)
	addTestVM(t, d, "web1")
	vms := d.VMs()
	if len(vms) != 1 || vms[0].TestExports == nil || len(vms[0].TestExports) != 0 || vms[0].TestFailover != nil {
		t.Fatalf("VMs without a test failover: %+v", vms)
	}
	if tf := d.testFailoverOf("vm1"); tf != nil {
		t.Errorf("testFailoverOf with none running: %+v", tf)
	}
	if _, err := d.tests.Start("vm1", ""); err != nil {
		t.Fatal(err)
	}
	vms = d.VMs()
	if len(vms) != 2 || vms[0].Name != "web1" || len(vms[0].TestExports) != 0 {
		t.Fatalf("VMs with a test failover of replica VM vm1: %+v", vms)
	}
	v := vms[1]
	if v.Name != "vm1" || !v.ReplicaOnly || !slices.Equal(v.TestExports, []string{"vm1-test/root"}) ||
		v.TestFailover == nil || v.TestFailover.Point != "7" || v.TestFailover.Cycle != 8 || len(v.Disks) != 0 || v.Exports == nil {
		t.Errorf("vm1's entry: %+v", v)
	}
	tf := d.testFailoverOf("vm1")
	if tf == nil || !slices.Equal(tf.Exports, []string{"vm1-test/root"}) || tf.Started.IsZero() {
		t.Errorf("testFailoverOf(vm1): %+v", tf)
	}
	// status keeps its VM table to registered VMs; tests have their lines.
	if st := d.Status(); len(st.VMs) != 1 || len(st.Tests) != 1 {
		t.Errorf("Status: VMs %+v, tests %+v", st.VMs, st.Tests)
	}
}
