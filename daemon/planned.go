package daemon

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/crashpoint"
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

// gate makes a VM's disks read-only for a planned failover. A write holds
// it shared for its whole journal append, so once set returns, every
// write that was let through is in the journal: a cycle sealed then holds
// all of them.
type gate struct {
	mu sync.RWMutex
	ro bool
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
	if g.ro {
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

// adoptWait is how long FailoverPlanned waits for the new primary to
// replicate back before it returns anyway.
const adoptWait = 2 * time.Minute

// FailoverPlanned hands a VM over to its replica (see the top of this
// file). reverseTo is where the replica should replicate back to ("" =
// this host's replica listener, by its certificate name when it listens
// on every address).
func (d *Daemon) FailoverPlanned(ctx context.Context, name string, force bool, reverseTo string) (control.PlannedResult, error) {
	d.opMu.Lock()
	v, err := d.servedVM(name)
	if r, ok := d.replica.Replica(name); err != nil && ok {
		err = fmt.Errorf("%w: VM %s is a replica on this host; run the planned failover on its primary (%s), or `vdrepl failover unplanned %s` here if the primary is lost", control.ErrInvalid, name, r.Primary, name)
	}
	if err == nil && d.identity == nil {
		err = fmt.Errorf("%w: %v", control.ErrInvalid, errNoIdentity)
	}
	if err != nil {
		d.opMu.Unlock()
		return control.PlannedResult{}, err
	}
	if v.spec.HandedOver == nil {
		if err := d.prepareHandover(ctx, v, force, reverseTo); err != nil {
			d.opMu.Unlock()
			return control.PlannedResult{}, err
		}
	}
	h := v.spec.HandedOver
	rs := v.spec.Replication
	res := control.PlannedResult{VM: name, To: h.To, Cycle: h.Cycle}
	wait := d.adoptWaiter(name)
	d.opMu.Unlock()

	host, _, _ := net.SplitHostPort(h.To)
	_, err = ship.Handover(ctx, h.To, d.identity.ClientConfig(host), rs.BypassProxy, name, wire.Handover{
		Cycle: h.Cycle, ReplicateTo: h.ReplicateTo, Frequency: time.Duration(rs.Frequency),
		Compression: rs.Compression, BypassProxy: rs.BypassProxy,
		RecoveryPoints: rs.RecoveryPoints, PointInterval: time.Duration(rs.PointInterval),
	})
	if err != nil {
		if !ship.Retryable(err) {
			d.undoHandover(name)
			return control.PlannedResult{}, fmt.Errorf("planned failover of %s refused by %s, the VM is served here again: %w", name, h.To, err)
		}
		return control.PlannedResult{}, fmt.Errorf("planned failover of %s: the handover to %s is not confirmed (the VM stays read-only here); run the command again: %w", name, h.To, err)
	}
	d.log.Info("planned failover: handed over", "vm", name, "to", h.To, "cycle", h.Cycle)
	select {
	case <-wait:
		res.Reversed = true
	case <-time.After(adoptWait):
	case <-ctx.Done():
	}
	return res, nil
}

// prepareHandover is steps 1 to 4 of a planned failover. Caller holds
// opMu.
func (d *Daemon) prepareHandover(ctx context.Context, v *vm, force bool, reverseTo string) error {
	name := v.spec.Name
	rs := v.spec.Replication
	switch {
	case rs == nil:
		return fmt.Errorf("%w: VM %s is not replicated; a planned failover hands it to its replica", control.ErrInvalid, name)
	case v.spec.FailedOver:
		return fmt.Errorf("%w: VM %s is failed over here and not completed; complete the failover first", control.ErrInvalid, name)
	case d.replica == nil || d.replicaAddr == "":
		return fmt.Errorf("%w: this host must take replication of %s back after the failover: start `vdrepl serve` with --replica-listen", control.ErrInvalid, name)
	}
	d.mu.Lock()
	users := d.usersLocked(name)
	d.mu.Unlock()
	if users != "" && !force {
		return fmt.Errorf("%w: VM %s is open (%s); shut the VM down first, or --force makes its disks read-only under it", control.ErrInUse, name, users)
	}
	host, _, _ := net.SplitHostPort(rs.Replica)
	cert, _, err := ship.Replica(ctx, rs.Replica, d.identity.ClientConfig(host), rs.BypassProxy, name)
	if err != nil {
		return fmt.Errorf("planned failover of %s: ask the replica %s: %w", name, rs.Replica, err)
	}
	if cert == nil || !d.replica.Allows(cert) {
		peer := "the replica"
		if cert != nil {
			peer = pki.CertName(cert)
		}
		return fmt.Errorf("%w: this host would refuse replication of %s back from %s: `vdrepl replica allow add --primary %s --storage DIR` first", control.ErrInvalid, name, peer, peer)
	}
	if reverseTo == "" {
		if reverseTo, err = d.replicaAddress(); err != nil {
			return err
		}
	}
	v.gate.set(true)
	if force {
		d.closeExports(v.spec)
	}
	sh, err := d.shipper(name)
	if err == nil {
		_, err = sh.Sync(ctx, false)
	}
	if err != nil {
		v.gate.set(false)
		return fmt.Errorf("planned failover of %s: ship the last cycle: %w", name, err)
	}
	st := sh.Status()
	ho := &control.HandedOver{To: rs.Replica, ToName: pki.CertName(cert), Cycle: st.LastApplied, ReplicateTo: reverseTo, At: time.Now().UTC().Truncate(time.Second)}
	if err := d.setSpec(v, func(s *control.VMSpec) { s.HandedOver = ho }); err != nil {
		v.gate.set(false)
		return err
	}
	d.stopShipper(v)
	crashpoint.Hit("handover-recorded")
	return nil
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

// undoHandover serves a VM again after its replica refused the handover.
func (d *Daemon) undoHandover(name string) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.servedVM(name)
	if err != nil || v.spec.HandedOver == nil {
		return
	}
	if err := d.setSpec(v, func(s *control.VMSpec) { s.HandedOver = nil }); err != nil {
		d.log.Error("undo a refused handover", "vm", name, "err", err)
		return
	}
	v.gate.set(false)
	if err := d.startShipper(v); err != nil {
		d.log.Error("replication not running", "vm", name, "err", err)
	}
}

// adoptWaiter returns a channel closed when VM name is adopted.
func (d *Daemon) adoptWaiter(name string) <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	ch, ok := d.adopted[name]
	if !ok {
		ch = make(chan struct{})
		d.adopted[name] = ch
	}
	return ch
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
	if r.Initial != "" && r.Initial != "existing" {
		return r, fmt.Errorf("%w: reverse replication compares with the images the old primary has; --initial does not apply", control.ErrInvalid)
	}
	r.Initial = "existing"
	if v.spec.FailedOver {
		if err := d.fo.Complete(name, ""); err != nil {
			return r, d.failoverErr(err)
		}
	}
	return d.enableLocked(name, r)
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

// Adopt hands a VM of this host to the replica role (see apply.Host).
//
// No lock of the daemon is held while apply registers the replica VM:
// Adopt takes opMu for the checks and the transition that stops serving
// the VM, and returns with a busy stand-in in the VM's place; every
// operation that finds the stand-in refuses the VM (errBusy) until finish
// takes opMu again and forgets the VM or serves it again.
func (h *hostHooks) Adopt(name, peer string, cert *x509.Certificate, en wire.Enable) ([]string, func(bool), error) {
	d := (*Daemon)(h)
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, images, err := d.adoptable(name, peer, cert, en)
	if err != nil {
		return nil, nil, err
	}
	// What this host wrote after the replica's last cycle is overwritten
	// by the resync that follows (the VM runs there now): say how much.
	if v.spec.HandedOver == nil {
		if cs, js := v.j.Cycles(), v.j.Stats(); len(cs) > 0 || js.RetainedBytes > 0 {
			d.log.Warn("VM becomes a replica: writes made here that never reached the new primary are discarded",
				"vm", name, "primary", peer, "unshipped_cycles", len(cs), "unshipped_bytes", js.RetainedBytes)
		}
	}
	// Stop serving it and write everything back; the images are the
	// replica's from here.
	d.stopShipper(v)
	if err := d.transition(v, "becoming a replica", nil); err != nil {
		return nil, nil, err
	}
	spec := v.spec
	finish := func(ok bool) {
		d.opMu.Lock()
		defer d.opMu.Unlock()
		if !ok {
			if err := d.restore(spec, nil); err != nil {
				d.log.Error("VM not adopted and not served again", "vm", name, "err", err)
			}
			return
		}
		d.forget(name)
		d.mu.Lock()
		if ch, ok := d.adopted[name]; ok {
			close(ch)
			delete(d.adopted, name)
		}
		d.mu.Unlock()
		d.log.Info("replication reversed: this host is now the replica of the VM", "vm", name, "primary", peer)
	}
	return images, finish, nil
}

// adoptable checks that VM name may become the replica of peer and
// returns it with the images of the disks en enables. Caller holds opMu.
func (d *Daemon) adoptable(name, peer string, cert *x509.Certificate, en wire.Enable) (*vm, []string, error) {
	v, err := d.servedVM(name)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: VM %s cannot become a replica here: %v", apply.ErrForbidden, name, err)
	}
	target := ""
	switch {
	case v.spec.HandedOver != nil:
		target = v.spec.HandedOver.To
	case v.spec.Replication != nil:
		target = v.spec.Replication.Replica
	}
	host, _, _ := net.SplitHostPort(target)
	if target == "" || cert == nil || cert.VerifyHostname(host) != nil {
		return nil, nil, fmt.Errorf("%w: VM %s runs on this host and %q is not the host it replicates to", apply.ErrForbidden, name, peer)
	}
	d.mu.Lock()
	users := d.usersLocked(name)
	d.mu.Unlock()
	if users != "" {
		return nil, nil, fmt.Errorf("%w: VM %s still runs on this host (%s): shut it down here to let %s replicate it back (%w)", apply.ErrBusy, name, users, peer, errAdoptBusy)
	}
	var images []string
	for _, wd := range en.Disks {
		i := slices.IndexFunc(v.spec.Disks, func(ds control.DiskSpec) bool { return ds.Name == wd.Name })
		if i < 0 || v.spec.Disks[i].Size != wd.Size {
			return nil, nil, fmt.Errorf("%w: VM %s here has no disk %s of %d bytes", apply.ErrMismatch, name, wd.Name, wd.Size)
		}
		images = append(images, v.spec.Disks[i].Path)
	}
	return v, images, nil
}

// Promote makes a replica VM this host's in a planned failover (see
// apply.Host).
func (h *hostHooks) Promote(name, peer string, ho wire.Handover) error {
	d := (*Daemon)(h)
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.notBusy(name); err != nil {
		return err
	}
	if _, err := d.fo.Promote(name, peer); err != nil {
		var fe *failover.Error
		if errors.As(err, &fe) && fe.Kind == failover.ErrExists {
			return fmt.Errorf("%w: %s", apply.ErrExists, fe.Reason)
		}
		return err
	}
	return d.replicateBack(name, ho)
}

// replicateBack enables replication of a promoted VM to its old primary,
// unless it is enabled already.
func (d *Daemon) replicateBack(name string, ho wire.Handover) error {
	v, err := d.servedVM(name)
	if err != nil {
		return err
	}
	if v.spec.Replication != nil {
		return nil
	}
	_, err = d.enableLocked(name, control.ReplicationSpec{
		Replica: ho.ReplicateTo, Frequency: control.Duration(ho.Frequency), Compression: ho.Compression,
		BypassProxy: ho.BypassProxy, Initial: "existing",
		RecoveryPoints: ho.RecoveryPoints, PointInterval: control.Duration(ho.PointInterval),
	})
	return err
}
