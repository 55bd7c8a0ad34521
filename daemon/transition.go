package daemon

import (
	"errors"
	"fmt"

	"github.com/vdrepl/vdrepl/control"
)

// The VM transition: how a served VM stops being served so its images can
// change hands (a cancelled failover rolls them back, an adopted VM becomes
// a replica, a removed VM is forgotten), and how it is served again when
// the change fails.
//
//	closeExports   every NBD connection to the VM's disks ends
//	stopServing    closeExports, then the journal closes: every write it
//	               took is in the images, and the image locks are dropped
//	transition     the registry map holds a stand-in for the VM (not served,
//	               busy, saying why), stopServing, then the change; when
//	               closing the journal or the change fails, the VM is opened
//	               again from its spec (restore)
//	restore        opens the VM again; a failure to do so is returned with
//	               the error that caused the restore, never only logged
//
// Callers hold opMu for the transition itself; the stand-in keeps other
// operations off the VM while a change finishes without it (an adoption,
// which apply finishes after Adopt returns).

// closeExports disconnects every NBD client of the disks of s.
func (d *Daemon) closeExports(s control.VMSpec) {
	for _, ds := range s.Disks {
		d.nbd.CloseExport(s.Name + "/" + ds.Name)
	}
}

// stopServing closes the exports and the journal of v.
func (d *Daemon) stopServing(v *vm) error {
	d.closeExports(v.spec)
	if err := v.close(); err != nil {
		return fmt.Errorf("VM %s: close its journal: %w", v.spec.Name, err)
	}
	return nil
}

// transition takes served VM v out of service and runs change (which may
// be nil: the caller finishes the change itself, and calls restore if it
// fails). why is what status shows for the VM meanwhile. On failure the VM
// is served again and the error says what failed, and whether the reopen
// failed too.
func (d *Daemon) transition(v *vm, why string, change func() error) error {
	d.mu.Lock()
	d.vms[v.spec.Name] = &vm{spec: v.spec, err: errors.New(why), busy: true}
	d.mu.Unlock()
	if err := d.stopServing(v); err != nil {
		return d.restore(v.spec, err)
	}
	if change == nil {
		return nil
	}
	if err := change(); err != nil {
		return d.restore(v.spec, err)
	}
	return nil
}

// restore serves the VM of spec s again after a transition failed with
// cause. It returns cause, joined with the reason the VM could not be
// opened again if it could not (the VM is then listed, not served, with
// that reason).
func (d *Daemon) restore(s control.VMSpec, cause error) error {
	nv, err := d.openVM(s, false)
	if err != nil {
		nv = &vm{spec: s, err: err}
		d.log.Error("VM not served again", "vm", s.Name, "err", err)
	}
	d.mu.Lock()
	d.vms[s.Name] = nv
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%w; VM %s could not be served again: %w", cause, s.Name, err)
	}
	return cause
}

// errBusy answers an operation on a VM in the middle of a transition.
func errBusy(v *vm) error {
	return fmt.Errorf("%w: VM %s is changing (%v); try again", control.ErrInUse, v.spec.Name, v.err)
}
