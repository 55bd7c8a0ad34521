package daemon

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// The daemon's side of the failover state machine (package failover): the
// daemon as its Host and its PrimaryRole, apply.Server as its ReplicaRole,
// and the mapping of its refusals to the daemon's errors. Every method
// here is called with opMu held, but primaryRole.SendHandover.

// newMachine builds the failover state machine of d. The replica role is
// read when the machine calls it: Run sets it.
func (d *Daemon) newMachine() *failover.Machine {
	return failover.New(failover.Config{
		Host: (*failoverHost)(d), Replica: (*replicaRole)(d), Primary: (*primaryRole)(d),
		Lock: &d.opMu, Logger: d.log,
	})
}

// replicaRole is the Daemon's apply.Server as failover.ReplicaRole.
type replicaRole Daemon

func (rr *replicaRole) Status(name string) failover.ReplicaStatus {
	r := rr.replica
	if r == nil {
		return failover.ReplicaStatus{}
	}
	rep, ok := r.Replica(name)
	if !ok {
		return failover.ReplicaStatus{}
	}
	_, rolled := r.FailedOver()[name]
	return failover.ReplicaStatus{Known: true, Failover: rep.FailedOver, Rolled: rolled, Adopted: r.Adopted(name), Primary: rep.Primary}
}

func (rr *replicaRole) FailedOver() map[string]failover.Target {
	out := map[string]failover.Target{}
	for name, fo := range rr.replica.FailedOver() {
		out[name] = target(fo)
	}
	return out
}

func target(fo apply.FailedOverVM) failover.Target {
	return failover.Target{Disks: fo.Disks, Images: fo.Images, Excluded: fo.Excluded, FailedOver: fo.FailedOver}
}

func (rr *replicaRole) FailOver(name, kind, point string) (failover.Target, error) {
	fo, err := rr.replica.FailOver(name, kind, point)
	return target(fo), err
}

func (rr *replicaRole) CancelFailover(name string) error { return rr.replica.CancelFailover(name) }

func (rr *replicaRole) CompleteFailover(name string) error {
	if err := rr.replica.CompleteFailover(name); err != nil && !errors.Is(err, apply.ErrUnknownVM) {
		return err
	}
	return nil
}

// failoverHost is the Daemon as failover.Host.
type failoverHost Daemon

func (h *failoverHost) Entry(name string) (failover.Entry, bool) {
	d := (*Daemon)(h)
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[name]
	if !ok {
		return failover.Entry{}, false
	}
	return failover.Entry{Name: name, FailedOver: v.spec.FailedOver, Served: v.j != nil, PromotedFrom: v.spec.PromotedFrom, HandedOver: v.spec.HandedOver != nil}, true
}

func (h *failoverHost) Register(name string, t failover.Target, fresh bool, promotedFrom string) error {
	return (*Daemon)(h).registerFailedOver(name, t, fresh, promotedFrom)
}

// Release takes the VM out of service for change. The VM need not be
// served: a cancel interrupted after apply recorded it leaves the VM
// registered with its images guarded, and running the cancel again must
// get through (closing what is not open does nothing).
func (h *failoverHost) Release(name, why string, change func() error) error {
	d := (*Daemon)(h)
	d.mu.Lock()
	v, ok := d.vms[name]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	if v.busy {
		return errBusy(v)
	}
	return d.transition(v, why, change)
}

func (h *failoverHost) Forget(name string) { (*Daemon)(h).forget(name) }

func (h *failoverHost) MarkCompleted(name, promotedFrom string) error {
	d := (*Daemon)(h)
	d.mu.Lock()
	v, ok := d.vms[name]
	d.mu.Unlock()
	if !ok {
		return control.ErrUnknownVM
	}
	err := d.setSpec(v, func(s *control.VMSpec) {
		s.FailedOver = false
		if promotedFrom != "" {
			s.PromotedFrom = promotedFrom
		}
	})
	if err != nil {
		return err
	}
	d.log.Info("failover completed: the VM is this host's; recovery points discarded", "vm", name)
	return nil
}

func (h *failoverHost) StopExtension(name string) string {
	return (*Daemon)(h).stopExtendForFailover(name)
}

func (h *failoverHost) EndTest(name string) error {
	d := (*Daemon)(h)
	ended, err := d.tests.End(name)
	if ended {
		d.log.Warn("test failover stopped: the failover it ran beside was completed", "vm", name)
	}
	return err
}

// failoverErr turns the state machine's refusals into the daemon's errors
// (and apply's, through pointErr).
func (d *Daemon) failoverErr(err error) error {
	var fe *failover.Error
	if !errors.As(err, &fe) {
		return d.pointErr(err)
	}
	return controlErr(err)
}

// controlErr turns the state machine's refusals into the daemon's errors
// and returns every other error as it is.
func controlErr(err error) error {
	var fe *failover.Error
	if !errors.As(err, &fe) {
		return err
	}
	switch fe.Kind {
	case failover.ErrExists:
		return fmt.Errorf("%w: %s", control.ErrExists, fe.Reason)
	case failover.ErrInUse:
		return fmt.Errorf("%w: %s", control.ErrInUse, fe.Reason)
	}
	return fmt.Errorf("%w: %s", control.ErrInvalid, fe.Reason)
}

// applyFixes applies the fixes of failover.Reconcile to the registry list
// loaded at start-up and writes it once if anything changed. It returns
// the specs to open.
func (d *Daemon) applyFixes(specs []control.VMSpec, fixes []failover.Fix) []control.VMSpec {
	if len(fixes) == 0 {
		return specs
	}
	byName := map[string]failover.Fix{}
	for _, f := range fixes {
		byName[f.VM] = f
	}
	var out []control.VMSpec
	for _, s := range specs {
		switch byName[s.Name].Action {
		case failover.Forget:
			d.removeJournalDir(s.Name)
			continue
		case failover.MarkCompleted:
			s.FailedOver = false
		}
		out = append(out, s)
	}
	for _, f := range fixes {
		if f.Action == failover.Register {
			d.removeJournalDir(f.VM) // a cancelled failover's leftover
			out = append(out, failedOverSpec(f.VM, f.Target))
		}
	}
	if err := d.reg.save(out); err != nil {
		d.log.Error("save registry", "err", err)
	}
	return out
}

// removeJournalDir removes the state of a VM's journal, logging a failure
// (a leftover is harmless: a VM registered under the name later starts
// with a fresh journal only when the directory is gone, so say so).
func (d *Daemon) removeJournalDir(name string) {
	if err := vfs.RemoveAll(d.fs, filepath.Join(d.cfg.StateDir, "vms", name)); err != nil {
		d.log.Error("remove the journal of a VM no longer registered", "vm", name, "err", err)
	}
}

// entries are the registry's VMs as the state machine reads them.
func entries(specs []control.VMSpec) []failover.Entry {
	out := make([]failover.Entry, len(specs))
	for i, s := range specs {
		out[i] = failover.Entry{Name: s.Name, FailedOver: s.FailedOver, PromotedFrom: s.PromotedFrom, HandedOver: s.HandedOver != nil}
	}
	return out
}
