package daemon

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
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
