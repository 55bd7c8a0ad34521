package daemon

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vdrepl/vdrepl/journal"
)

// TestReplicaEvents: every event the replica role reports moves its
// counter, as a scrape of the daemon's registry sees it.
func TestReplicaEvents(t *testing.T) {
	e := newReplicaEvents()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range e.collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	ev := e.events()
	ev.CycleApplied("vm1", 7)
	ev.CycleApplied("vm1", 8)
	ev.Rejected("anything", "peer", "not on the allow-list")
	ev.Corrupt("vm1", "c9", errors.New("checksum"))
	ev.SyncFinished("vm2", 1)
	ev.Recovered("vm2", "cycle 3")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += " " + l.GetName() + "=" + l.GetValue()
			}
			got[key] = m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{
		"vdrepl_replica_cycles_applied_total vm=vm1":    2,
		"vdrepl_replica_rejected_requests_total":        1,
		"vdrepl_replica_corrupt_uploads_total vm=vm1":   1,
		"vdrepl_replica_syncs_finished_total vm=vm2":    1,
		"vdrepl_replica_applies_recovered_total vm=vm2": 1,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (gathered %v)", k, got[k], v, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("gathered %d series, want %d: %v", len(got), len(want), got)
	}
}

// TestShipEvents: a shipped cycle lands in the latency histogram of its VM,
// and each change of state counts under the state entered.
func TestShipEvents(t *testing.T) {
	e := newShipEvents()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range e.collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	ev := e.events("vm1")
	ev.CycleShipped(journal.CycleInfo{Cycle: 3}, 4096, 1500*time.Millisecond)
	ev.CycleShipped(journal.CycleInfo{Cycle: 4}, 4096, 40*time.Second)
	ev.StateChanged("error", "forbidden")
	ev.StateChanged("replicating", "")
	ev.StateChanged("error", "forbidden")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var count uint64
	var sum float64
	changes := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "vdrepl_replication_cycle_latency_seconds":
				count, sum = m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
			case "vdrepl_replication_state_changes_total":
				for _, l := range m.GetLabel() {
					if l.GetName() == "state" {
						changes[l.GetValue()] = m.GetCounter().GetValue()
					}
				}
			}
		}
	}
	if count != 2 || sum != 41.5 {
		t.Errorf("latency histogram: %d samples, sum %v; want 2, 41.5", count, sum)
	}
	if changes["error"] != 2 || changes["replicating"] != 1 {
		t.Errorf("state changes %v, want error 2, replicating 1", changes)
	}
	e.events("vm2").StateChanged("replicating", "")
	e.forget("vm1")
	mfs, err = reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "vm" && l.GetValue() != "vm2" {
					t.Errorf("after forget(vm1): %s has a series of %s", mf.GetName(), l.GetValue())
				}
			}
		}
	}
}
