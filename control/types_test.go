package control

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// A replica VM's status in JSON: its health and, failed over, the state
// "failed-over" (issue 15 items 4 and 5); the keys of wire.Replica stay.
func TestReplicaStatusJSON(t *testing.T) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	s := apply.Status{
		Replica: wire.Replica{VM: "vm1", Primary: "p1", State: "replicating", Applied: 9, Consistent: true,
			FailedOver: &wire.FailedOver{Kind: "unplanned", Point: "7", Latest: 9, At: at}},
		State:  apply.StateFailedOver,
		Health: apply.Health{Level: apply.HealthNormal, Reason: "failed over on this host: takes no cycles from p1", LastCycleAt: at, Frequency: 30 * time.Second},
	}
	b, err := json.Marshal(NewReplicaStatus(s))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{"role": "replica", "vm": "vm1", "primary": "p1", "state": "failed-over", "applied": 9.0, "consistent": true,
		"health": "normal", "health_reason": "failed over on this host: takes no cycles from p1", "last_cycle_at": "2026-03-01T12:00:00Z", "frequency_seconds": 30.0} {
		if got[k] != v {
			t.Errorf("%s: %v, want %v (%s)", k, got[k], v, b)
		}
	}
	if fo, _ := got["failed_over"].(map[string]any); fo["kind"] != "unplanned" || fo["point"] != "7" {
		t.Errorf("failed_over: %v", got["failed_over"])
	}
}
