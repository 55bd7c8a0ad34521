package control

import (
	"errors"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
	"github.com/vdrepl/vdrepl/snapshot"
)

// The types that cross the control socket. Some embed or carry a type of
// the package that fills them in (journal.Stats, ship.Status, wire.Replica,
// snapshot.Point; the routes also carry apply.AllowEntry and
// journal.CycleInfo), so the JSON is the one that package defines and
// nothing is copied field by field.

// Errors of VM management. A Host wraps them; the handler turns them into
// HTTP statuses: 404, 409 and 400, anything else 500.
var (
	ErrUnknownVM = errors.New("unknown VM")
	ErrExists    = errors.New("already exists")
	ErrInvalid   = errors.New("invalid request")
	ErrInUse     = errors.New("in use")
)

// Status is the daemon's overall state.
type Status struct {
	StateDir     string   `json:"state_dir"`
	LastShutdown string   `json:"last_shutdown"`
	NBD          []string `json:"nbd"`
	Mounts       []string `json:"mounts"`
	VMs          []VMInfo `json:"vms"`
	// Identity is this host's certificate name; ReplicaListen where the
	// replica role listens ("" = off).
	Identity      string   `json:"identity,omitempty"`
	ReplicaListen string   `json:"replica_listen,omitempty"`
	MetricsListen string   `json:"metrics_listen,omitempty"`
	Warnings      []string `json:"warnings,omitempty"`
	// Tests are the test failovers running on this host.
	Tests []TestFailoverInfo `json:"test_failovers,omitempty"`
	// Replicas are the VMs this host keeps replicas of, with their
	// health; one that is not normal is among Warnings too.
	Replicas []ReplicaStatus `json:"replicas,omitempty"`
}

// DiskSpec is one disk of a VM as the user registered it.
type DiskSpec struct {
	Name string `json:"name"`
	Path string `json:"path"`
	Size int64  `json:"size"`
	// Create asks for a sparse image of Size bytes when Path is missing.
	Create bool `json:"create,omitempty"`
}

// VMSpec is a registered VM.
type VMSpec struct {
	Name    string     `json:"name"`
	Disks   []DiskSpec `json:"disks"`
	Created time.Time  `json:"created"`
	// Replication is set while the VM replicates to a replica host.
	Replication *ReplicationSpec `json:"replication,omitempty"`
	// FailedOver: the VM is a replica VM failed over on this host and not
	// completed yet; its images are the replica's, written through its
	// recovery point guard.
	FailedOver bool `json:"failed_over,omitempty"`
	// Lacks names disks the VM had on its primary that were never
	// replicated (excluded), so a failed-over VM runs without them.
	Lacks []string `json:"lacks_disks,omitempty"`
	// HandedOver: a planned failover handed the VM to its replica (or is
	// doing so); the VM is served read-only here until the new primary
	// replicates back and this host becomes its replica.
	HandedOver *HandedOver `json:"handed_over,omitempty"`
	// PromotedFrom is the certificate name of the old primary that handed
	// the VM over to this host in a planned failover.
	PromotedFrom string `json:"promoted_from,omitempty"`
	// Fenced: the VM was failed over on its replica host while this host
	// was away; it is served read-only here (see Fence).
	Fenced *Fence `json:"fenced,omitempty"`
	// UnfencedFailover is the failover (its time on the replica host) the
	// admin unfenced the VM despite: that one does not fence it again.
	UnfencedFailover time.Time `json:"unfenced_failover,omitzero"`
}

// HandedOver records a planned failover on the old primary.
type HandedOver struct {
	To          string    `json:"to"`           // the new primary (the replica's address)
	ToName      string    `json:"to_name"`      // its certificate name
	Cycle       uint64    `json:"cycle"`        // the last cycle, applied there
	ReplicateTo string    `json:"replicate_to"` // this host's replica role, as told to it
	At          time.Time `json:"at"`
}

// VMInfo is a VM as the CLI shows it.
type VMInfo struct {
	VMSpec
	Exports []string       `json:"exports"`
	Journal *journal.Stats `json:"journal,omitempty"`
	Error   string         `json:"error,omitempty"`
	// TestExports are the exports (VM-test/DISK) of a test failover of
	// the VM running on this host; [] when none. TestFailover is that
	// test failover, absent when none.
	TestExports  []string          `json:"test_exports"`
	TestFailover *TestFailoverInfo `json:"test_failover,omitempty"`
	// ReplicaOnly: the VM is not registered on this host, which keeps its
	// replica; it is listed for its test failover, and has no disks or
	// exports of its own here.
	ReplicaOnly bool `json:"replica_only,omitempty"`
}

// ReplicationSpec is how a VM replicates, as the admin enabled it.
type ReplicationSpec struct {
	// Replica is the replica's HTTPS address, host:port.
	Replica string `json:"replica"`
	// Frequency is how often a cycle is closed and shipped.
	Frequency Duration `json:"frequency"`
	// Compression sends data zstd-compressed.
	Compression  bool     `json:"compression"`
	ExcludeDisks []string `json:"exclude_disks,omitempty"`
	BypassProxy  bool     `json:"bypass_proxy,omitempty"`
	// Initial: "network", "at:RFC3339", "offline:DIR" or "existing".
	Initial string `json:"initial"`
	// BandwidthLimit and SyncBandwidthLimit: "unlimited", "50MB/s", or a
	// schedule "08:00-18:00=20MB/s,*=unlimited".
	BandwidthLimit     string    `json:"bandwidth_limit,omitempty"`
	SyncBandwidthLimit string    `json:"sync_bandwidth_limit,omitempty"`
	Enabled            time.Time `json:"enabled"`
	// RecoveryPoints (0..24) are kept on the replica besides the latest
	// state, one per PointInterval (default 1h).
	RecoveryPoints int      `json:"recovery_points,omitempty"`
	PointInterval  Duration `json:"recovery_point_interval,omitempty"`
	// AppConsistentEvery: a cycle this often is sealed with the guest
	// quiesced by QuiesceCmd (run as CMD VM freeze|thaw) or through the
	// qemu-guest-agent socket QGASocket; 0 = never.
	AppConsistentEvery Duration `json:"app_consistent_every,omitempty"`
	QuiesceCmd         string   `json:"quiesce_cmd,omitempty"`
	QGASocket          string   `json:"qga_socket,omitempty"`
	// VerifyEvery runs `vdrepl verify` on its own this long after the last
	// one (at the default rate); 0 = only when an admin runs it.
	VerifyEvery Duration `json:"verify_every,omitempty"`
}

// Duration is a time.Duration that reads and writes as "30s", "5m".
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// ReplicationStatus is a VM's replication as its primary sees it.
type ReplicationStatus struct {
	VM       string          `json:"vm"`
	Role     string          `json:"role"` // "primary", or "extended" from a replica host
	Spec     ReplicationSpec `json:"spec"`
	Excluded []string        `json:"excluded_disks,omitempty"`
	// Fenced: the VM was failed over on its replica host; state is
	// "fenced" and health critical while it is.
	Fenced *Fence `json:"fenced,omitempty"`
	ship.Status
}

// ReplicaStatus is a VM this host keeps a replica of. Its state is
// "failed-over" while the VM is failed over on this host (FailedOver says
// how); otherwise the replica's ("new", "initial-copy", "resyncing",
// "replicating").
type ReplicaStatus struct {
	Role string `json:"role"` // "replica"
	wire.Replica
	// Health is "normal", "warning" (no cycle applied for more than 2 x
	// frequency) or "critical" (more than 6 x frequency or 1 hour,
	// whichever is less); HealthReason says since when (apply.Health).
	Health       string `json:"health"`
	HealthReason string `json:"health_reason,omitempty"`
	// LastCycleAt is when this host last applied a cycle (or the VM last
	// became replicating); FrequencySeconds the primary's frequency as
	// this host knows it (absent: not known yet).
	LastCycleAt      time.Time `json:"last_cycle_at,omitzero"`
	FrequencySeconds float64   `json:"frequency_seconds,omitempty"`
	// TestFailover is the test failover of the VM running on this host;
	// absent when none.
	TestFailover *TestFailoverInfo `json:"test_failover,omitempty"`
}

// NewReplicaStatus is the status of a replica VM as apply reports it.
func NewReplicaStatus(s apply.Status) ReplicaStatus {
	r := ReplicaStatus{Role: "replica", Replica: s.Replica, Health: s.Health.Level, HealthReason: s.Health.Reason,
		LastCycleAt: s.Health.LastCycleAt, FrequencySeconds: s.Health.Frequency.Seconds()}
	r.State = s.State
	return r
}

// Replication lists the replication state of every VM this host is primary or
// replica of, or of one VM.
type Replication struct {
	Primaries []ReplicationStatus `json:"primaries"`
	Replicas  []ReplicaStatus     `json:"replicas"`
	Warnings  []string            `json:"warnings,omitempty"`
}

// SyncResult is the answer of a replication sync.
type SyncResult struct {
	Cycle uint64 `json:"cycle"`
}

// ImportRequest asks the replica role to load an offline initial copy.
type ImportRequest struct {
	VM  string `json:"vm"`
	Dir string `json:"dir"`
}

// ReplicaRemoved is what removing a replica VM on the replica host did.
type ReplicaRemoved struct {
	VM string `json:"vm"`
	// Dir is the VM's replica directory.
	Dir string `json:"dir"`
	// Images are the VM's image files, one per replicated disk.
	Images []string `json:"images"`
	// ImagesDeleted: the images were deleted (--delete-images), else they
	// stay where Images says.
	ImagesDeleted bool `json:"images_deleted"`
}

// ExtendSpec is an extension of a replica VM to a third host.
type ExtendSpec struct {
	Replica     string    `json:"replica"`
	Frequency   Duration  `json:"frequency"`
	Compression bool      `json:"compression"`
	BypassProxy bool      `json:"bypass_proxy,omitempty"`
	Enabled     time.Time `json:"enabled"`
}

// PointsInfo lists a replica VM's recovery points.
type PointsInfo struct {
	VM     string           `json:"vm"`
	Keep   int              `json:"keep"`
	Points []snapshot.Point `json:"points"`
	// Bytes is the undo data all points take.
	Bytes int64 `json:"bytes"`
}

// TestFailoverInfo is a test failover as status shows it.
type TestFailoverInfo struct {
	VM      string    `json:"vm"`
	Point   string    `json:"point"`
	Cycle   uint64    `json:"cycle"`
	Time    time.Time `json:"time,omitzero"`
	Exports []string  `json:"exports"`
	Started time.Time `json:"started"`
}

// FailoverResult answers a failover command.
type FailoverResult struct {
	VM      string   `json:"vm"`
	Point   string   `json:"point,omitempty"` // "" = the latest state
	Cycle   uint64   `json:"cycle,omitempty"`
	Exports []string `json:"exports"`
	// Lacks names the disks the replica never had (excluded from
	// replication on the primary).
	Lacks []string `json:"lacks_disks,omitempty"`
	// ExtendStopped: the VM's replication was extended from here to this
	// third host; the failover stopped that (the images no longer follow
	// the primary). Extend again once the VM replicates here again.
	ExtendStopped string `json:"extend_stopped,omitempty"`
}

// PlannedResult answers a planned failover.
type PlannedResult struct {
	VM    string `json:"vm"`
	To    string `json:"to"`
	Cycle uint64 `json:"cycle"`
	// Reversed: the new primary replicates back and this host is its
	// replica; false when the daemon stopped waiting for it.
	Reversed bool `json:"reversed"`
}

// DoctorInfo is the daemon's configuration as far as checks need it.
type DoctorInfo struct {
	StateDir string `json:"state_dir"`
	// NBD lists the NBD addresses the daemon listens on now.
	NBD []string `json:"nbd"`
	// JournalCap is --journal-cap (0: half of each VM's disk size).
	JournalCap int64 `json:"journal_cap"`
	// TLSCert, TLSKey and TLSCA are the identity files, made absolute.
	TLSCert       string `json:"tls_cert,omitempty"`
	TLSKey        string `json:"tls_key,omitempty"`
	TLSCA         string `json:"tls_ca,omitempty"`
	ReplicaListen string `json:"replica_listen,omitempty"`
	// Proxies maps each replica address asked about, and each one a VM
	// replicates to, to the proxy URL this daemon's environment
	// (HTTPS_PROXY, NO_PROXY) gives it, as shipping uses it; "" = direct.
	// A VM set to bypass proxies connects directly whatever it says here.
	Proxies map[string]string `json:"proxies"`
}

// MountEvent is one line of the mount stream, and the body of a mount or
// unmount request (Mountpoint).
type MountEvent struct {
	Mounted    string `json:"mounted,omitempty"`
	Unmounted  string `json:"unmounted,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
}

// apiError is the body of every answer with a non-2xx status.
type apiError struct {
	Error string `json:"error"`
}
