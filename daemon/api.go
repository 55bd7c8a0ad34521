package daemon

import "github.com/vdrepl/vdrepl/control"

// The types, errors and defaults of the control API are package control's;
// the daemon names them as its own so that its methods read as before.

type (
	DiskSpec          = control.DiskSpec
	VMSpec            = control.VMSpec
	HandedOver        = control.HandedOver
	VMInfo            = control.VMInfo
	ReplicationSpec   = control.ReplicationSpec
	Duration          = control.Duration
	ReplicationStatus = control.ReplicationStatus
	ReplicaStatus     = control.ReplicaStatus
	Replication       = control.Replication
	ExtendSpec        = control.ExtendSpec
	PointsInfo        = control.PointsInfo
	TestFailoverInfo  = control.TestFailoverInfo
	FailoverResult    = control.FailoverResult
	PlannedResult     = control.PlannedResult
)

// Errors of VM management; the control API turns them into HTTP statuses.
var (
	ErrUnknownVM = control.ErrUnknownVM
	ErrExists    = control.ErrExists
	ErrInvalid   = control.ErrInvalid
	ErrInUse     = control.ErrInUse
)

// DefaultStateDir is where state lives unless --state or VDREPL_STATE says.
const DefaultStateDir = control.DefaultStateDir

// DefaultControl is the control socket for a state directory.
func DefaultControl(stateDir string) string { return control.DefaultControl(stateDir) }

// DefaultNBD is the NBD listen list for a state directory.
func DefaultNBD(stateDir string) []string { return control.DefaultNBD(stateDir) }
