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

// ReplicationChange is the body of `replication set`: the settings of a
// running replication to change; a nil field stays as it is.
type ReplicationChange struct {
	Replica            *string   `json:"replica,omitempty"`
	Frequency          *Duration `json:"frequency,omitempty"`
	Compression        *bool     `json:"compression,omitempty"`
	BypassProxy        *bool     `json:"bypass_proxy,omitempty"`
	BandwidthLimit     *string   `json:"bandwidth_limit,omitempty"`
	SyncBandwidthLimit *string   `json:"sync_bandwidth_limit,omitempty"`
	RecoveryPoints     *int      `json:"recovery_points,omitempty"`
	PointInterval      *Duration `json:"recovery_point_interval,omitempty"`
	AppConsistentEvery *Duration `json:"app_consistent_every,omitempty"`
	QuiesceCmd         *string   `json:"quiesce_cmd,omitempty"`
	QGASocket          *string   `json:"qga_socket,omitempty"`
	VerifyEvery        *Duration `json:"verify_every,omitempty"`
	// Force allows a replica address that leads to another replica host:
	// a new initial copy follows.
	Force bool `json:"force,omitempty"`
}

// ReplicationChanged answers `replication set`.
type ReplicationChanged struct {
	VM   string          `json:"vm"`
	Spec ReplicationSpec `json:"spec"`
	// Changed names the settings that changed (their flag names), in the
	// order of the flags; [] when nothing did.
	Changed []string `json:"changed"`
	// NewReplica: the replica address leads to another replica host, and
	// an initial copy to it follows. SameReplica: the new address reaches
	// the replica the VM replicated to (it holds the VM at the cycle this
	// host last shipped), so replication goes on from there.
	NewReplica  bool `json:"new_replica"`
	SameReplica bool `json:"same_replica"`
}
