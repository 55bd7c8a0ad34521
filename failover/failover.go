package failover

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/crashpoint"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// Kinds of refusal of the state machine (Error.Kind); the daemon turns
// them into its own.
var (
	// ErrExists: the VM is already in the place the command would put it,
	// or in another one that the command may not leave.
	ErrExists = errors.New("failover: VM exists")
	// ErrInvalid: the VM is not in a state the command starts from.
	ErrInvalid = errors.New("failover: VM not in that state")
	// ErrInUse: something uses the VM (clients, a transition); the
	// command may succeed once it stops.
	ErrInUse = errors.New("failover: VM in use")
	// ErrForbidden: the peer may not do this to the VM.
	ErrForbidden = errors.New("failover: not allowed")
	// ErrMismatch: the peer's view of the VM does not match this host's.
	ErrMismatch = errors.New("failover: VM does not match")
)

// Error is a command the state machine refuses: Kind says which way
// (ErrExists, ErrInvalid, ErrInUse, ErrForbidden, ErrMismatch), Reason why, in words for the admin.
type Error struct {
	Kind   error
	Reason string
}

func (e *Error) Error() string { return e.Kind.Error() + ": " + e.Reason }
func (e *Error) Unwrap() error { return e.Kind }

func refuse(kind error, format string, args ...any) error {
	return &Error{Kind: kind, Reason: fmt.Sprintf(format, args...)}
}

// Target is a replica VM failed over on this host, as the replica role
// reports it: what the host needs to serve it.
type Target struct {
	Disks    []wire.Disk
	Images   []string // the image of each disk
	Excluded []string // the primary's disks that were never replicated
	wire.FailedOver
}

// ReplicaStatus is the replica role's record of one VM.
type ReplicaStatus struct {
	Known bool // the replica role has the VM
	// Failover is its failover record, nil when it is not failed over.
	Failover *wire.FailedOver
	// Rolled: the failover is carried out (images at the point) and not
	// being cancelled.
	Rolled bool
	// Adopted: the replica VM was a VM of this host (reverse replication).
	Adopted bool
	Primary string
}

// ReplicaRole is the replica role as the state machine drives it
// (apply.Server, through the daemon's adapter).
type ReplicaRole interface {
	Status(vm string) ReplicaStatus
	// FailedOver lists the replica VMs whose failover is carried out.
	FailedOver() map[string]Target
	// FailOver records a failover of kind to point ("" = the latest
	// state) durably, then rolls the images to it; calling it again with
	// the same arguments finishes an interrupted one.
	FailOver(vm, kind, point string) (Target, error)
	// CancelFailover records the cancel durably, then rolls the images
	// back to the latest state before the failover.
	CancelFailover(vm string) error
	// CompleteFailover drops the recovery points and the replica VM; nil
	// when the replica role no longer has the VM (done before).
	CompleteFailover(vm string) error
}

// Entry is a VM in the host's registry.
type Entry struct {
	Name string
	// FailedOver: a replica VM failed over here, not completed.
	FailedOver bool
	// Served: its journal is open (it is not only listed).
	Served       bool
	PromotedFrom string
	// HandedOver: a VM of this host handed over in a planned failover.
	HandedOver bool
}

// Host is the daemon as the state machine drives it: its registry of VMs
// and the VM transition. Every method that changes the registry has
// written it durably when it returns.
type Host interface {
	Entry(vm string) (Entry, bool)
	// Register makes failed-over VM t a VM of this host, served through
	// the replica role's recovery point guard. fresh: the registry does
	// not name the VM (a journal left under its name is stale).
	Register(vm string, t Target, fresh bool, promotedFrom string) error
	// Release stops serving vm (exports and journal closed, everything
	// written back) and runs change; if either fails the VM is served
	// again and the error says why.
	Release(vm, why string, change func() error) error
	// Forget drops vm from the registry and its journal.
	Forget(vm string)
	// MarkCompleted clears failed_over in vm's entry, setting
	// promoted_from unless promotedFrom is "".
	MarkCompleted(vm, promotedFrom string) error
	// StopExtension ends an extension of replica VM vm to a third host
	// and returns where it went ("" = none).
	StopExtension(vm string) string
	// EndTest ends a test failover of vm, if one runs.
	EndTest(vm string) error
}

// Config of a Machine.
type Config struct {
	Host    Host
	Replica ReplicaRole
	Logger  *slog.Logger
	// Primary is this host's primary role, for Planned, TakeOver and
	// Adopt.
	Primary PrimaryRole
	// Lock is the operation lock the caller holds around the other
	// commands; Planned and Adopt take it themselves, for their steps on
	// this host only (a new mutex when nil).
	Lock sync.Locker
	// AdoptWait bounds how long Planned waits for the adoption
	// (DefaultAdoptWait when 0).
	AdoptWait time.Duration
	// Crash is called at each durable step the machine makes, with the
	// step's name (crashpoint.Hit when nil).
	Crash func(step string)
}

// Machine runs the failover commands of one host.
type Machine struct {
	host      Host
	replica   ReplicaRole
	primary   PrimaryRole
	lock      sync.Locker
	adoptWait time.Duration
	log       *slog.Logger
	crash     func(string)

	mu      sync.Mutex               // guards waiters only; never held across a call
	waiters map[string]chan struct{} // closed when the VM is adopted (AdoptWaiter)
}

// New returns a Machine.
func New(cfg Config) *Machine {
	m := &Machine{host: cfg.Host, replica: cfg.Replica, primary: cfg.Primary, lock: cfg.Lock,
		adoptWait: cfg.AdoptWait, log: cfg.Logger, crash: cfg.Crash, waiters: map[string]chan struct{}{}}
	if m.lock == nil {
		m.lock = &sync.Mutex{}
	}
	if m.adoptWait == 0 {
		m.adoptWait = DefaultAdoptWait
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.crash == nil {
		m.crash = crashpoint.Hit
	}
	return m
}

// PointName names a failover target: recovery point id, or "" for the
// latest state.
func PointName(id string) string {
	if id == "" {
		return "the latest state"
	}
	return "recovery point " + id
}

// Unplanned fails replica VM vm over to point ("" = the latest state), the
// primary being lost, and registers it as a VM of this host. Running it
// again after an interruption finishes it. extendStopped is where an
// extension of the VM went, stopped by the failover.
func (m *Machine) Unplanned(vm, point string) (t Target, extendStopped string, err error) {
	e, exists := m.host.Entry(vm)
	if exists && !e.FailedOver {
		return Target{}, "", refuse(ErrExists, "VM %s is already a VM of this host (a primary); a replica VM of the same name cannot fail over here", vm)
	}
	if exists && e.Served {
		if f := m.replica.Status(vm).Failover; f != nil && f.Point != point {
			return Target{}, "", refuse(ErrExists, "VM %s is already failed over to %s; cancel first to choose another point", vm, PointName(f.Point))
		}
	}
	extendStopped = m.host.StopExtension(vm)
	t, err = m.replica.FailOver(vm, "unplanned", point)
	if err != nil {
		return Target{}, "", err
	}
	m.crash("failover-before-register")
	if !exists || !e.Served {
		if err := m.host.Register(vm, t, !exists, ""); err != nil {
			return Target{}, "", err
		}
	}
	return t, extendStopped, nil
}

// Complete makes the failover of vm final: a test failover beside it
// ends, the recovery points are dropped, and the VM is this host's own
// (promoted from promotedFrom, unless "").
func (m *Machine) Complete(vm, promotedFrom string) error {
	if e, ok := m.host.Entry(vm); !ok || !e.FailedOver {
		return refuse(ErrInvalid, "VM %s is not failed over on this host", vm)
	}
	if err := m.host.EndTest(vm); err != nil {
		return err
	}
	if err := m.replica.CompleteFailover(vm); err != nil {
		return err
	}
	m.crash("complete-before-registry")
	return m.host.MarkCompleted(vm, promotedFrom)
}

// Cancel ends the failover of vm: it stops being served, its images go
// back to the latest replicated state and it is a replica again. The
// caller has checked that nothing uses it.
func (m *Machine) Cancel(vm string) error {
	if e, ok := m.host.Entry(vm); !ok || !e.FailedOver {
		return refuse(ErrInvalid, "VM %s is not failed over on this host", vm)
	}
	// Stop serving and write everything back (through the guard), so the
	// rollback sees final images.
	err := m.host.Release(vm, "failover being cancelled", func() error {
		m.crash("cancel-journal-closed")
		return m.replica.CancelFailover(vm)
	})
	if err != nil {
		return err
	}
	m.crash("cancel-before-forget")
	m.host.Forget(vm)
	return nil
}

// Promote is the replica side of a planned failover from peer: replica VM
// vm fails over to its latest state, is registered and completed. It
// returns repeated when the VM is already this host's, promoted for peer
// by an earlier handover whose answer peer did not see.
func (m *Machine) Promote(vm, peer string) (repeated bool, err error) {
	e, exists := m.host.Entry(vm)
	if exists && !e.FailedOver {
		if peer == "" || e.PromotedFrom != peer {
			return false, refuse(ErrExists, "VM %s already runs on this host", vm)
		}
		return true, nil
	}
	m.host.StopExtension(vm)
	t, err := m.replica.FailOver(vm, "planned", "")
	if err != nil {
		return false, err
	}
	if !exists || !e.Served {
		if err := m.host.Register(vm, t, !exists, peer); err != nil {
			return false, err
		}
	}
	m.crash("promote-failed-over")
	if err := m.Complete(vm, peer); err != nil {
		return false, err
	}
	m.crash("promote-completed")
	return false, nil
}
