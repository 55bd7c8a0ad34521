package control

import (
	"fmt"
	"time"
)

// Fence records on an old primary that its VM was failed over (unplanned)
// on the replica host: this copy is stale, and the VM is served read-only
// until the admin reverses replication from the new primary or unfences it
// (`vdrepl vm unfence VM --force`).
type Fence struct {
	// Replica is the address the VM replicated to, ReplicaName the
	// certificate name that answered there.
	Replica     string `json:"replica"`
	ReplicaName string `json:"replica_name,omitempty"`
	// Kind, Point and FailedOverAt are the replica's failover
	// (wire.FailedOver): its kind, the recovery point ("" = the latest
	// state) and when it happened there.
	Kind         string    `json:"kind"`
	Point        string    `json:"point,omitempty"`
	FailedOverAt time.Time `json:"failed_over_at"`
	// Since is when this host learnt of it and fenced the VM.
	Since time.Time `json:"since"`
}

// Sentence is the fence as status lines say it.
func (f *Fence) Sentence() string {
	who := f.Replica
	if f.ReplicaName != "" {
		who = fmt.Sprintf("%s (%s)", f.ReplicaName, f.Replica)
	}
	return fmt.Sprintf("FENCED: failed over on %s at %s; this copy is stale", who, f.FailedOverAt.UTC().Format(time.RFC3339))
}
