package daemon

import (
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/ship"
)

// Fencing the old primary of an unplanned failover.
//
// While this host was down, the replica host failed its VM over: the VM
// runs there now, and this copy is stale. When this host comes back, the
// VM's shipper asks the replica to take its cycles and is told no
// (failed_over); its replication stops with state error. On that stop the
// daemon asks the replica about the VM (askReplica) and, when the answer
// says it was failed over (wire.Replica.FailedOver), fences the VM:
//
//   - control.VMSpec.Fenced is saved in the registry, so a restart keeps it;
//   - the gate (planned.go) refuses every write, on open connections and
//     FUSE files too (EPERM on NBD, EROFS on FUSE), and new NBD clients see
//     a read-only export;
//   - `vm list`, `replication status`, `vdrepl status` and `doctor` say
//     "FENCED: ...", the log says it at ERROR, and vdrepl_vm_fenced is 1.
//
// The fence ends when the admin reverses replication from the new
// primary (its enable adopts the VM here as a replica, which takes it out
// of the registry) or runs `vdrepl vm unfence VM --force`. An unfenced VM
// records the failover it was unfenced despite (UnfencedFailover), so the
// same answer of the replica does not fence it again.

// fence makes the gate refuse writes for good (until unfenced), whatever
// a planned failover does with ro.
func (g *gate) fence(on bool) {
	g.mu.Lock()
	g.fenced = on
	g.mu.Unlock()
}

// fenceEvents wraps a shipper's StateChanged: a replication that stopped
// may have stopped because the VM was failed over on the replica.
func (d *Daemon) fenceEvents(name string, ev ship.Events) ship.Events {
	next := ev.StateChanged
	ev.StateChanged = func(state, why string) {
		if next != nil {
			next(state, why)
		}
		if state == ship.StateError {
			go d.checkFence(name)
		}
	}
	return ev
}

// checkFence asks the replica of VM name whether it was failed over there,
// and fences the VM when it was.
func (d *Daemon) checkFence(name string) {
	d.mu.Lock()
	v, ok := d.vms[name]
	var spec control.VMSpec
	if ok {
		spec = v.spec
	}
	ctx := d.ctx
	d.mu.Unlock()
	rs := spec.Replication
	if !ok || rs == nil || spec.Fenced != nil || ctx == nil {
		return
	}
	cert, rep, _, err := d.askReplica(ctx, rs.Replica, rs.BypassProxy, name)
	if err != nil {
		d.log.Warn("replication stopped; the replica could not be asked whether the VM was failed over there", "vm", name, "replica", rs.Replica, "err", err)
		return
	}
	f := rep.FailedOver
	if f == nil {
		return
	}
	fence := control.Fence{Replica: rs.Replica, Kind: f.Kind, Point: f.Point, FailedOverAt: f.At.UTC(), Since: time.Now().UTC().Truncate(time.Second)}
	if cert != nil {
		fence.ReplicaName = pki.CertName(cert)
	}
	if err := d.fenceVM(name, fence); err != nil {
		d.log.Error("VM failed over on its replica host, but not fenced here", "vm", name, "err", err)
	}
}

// fenceVM records the fence of VM name and makes its disks read-only.
func (d *Daemon) fenceVM(name string, f control.Fence) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.servedVM(name)
	if err != nil {
		return err
	}
	if v.spec.Fenced != nil {
		return nil
	}
	if v.spec.UnfencedFailover.Equal(f.FailedOverAt) {
		d.log.Warn("VM failed over on its replica host and unfenced here by the admin: both copies may be written", "vm", name, "replica", f.Replica, "failed_over_at", f.FailedOverAt)
		return nil
	}
	// Writes stop first: the record follows, and a failure to save it
	// leaves the VM read-only until a restart asks the replica again.
	v.gate.fence(true)
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Fenced = &f }); err != nil {
		return fmt.Errorf("record the fence: %w", err)
	}
	d.log.Error("VM FENCED: "+f.Sentence()+"; its disks are read-only here until replication is reversed from there or `vdrepl vm unfence "+name+" --force`",
		"vm", name, "replica", f.Replica, "replica_name", f.ReplicaName, "kind", f.Kind, "failed_over_at", f.FailedOverAt)
	return nil
}

// Unfence makes a fenced VM writable again. Only with force: the VM runs
// on the replica host too, and writes here make a second, diverging copy.
func (d *Daemon) Unfence(name string, force bool) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.servedVM(name)
	if err != nil {
		return err
	}
	f := v.spec.Fenced
	if f == nil {
		return fmt.Errorf("%w: VM %s is not fenced", control.ErrInvalid, name)
	}
	if !force {
		return fmt.Errorf("%w: VM %s is %s. Unfencing makes this stale copy writable while the VM runs on %s: two copies written apart (split brain), whose writes here are never replicated and are lost when replication is reversed. To keep the VM on %s, reverse replication there instead (`vdrepl replication reverse %s --replica THIS_HOST:PORT`); to unfence anyway: `vdrepl vm unfence %s --force`",
			control.ErrInvalid, name, f.Sentence(), f.Replica, f.Replica, name, name)
	}
	at := f.FailedOverAt
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Fenced, s.UnfencedFailover = nil, at }); err != nil {
		return err
	}
	v.gate.fence(false)
	d.log.Warn("VM unfenced by the admin: writable here while it runs on its replica host too", "vm", name, "replica", f.Replica, "failed_over_at", at)
	return nil
}

// fenceWarnings are the lines `vdrepl status` shows for fenced VMs.
func fenceWarnings(vms []control.VMInfo) []string {
	var out []string
	for _, v := range vms {
		if f := v.Fenced; f != nil {
			out = append(out, fmt.Sprintf("VM %s: %s; its disks are read-only here: replicate it back from %s (`vdrepl replication reverse %s --replica THIS_HOST:PORT` there), or `vdrepl vm unfence %s --force`",
				v.Name, f.Sentence(), f.Replica, v.Name, v.Name))
		}
	}
	return out
}
