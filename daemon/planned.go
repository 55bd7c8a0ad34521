package daemon

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/ship"
)

// Planned failover and reverse replication.
//
// Planned failover, on the primary A of VM v replicating to B
// (FailoverPlanned):
//
//  1. v's disks become read-only (gatedDisk): new writes fail at once, on
//     open connections and FUSE files too; with --force the clients are
//     also disconnected, without it A refuses while any has v open.
//  2. A cycle is sealed and waited for until B applied it (cycle N).
//  3. A checks that its own replica role would take v back from B (it
//     listens, B's certificate is on its allow-list).
//  4. handed_over {to B, cycle N} is recorded in A's registry, and v's
//     shipper stopped. From here on a restart of A keeps v read-only.
//  5. The handover (wire.Handover) goes to B: B checks it applied N,
//     fails v over to its latest state, completes that, and enables
//     replication back to A with existing images (Promote).
//  6. B's shipper enables v on A: A's replica role adopts v (Adopt): the
//     journal is closed, v leaves A's registry, and A's images become the
//     replica images of B's v; a checksum resync finds them equal and
//     sends nothing but hashes. FailoverPlanned waits for this.
//
// A repeated FailoverPlanned after an interruption starts at step 5. Reverse
// replication after an unplanned failover (Reverse) is step 6 alone,
// started on the new primary: it completes the failover and enables
// replication to the old primary, whose replica role adopts the VM once
// nothing uses it there (until then the enable is answered "busy" and
// retried).
//
// The checks, the order of the steps and the undo are the failover
// state machine's (failover.Machine: Planned, TakeOver, Reverse, Adopt);
// here are the mechanics it drives: the gate, and the Daemon as its
// failover.PrimaryRole (primaryRole) and as apply's Host (hostHooks).

// gate makes a VM's disks read-only for a planned failover. A write holds
// it shared for its whole journal append, so once set returns, every
// write that was let through is in the journal: a cycle sealed then holds
// all of them.
type gate struct {
	mu     sync.RWMutex
	ro     bool
	fenced bool // fence.go: read-only until unfenced, whatever ro says
}

func (g *gate) set(ro bool) {
	g.mu.Lock()
	g.ro = ro
	g.mu.Unlock()
}

// enter lets a write through unless the disks are read-only; the caller
// calls g.mu.RUnlock when it is done.
func (g *gate) enter() bool {
	g.mu.RLock()
	if g.ro || g.fenced {
		g.mu.RUnlock()
		return false
	}
	return true
}

// gatedDisk is a VM's disk as the front ends see it: writes fail with
// blockdev.ErrReadOnly while the VM is read-only.
type gatedDisk struct {
	blockdev.Disk
	g *gate
}

func (d gatedDisk) WriteAt(p []byte, off int64) (int, error) {
	if !d.g.enter() {
		return 0, blockdev.ErrReadOnly
	}
	defer d.g.mu.RUnlock()
	return d.Disk.WriteAt(p, off)
}

// ReceiveMin and ReceiveWrite let the NBD front end receive large writes
// straight into the journal's buffers (blockdev.Receiver), through the gate.
func (d gatedDisk) ReceiveMin() int {
	if rcv, ok := d.Disk.(blockdev.Receiver); ok {
		return rcv.ReceiveMin()
	}
	return math.MaxInt
}

func (d gatedDisk) ReceiveWrite(r io.Reader, n int) (func(off int64) error, error) {
	rcv, ok := d.Disk.(blockdev.Receiver)
	if !ok {
		buf := make([]byte, n)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return func(off int64) error { _, err := d.WriteAt(buf, off); return err }, nil
	}
	write, err := rcv.ReceiveWrite(r, n)
	if err != nil {
		return nil, err
	}
	return func(off int64) error {
		if !d.g.enter() {
			write(-1) // gives the buffer back (blockdev.Receiver)
			return blockdev.ErrReadOnly
		}
		defer d.g.mu.RUnlock()
		return write(off)
	}, nil
}

// Extents forwards the disk's map (blockdev.Mapper), so that NBD block
// status and SEEK_HOLE on the FUSE file see the journal's holes through the
// gate. A map changes nothing: the gate does not apply. A disk without one
// is all data.
func (d gatedDisk) Extents(off, length int64) ([]blockdev.Extent, error) {
	if m, ok := d.Disk.(blockdev.Mapper); ok {
		return m.Extents(off, length)
	}
	return []blockdev.Extent{{Offset: off, Length: length}}, nil
}

var _ blockdev.Mapper = gatedDisk{}

func (d gatedDisk) Trim(off, n int64) error {
	if !d.g.enter() {
		return blockdev.ErrReadOnly
	}
	defer d.g.mu.RUnlock()
	return d.Disk.Trim(off, n)
}

func (d gatedDisk) Zero(off, n int64, punch bool) error {
	if !d.g.enter() {
		return blockdev.ErrReadOnly
	}
	defer d.g.mu.RUnlock()
	return d.Disk.Zero(off, n, punch)
}

// FailoverPlanned hands a VM over to its replica (see the top of this
// file). reverseTo is where the replica should replicate back to ("" =
// this host's replica listener, by its certificate name when it listens
// on every address).
func (d *Daemon) FailoverPlanned(ctx context.Context, name string, force bool, reverseTo string) (control.PlannedResult, error) {
	r, err := d.fo.Planned(ctx, name, force, reverseTo)
	if err != nil {
		return control.PlannedResult{}, controlErr(err)
	}
	return control.PlannedResult{VM: name, To: r.To, Cycle: r.Cycle, Reversed: r.Reversed}, nil
}

// replicaAddress is where peers reach this host's replica role.
func (d *Daemon) replicaAddress() (string, error) {
	host, port, err := net.SplitHostPort(d.replicaAddr)
	if err != nil {
		return "", err
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if d.identity == nil {
			return "", fmt.Errorf("%w: the replica role listens on every address; give --reverse-to HOST:PORT", control.ErrInvalid)
		}
		host = d.identity.Name()
	}
	return net.JoinHostPort(host, port), nil
}

// Reverse replicates a VM that failed over to this host back to its old
// primary, sending only what differs: the failover is completed (its
// recovery points discarded) and replication enabled with the old
// primary's images as existing images.
func (d *Daemon) Reverse(name string, r control.ReplicationSpec) (control.ReplicationSpec, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	v, ok := d.vms[name]
	d.mu.Unlock()
	if !ok {
		return r, fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	if v.busy {
		return r, errBusy(v)
	}
	var out control.ReplicationSpec
	var enableErr error
	err := d.fo.Reverse(name, r.Initial, func() error {
		r.Initial = "existing"
		out, enableErr = d.enableLocked(name, r)
		return enableErr
	})
	switch {
	case enableErr != nil:
		return out, enableErr
	case err != nil:
		return r, d.failoverErr(err)
	}
	return out, nil
}

// hostHooks is the Daemon as apply's Host.
type hostHooks Daemon

func (h *hostHooks) Local(name string) bool {
	d := (*Daemon)(h)
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.vms[name]
	return ok
}

// errAdoptBusy: the VM is still in use here; the new primary retries.
var errAdoptBusy = errors.New("daemon: VM in use")

// Adopt hands a VM of this host to the replica role (see apply.Host and
// failover.Machine.Adopt).
//
// No lock of the daemon is held while apply registers the replica VM:
// Adopt takes opMu for the checks and the transition that stops serving
// the VM, and returns with a busy stand-in in the VM's place; every
// operation that finds the stand-in refuses the VM (errBusy) until finish
// takes opMu again and forgets the VM or serves it again.
func (h *hostHooks) Adopt(name, peer string, cert *x509.Certificate, en wire.Enable) ([]string, func(bool), error) {
	images, finish, err := (*Daemon)(h).fo.Adopt(name, peer, cert, en.Disks)
	var fe *failover.Error
	if errors.As(err, &fe) {
		switch fe.Kind {
		case failover.ErrForbidden:
			err = fmt.Errorf("%w: %s", apply.ErrForbidden, fe.Reason)
		case failover.ErrInUse:
			err = fmt.Errorf("%w: %s (%w)", apply.ErrBusy, fe.Reason, errAdoptBusy)
		case failover.ErrMismatch:
			err = fmt.Errorf("%w: %s", apply.ErrMismatch, fe.Reason)
		}
	}
	return images, finish, err
}

// Promote makes a replica VM this host's in a planned failover and
// replicates it back (see apply.Host and failover.Machine.TakeOver).
func (h *hostHooks) Promote(name, peer string, ho wire.Handover) error {
	d := (*Daemon)(h)
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.notBusy(name); err != nil {
		return err
	}
	err := d.fo.TakeOver(name, peer, ho)
	var fe *failover.Error
	if errors.As(err, &fe) && fe.Kind == failover.ErrExists {
		return fmt.Errorf("%w: %s", apply.ErrExists, fe.Reason)
	}
	return err
}

// primaryRole is the Daemon as failover.PrimaryRole: the gate, the
// shipper and the network peer of its VMs.
type primaryRole Daemon

func (p *primaryRole) vm(name string) (*vm, error) {
	d := (*Daemon)(p)
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	return v, nil
}

func (p *primaryRole) VM(name string) (failover.PrimaryVM, error) {
	d := (*Daemon)(p)
	v, err := d.servedVM(name)
	if err != nil {
		return failover.PrimaryVM{}, err
	}
	d.mu.Lock()
	spec := v.spec
	out := failover.PrimaryVM{FailedOver: spec.FailedOver, Users: d.usersLocked(name), Listens: d.replica != nil && d.replicaAddr != ""}
	d.mu.Unlock()
	if spec.Replication != nil {
		out.Replica = spec.Replication.Replica
	}
	if h := spec.HandedOver; h != nil {
		out.HandedOver = &failover.Handover{To: h.To, ToName: h.ToName, Cycle: h.Cycle, ReplicateTo: h.ReplicateTo, At: h.At}
	}
	for _, ds := range spec.Disks {
		out.Disks = append(out.Disks, failover.PrimaryDisk{Name: ds.Name, Size: ds.Size, Image: ds.Path})
	}
	out.UnshippedCycles, out.UnshippedBytes = len(v.j.Cycles()), v.j.Stats().RetainedBytes
	return out, nil
}

func (p *primaryRole) Identity() error {
	if p.identity == nil {
		return fmt.Errorf("%w: %v", control.ErrInvalid, errNoIdentity)
	}
	return nil
}

func (p *primaryRole) AskReplica(ctx context.Context, name string) (failover.Peer, error) {
	v, err := p.vm(name)
	if err != nil {
		return failover.Peer{}, err
	}
	rs := v.spec.Replication
	cert, _, unknown, err := (*Daemon)(p).askReplica(ctx, rs.Replica, rs.BypassProxy, name)
	if err == nil && unknown {
		err = fmt.Errorf("%w: the replica %s does not hold VM %s", control.ErrInvalid, rs.Replica, name)
	}
	if err != nil || cert == nil {
		return failover.Peer{}, err
	}
	return failover.Peer{Known: true, Name: pki.CertName(cert), Allowed: p.replica.Allows(cert)}, nil
}

func (p *primaryRole) ReplicaAddress() (string, error) { return (*Daemon)(p).replicaAddress() }

func (p *primaryRole) Gate(name string, readOnly bool) {
	if v, err := p.vm(name); err == nil {
		v.gate.set(readOnly)
	}
}

func (p *primaryRole) Disconnect(name string) {
	if v, err := p.vm(name); err == nil {
		(*Daemon)(p).closeExports(v.spec)
	}
}

func (p *primaryRole) ShipLast(ctx context.Context, name string) (uint64, error) {
	sh, err := (*Daemon)(p).shipper(name)
	if err == nil {
		_, err = sh.Sync(ctx, false)
	}
	if err != nil {
		return 0, err
	}
	return sh.Status().LastApplied, nil
}

func (p *primaryRole) RecordHandedOver(name string, h *failover.Handover) error {
	v, err := p.vm(name)
	if err != nil {
		return err
	}
	var ho *control.HandedOver
	if h != nil {
		ho = &control.HandedOver{To: h.To, ToName: h.ToName, Cycle: h.Cycle, ReplicateTo: h.ReplicateTo, At: h.At}
	}
	return (*Daemon)(p).setSpec(v, func(s *control.VMSpec) { s.HandedOver = ho })
}

func (p *primaryRole) StopShipping(name string) {
	if v, err := p.vm(name); err == nil {
		(*Daemon)(p).stopShipper(v)
	}
}

func (p *primaryRole) StartShipping(name string) error {
	v, err := p.vm(name)
	if err != nil {
		return err
	}
	return (*Daemon)(p).startShipper(v)
}

// SendHandover is called without opMu: the spec is read under mu.
func (p *primaryRole) SendHandover(ctx context.Context, name string, h failover.Handover) (bool, error) {
	d := (*Daemon)(p)
	d.mu.Lock()
	var rs *control.ReplicationSpec
	if v, ok := d.vms[name]; ok {
		rs = v.spec.Replication
	}
	d.mu.Unlock()
	if rs == nil {
		return false, fmt.Errorf("%w: replication of VM %s is not enabled", control.ErrInvalid, name)
	}
	host, _, _ := net.SplitHostPort(h.To)
	_, err := ship.Handover(ctx, h.To, d.identity.ClientConfig(host), rs.BypassProxy, name, wire.Handover{
		Cycle: h.Cycle, ReplicateTo: h.ReplicateTo, Frequency: time.Duration(rs.Frequency),
		Compression: rs.Compression, BypassProxy: rs.BypassProxy,
		RecoveryPoints: rs.RecoveryPoints, PointInterval: time.Duration(rs.PointInterval),
	})
	return err != nil && !ship.Retryable(err), err
}

func (p *primaryRole) ReplicateBack(name string, ho wire.Handover) error {
	_, err := (*Daemon)(p).enableLocked(name, control.ReplicationSpec{
		Replica: ho.ReplicateTo, Frequency: control.Duration(ho.Frequency), Compression: ho.Compression,
		BypassProxy: ho.BypassProxy, Initial: "existing",
		RecoveryPoints: ho.RecoveryPoints, PointInterval: control.Duration(ho.PointInterval),
	})
	return err
}

// ServeAgain serves a VM again from the stand-in a transition left.
func (p *primaryRole) ServeAgain(name string) error {
	v, err := p.vm(name)
	if err != nil {
		return err
	}
	return (*Daemon)(p).restore(v.spec, nil)
}
