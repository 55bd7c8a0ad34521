package failover

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// The primary's side: a planned failover handed from this host to the
// replica (Planned), the promoted host replicating back (TakeOver),
// reverse replication after an unplanned failover (Reverse), and this
// host's VM becoming the replica of the host it moved to (Adopt).

// Handover is the old primary's record of a planned failover: the
// registry's handed_over.
type Handover struct {
	To          string // the new primary (the replica's address)
	ToName      string // its certificate name
	Cycle       uint64 // the last cycle, applied there
	ReplicateTo string // this host's replica role, as told to it
	At          time.Time
}

// PrimaryDisk is a disk of a VM of this host.
type PrimaryDisk struct {
	Name  string
	Size  int64
	Image string
}

// PrimaryVM is a served VM of this host as the primary's commands read it.
type PrimaryVM struct {
	Replica    string // where it replicates ("" = not replicated)
	FailedOver bool   // failed over here, not completed
	HandedOver *Handover
	// Users names who has its disks open ("" = nobody).
	Users string
	Disks []PrimaryDisk
	// UnshippedCycles and UnshippedBytes: what its journal holds that
	// the replica has not applied.
	UnshippedCycles int
	UnshippedBytes  int64
	// Listens: this host runs a replica role that peers reach.
	Listens bool
}

// Peer is the replica of a VM as it answered.
type Peer struct {
	Known   bool   // it presented a certificate
	Name    string // the certificate's name
	Allowed bool   // this host's replica role would take the VM back from it
}

// PrimaryRole is the daemon's primary role as these commands drive it: the
// read-only gate, the shipper and the network peer. Every method but
// SendHandover is called with the operation lock held.
type PrimaryRole interface {
	// VM returns served VM vm, or why it is not one.
	VM(vm string) (PrimaryVM, error)
	// Identity is nil when this host has a certificate to talk to peers
	// with, else why not.
	Identity() error
	// AskReplica asks the replica of vm who it is.
	AskReplica(ctx context.Context, vm string) (Peer, error)
	// ReplicaAddress is where peers reach this host's replica role.
	ReplicaAddress() (string, error)
	// Gate makes the disks of vm read-only (new writes fail, on open
	// connections too) or writable again. Once it returns, every write
	// let through is in the journal.
	Gate(vm string, readOnly bool)
	// Disconnect ends every client connection to the disks of vm.
	Disconnect(vm string)
	// ShipLast seals a cycle and waits until the replica applied it; it
	// returns the last cycle the replica applied.
	ShipLast(ctx context.Context, vm string) (uint64, error)
	// RecordHandedOver writes h (nil: none) into the registry entry of
	// vm durably.
	RecordHandedOver(vm string, h *Handover) error
	StopShipping(vm string)
	StartShipping(vm string) error
	// SendHandover sends the handover of vm to h.To. refused: the peer
	// answered and said no (a retry would get the same answer).
	SendHandover(ctx context.Context, vm string, h Handover) (refused bool, err error)
	// ReplicateBack enables replication of promoted VM vm to its old
	// primary with the settings h carries, existing images.
	ReplicateBack(vm string, h wire.Handover) error
	// ServeAgain serves vm again after Host.Release stopped it.
	ServeAgain(vm string) error
}

// PlannedResult is a planned failover handed over.
type PlannedResult struct {
	Handover
	// Reversed: the new primary replicates back and this host is its
	// replica (it adopted the VM within Config.AdoptWait).
	Reversed bool
}

// DefaultAdoptWait is how long Planned waits for the new primary to
// replicate back before it returns anyway.
const DefaultAdoptWait = 2 * time.Minute

// Planned hands VM vm of this host over to its replica (see the package
// doc): gate, ship the last cycle, record handed_over, stop shipping,
// all under the operation lock; then, without it, send the handover and
// wait for the adoption. A VM handed over before starts at the send.
// reverseTo is where the replica should replicate back ("" = this host's
// replica role). Unlike the other commands it takes Config.Lock itself.
func (m *Machine) Planned(ctx context.Context, vm string, force bool, reverseTo string) (PlannedResult, error) {
	m.lock.Lock()
	h, err := m.handOver(ctx, vm, force, reverseTo)
	var wait <-chan struct{}
	if err == nil {
		wait = m.AdoptWaiter(vm)
	}
	m.lock.Unlock()
	if err != nil {
		return PlannedResult{}, err
	}
	refused, err := m.primary.SendHandover(ctx, vm, h)
	if err != nil {
		if refused {
			m.undoHandover(vm)
			return PlannedResult{}, fmt.Errorf("planned failover of %s refused by %s, the VM is served here again: %w", vm, h.To, err)
		}
		return PlannedResult{}, fmt.Errorf("planned failover of %s: the handover to %s is not confirmed (the VM stays read-only here); run the command again: %w", vm, h.To, err)
	}
	m.log.Info("planned failover: handed over", "vm", vm, "to", h.To, "cycle", h.Cycle)
	res := PlannedResult{Handover: h}
	select {
	case <-wait:
		res.Reversed = true
	case <-time.After(m.adoptWait):
	case <-ctx.Done():
	}
	return res, nil
}

// handOver returns the handover of vm, recording it first unless it was
// (steps 1 to 4). Caller holds the lock.
func (m *Machine) handOver(ctx context.Context, vm string, force bool, reverseTo string) (Handover, error) {
	v, err := m.primary.VM(vm)
	if err != nil {
		if r := m.replica.Status(vm); r.Known {
			return Handover{}, refuse(ErrInvalid, "VM %s is a replica on this host; run the planned failover on its primary (%s), or `vdrepl failover unplanned %s` here if the primary is lost", vm, r.Primary, vm)
		}
		return Handover{}, err
	}
	if err := m.primary.Identity(); err != nil {
		return Handover{}, err
	}
	if v.HandedOver != nil {
		return *v.HandedOver, nil
	}
	if err := plannable(vm, v, force); err != nil {
		return Handover{}, err
	}
	peer, err := m.primary.AskReplica(ctx, vm)
	if err != nil {
		return Handover{}, fmt.Errorf("planned failover of %s: ask the replica %s: %w", vm, v.Replica, err)
	}
	if !peer.Known || !peer.Allowed {
		name := "the replica"
		if peer.Known {
			name = peer.Name
		}
		return Handover{}, refuse(ErrInvalid, "this host would refuse replication of %s back from %s: `vdrepl replica allow add --primary %s --storage DIR` first", vm, name, name)
	}
	if reverseTo == "" {
		if reverseTo, err = m.primary.ReplicaAddress(); err != nil {
			return Handover{}, err
		}
	}
	m.primary.Gate(vm, true)
	if force {
		m.primary.Disconnect(vm)
	}
	cycle, err := m.primary.ShipLast(ctx, vm)
	if err != nil {
		m.primary.Gate(vm, false)
		return Handover{}, fmt.Errorf("planned failover of %s: ship the last cycle: %w", vm, err)
	}
	h := Handover{To: v.Replica, ToName: peer.Name, Cycle: cycle, ReplicateTo: reverseTo, At: time.Now().UTC().Truncate(time.Second)}
	if err := m.primary.RecordHandedOver(vm, &h); err != nil {
		m.primary.Gate(vm, false)
		return Handover{}, err
	}
	m.primary.StopShipping(vm)
	m.crash("handover-recorded")
	return h, nil
}

// plannable refuses a VM a planned failover cannot start from.
func plannable(vm string, v PrimaryVM, force bool) error {
	switch {
	case v.Replica == "":
		return refuse(ErrInvalid, "VM %s is not replicated; a planned failover hands it to its replica", vm)
	case v.FailedOver:
		return refuse(ErrInvalid, "VM %s is failed over here and not completed; complete the failover first", vm)
	case !v.Listens:
		return refuse(ErrInvalid, "this host must take replication of %s back after the failover: start `vdrepl serve` with --replica-listen", vm)
	case v.Users != "" && !force:
		return refuse(ErrInUse, "VM %s is open (%s); shut the VM down first, or --force makes its disks read-only under it", vm, v.Users)
	}
	return nil
}

// undoHandover serves a VM again after its replica refused the handover.
func (m *Machine) undoHandover(vm string) {
	m.lock.Lock()
	defer m.lock.Unlock()
	v, err := m.primary.VM(vm)
	if err != nil || v.HandedOver == nil {
		return
	}
	if err := m.primary.RecordHandedOver(vm, nil); err != nil {
		m.log.Error("undo a refused handover", "vm", vm, "err", err)
		return
	}
	m.primary.Gate(vm, false)
	if err := m.primary.StartShipping(vm); err != nil {
		m.log.Error("replication not running", "vm", vm, "err", err)
	}
}

// AdoptWaiter returns a channel closed when VM vm is adopted (Adopt
// finished). It is safe for concurrent use.
func (m *Machine) AdoptWaiter(vm string) <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch, ok := m.waiters[vm]
	if !ok {
		ch = make(chan struct{})
		m.waiters[vm] = ch
	}
	return ch
}

func (m *Machine) adopted(vm string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ch, ok := m.waiters[vm]; ok {
		close(ch)
		delete(m.waiters, vm)
	}
}

// TakeOver is the new primary's side of a planned failover from peer:
// Promote, then replicate the VM back to peer with the settings of the
// handover, unless that replication is enabled already (a repeated
// handover).
func (m *Machine) TakeOver(vm, peer string, h wire.Handover) error {
	if _, err := m.Promote(vm, peer); err != nil {
		return err
	}
	v, err := m.primary.VM(vm)
	if err != nil {
		return err
	}
	if v.Replica != "" {
		return nil
	}
	return m.primary.ReplicateBack(vm, h)
}

// Reverse replicates VM vm, failed over to this host, back to its old
// primary with existing images (initial must be "" or "existing"): the
// failover is completed, if it is not, then enable enables the
// replication.
func (m *Machine) Reverse(vm, initial string, enable func() error) error {
	if initial != "" && initial != "existing" {
		return refuse(ErrInvalid, "reverse replication compares with the images the old primary has; --initial does not apply")
	}
	if e, ok := m.host.Entry(vm); ok && e.FailedOver {
		if err := m.Complete(vm, ""); err != nil {
			return err
		}
	}
	return enable()
}

// Adopt hands VM vm of this host to the replica role, which makes it the
// replica VM of peer (cert is the certificate peer presented) over its
// images of disks. It checks that peer is the host the VM replicates to
// or was handed over to, that nothing uses the VM and that the disks
// match, stops serving the VM and returns the images. finish(true)
// forgets the VM (the replica role has registered it), finish(false)
// serves it again. Adopt and finish take Config.Lock themselves; it is
// not held in between.
func (m *Machine) Adopt(vm, peer string, cert *x509.Certificate, disks []wire.Disk) (images []string, finish func(ok bool), err error) {
	m.lock.Lock()
	defer m.lock.Unlock()
	v, images, err := m.adoptable(vm, peer, cert, disks)
	if err != nil {
		return nil, nil, err
	}
	// What this host wrote after the replica's last cycle is overwritten
	// by the resync that follows (the VM runs there now): say how much.
	if v.HandedOver == nil && (v.UnshippedCycles > 0 || v.UnshippedBytes > 0) {
		m.log.Warn("VM becomes a replica: writes made here that never reached the new primary are discarded",
			"vm", vm, "primary", peer, "unshipped_cycles", v.UnshippedCycles, "unshipped_bytes", v.UnshippedBytes)
	}
	// Stop serving it and write everything back; the images are the
	// replica's from here.
	m.primary.StopShipping(vm)
	if err := m.host.Release(vm, "becoming a replica", func() error { return nil }); err != nil {
		return nil, nil, err
	}
	finish = func(ok bool) {
		m.lock.Lock()
		defer m.lock.Unlock()
		if !ok {
			if err := m.primary.ServeAgain(vm); err != nil {
				m.log.Error("VM not adopted and not served again", "vm", vm, "err", err)
			}
			return
		}
		m.host.Forget(vm)
		m.adopted(vm)
		m.log.Info("replication reversed: this host is now the replica of the VM", "vm", vm, "primary", peer)
	}
	return images, finish, nil
}

// adoptable checks that VM vm may become the replica of peer and returns
// it with the images of disks. Caller holds the lock.
func (m *Machine) adoptable(vm, peer string, cert *x509.Certificate, disks []wire.Disk) (PrimaryVM, []string, error) {
	v, err := m.primary.VM(vm)
	if err != nil {
		return v, nil, refuse(ErrForbidden, "VM %s cannot become a replica here: %v", vm, err)
	}
	target := v.Replica
	if v.HandedOver != nil {
		target = v.HandedOver.To
	}
	host, _, _ := net.SplitHostPort(target)
	if target == "" || cert == nil || cert.VerifyHostname(host) != nil {
		return v, nil, refuse(ErrForbidden, "VM %s runs on this host and %q is not the host it replicates to", vm, peer)
	}
	if v.Users != "" {
		return v, nil, refuse(ErrInUse, "VM %s still runs on this host (%s): shut it down here to let %s replicate it back", vm, v.Users, peer)
	}
	var images []string
	for _, wd := range disks {
		i := slices.IndexFunc(v.Disks, func(d PrimaryDisk) bool { return d.Name == wd.Name })
		if i < 0 || v.Disks[i].Size != wd.Size {
			return v, nil, refuse(ErrMismatch, "VM %s here has no disk %s of %d bytes", vm, wd.Name, wd.Size)
		}
		images = append(images, v.Disks[i].Image)
	}
	return v, images, nil
}
