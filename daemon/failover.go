package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/snapshot"
)

// Failover on the replica host (unplanned, test) and recovery points.
//
// An unplanned failover makes a replica VM a VM of this daemon: apply
// records the failover and rolls the images to the chosen point keeping
// every point (apply.Server.FailOver), then the VM is registered with
// failed_over set and its images opened through the points' guard, so
// every write it takes is undone by a cancel. Complete drops the points in
// apply and clears failed_over; cancel closes the VM's journal (everything
// written back), has apply roll back to the latest point, and forgets the
// VM. Each step is durable before the next, and Run reconciles the
// registry with apply's record after a crash (reconcileFailovers):
//
//	registry failed_over  apply             meaning: Run...
//	no                    failed over       failover not registered: registers it
//	yes                   failed over       serves it through the guard
//	yes                   failing over      revert unfinished: not served, says so
//	yes                   replica again     cancelled: forgets the VM
//	yes                   no replica        completed: serves it plainly
//
// A test failover opens a view of a point and a throw-away overlay on it
// (snapshot.View.Writable) exported as VM-test/DISK; apply goes on
// underneath. It is recorded in tests.json and started afresh (from the
// same point, without the old scratch writes) after a restart.

// testSuffix names the exports of a test failover: VM-test/DISK.
const testSuffix = "-test"

// testFailover is the copy a running test failover serves
// (failover.TestCopy): a view of the point and an overlay on it.
type testFailover struct {
	d       *Daemon
	vm      string
	point   snapshot.Point
	disks   []string
	view    *snapshot.View
	overlay *snapshot.Overlay
}

func (t *testFailover) PointID() string { return t.point.ID }

// Close ends the copy's exports and closes it.
func (t *testFailover) Close() error {
	for _, disk := range t.disks {
		t.d.nbd.CloseExport(t.vm + testSuffix + "/" + disk)
	}
	return errors.Join(t.overlay.Close(), t.view.Close())
}

func testInfo(run failover.TestRun[*testFailover]) control.TestFailoverInfo {
	t := run.Copy
	out := control.TestFailoverInfo{VM: t.vm, Point: t.point.ID, Cycle: t.point.Cycle, Time: t.point.Time, Started: run.Started}
	for _, d := range t.disks {
		out.Exports = append(out.Exports, t.vm+testSuffix+"/"+d)
	}
	return out
}

// Points lists the recovery points of a replica VM kept on this host.
func (d *Daemon) Points(name string) (control.PointsInfo, error) {
	ps, err := d.replica.Points(name)
	if errors.Is(err, apply.ErrUnknownVM) {
		return control.PointsInfo{}, fmt.Errorf("%w: %s is not a replica VM on this host", control.ErrUnknownVM, name)
	}
	if err != nil {
		return control.PointsInfo{}, err
	}
	out := control.PointsInfo{VM: name, Points: ps}
	if out.Points == nil {
		out.Points = []snapshot.Point{}
	}
	if r, ok := d.replica.Replica(name); ok {
		out.Keep = r.RecoveryPoints
	}
	if len(ps) > 0 {
		out.Bytes = ps[0].Bytes
	}
	return out, nil
}

// VerifyPoint checks recovery point id of a replica VM kept on this host
// against the block-tree roots recorded when it was taken.
func (d *Daemon) VerifyPoint(ctx context.Context, name, id string) (apply.PointCheck, error) {
	c, err := d.replica.VerifyPoint(ctx, name, id)
	switch {
	case errors.Is(err, apply.ErrUnavailable):
		return c, fmt.Errorf("%w: %v", control.ErrInvalid, err)
	case err != nil:
		return c, d.pointErr(err)
	}
	return c, nil
}

// FailoverTest starts a test failover of a replica VM: a writable,
// throw-away copy of point id ("" = the latest state) exported as
// VM-test/DISK. Replication goes on underneath.
func (d *Daemon) FailoverTest(name, id string) (control.FailoverResult, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	run, err := d.tests.Start(name, id)
	if err != nil {
		return control.FailoverResult{}, d.failoverErr(err)
	}
	info := testInfo(run)
	d.log.Info("test failover started", "vm", name, "point", info.Point, "exports", info.Exports)
	return control.FailoverResult{VM: name, Point: info.Point, Cycle: info.Cycle, Exports: info.Exports, Lacks: d.lacks(name)}, nil
}

// newTests builds the test failovers of this host over its replica role.
func (d *Daemon) newTests() *failover.Tests[*testFailover] {
	return failover.NewTests(failover.TestsConfig[*testFailover]{
		FS: d.fs, StateDir: d.cfg.StateDir, Open: d.openTest, Taken: d.testTaken, Logger: d.log,
	})
}

// testTaken refuses a test failover whose exports would clash with a VM.
func (d *Daemon) testTaken(name string) error {
	d.mu.Lock()
	_, clash := d.vms[name+testSuffix]
	d.mu.Unlock()
	if clash {
		return fmt.Errorf("%w: a VM named %s%s is registered here; its exports would clash with the test failover's", control.ErrExists, name, testSuffix)
	}
	return nil
}

// openTest opens the copy of point id of replica VM name a test failover
// serves, its writes going to scratch.
func (d *Daemon) openTest(name, id, scratch string) (*testFailover, error) {
	r, ok := d.replica.Replica(name)
	if !ok {
		return nil, fmt.Errorf("%w: %s is not a replica VM on this host", control.ErrUnknownVM, name)
	}
	view, err := d.replica.View(name, id)
	if err != nil {
		return nil, d.pointErr(err)
	}
	ov, err := view.Writable(scratch)
	if err != nil {
		view.Close()
		return nil, fmt.Errorf("test failover of %s: %w", name, err)
	}
	t := &testFailover{d: d, vm: name, point: view.Point(), view: view, overlay: ov}
	for _, disk := range r.Disks {
		t.disks = append(t.disks, disk.Name)
	}
	return t, nil
}

// pointErr turns apply's errors about points into the daemon's.
func (d *Daemon) pointErr(err error) error {
	switch {
	case errors.Is(err, apply.ErrUnknownVM):
		return fmt.Errorf("%w: %v", control.ErrUnknownVM, err)
	case errors.Is(err, apply.ErrNotFound), errors.Is(err, apply.ErrInvalid):
		return fmt.Errorf("%w: %v", control.ErrInvalid, err)
	case errors.Is(err, apply.ErrExists):
		return fmt.Errorf("%w: %v", control.ErrExists, err)
	case errors.Is(err, snapshot.ErrBusy):
		return fmt.Errorf("%w: %v (stop the VM's test failover first)", control.ErrInUse, err)
	}
	return err
}

// StopTest ends a test failover: its exports are closed and what was
// written to them is discarded.
func (d *Daemon) StopTest(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.tests.Stop(name); err != nil {
		return d.failoverErr(err)
	}
	if err := d.replica.Prune(name); err != nil {
		d.log.Warn("prune recovery points after a test failover", "vm", name, "err", err)
	}
	d.log.Info("test failover stopped", "vm", name)
	return nil
}

// TestFailovers lists the running test failovers.
func (d *Daemon) TestFailovers() []control.TestFailoverInfo {
	out := []control.TestFailoverInfo{}
	for _, run := range d.tests.List() {
		out = append(out, testInfo(run))
	}
	return out
}

// testFailoverOf is the running test failover of VM name; nil when none.
func (d *Daemon) testFailoverOf(name string) *control.TestFailoverInfo {
	run, ok := d.tests.Running(name)
	if !ok {
		return nil
	}
	info := testInfo(run)
	return &info
}

// lacks names the primary's disks a replica VM does not have.
func (d *Daemon) lacks(name string) []string {
	r, _ := d.replica.Replica(name)
	return r.Excluded
}

// FailoverUnplanned fails a replica VM over on this host, the primary being
// lost: its disks are rolled to point id ("" = the latest state) and
// served read-write as VM/DISK. Running it again after an interruption
// finishes it.
func (d *Daemon) FailoverUnplanned(name, id string) (control.FailoverResult, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.notBusy(name); err != nil {
		return control.FailoverResult{}, err
	}
	fo, stopped, err := d.fo.Unplanned(name, id)
	if err != nil {
		return control.FailoverResult{}, d.failoverErr(err)
	}
	res := control.FailoverResult{VM: name, Point: fo.Point, Cycle: fo.Latest, Lacks: fo.Excluded, ExtendStopped: stopped}
	for _, disk := range fo.Disks {
		res.Exports = append(res.Exports, name+"/"+disk.Name)
	}
	d.log.Info("unplanned failover: VM served from its replica", "vm", name, "point", failover.PointName(fo.Point), "exports", res.Exports, "lacks_disks", fo.Excluded)
	return res, nil
}

// notBusy refuses a VM in the middle of a transition.
func (d *Daemon) notBusy(name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if v, ok := d.vms[name]; ok && v.busy {
		return errBusy(v)
	}
	return nil
}

// registerFailedOver makes a failed-over replica VM a VM of this daemon.
// fresh: the registry does not name the VM, so a journal directory of that
// name is a leftover of an earlier failover that was cancelled, and holds
// nothing the images need.
//
// promotedFrom is the old primary of a planned failover: recorded from the
// start, so that a crash anywhere in the promotion leaves a VM that a
// repeated handover from that peer recognises.
func (d *Daemon) registerFailedOver(name string, fo failover.Target, fresh bool, promotedFrom string) error {
	spec := failedOverSpec(name, fo)
	spec.PromotedFrom = promotedFrom
	if fresh {
		if err := vfs.RemoveAll(d.fs, filepath.Join(d.cfg.StateDir, "vms", name)); err != nil {
			return fmt.Errorf("failed-over VM %s: remove the journal of an earlier failover: %w", name, err)
		}
	}
	v, err := d.openVM(spec, false)
	if err != nil {
		return err
	}
	d.mu.Lock()
	old := d.vms[name]
	next := d.specsLocked()
	if old == nil {
		next = append(next, v.spec)
	} else {
		for i := range next {
			if next[i].Name == name {
				next[i] = v.spec
			}
		}
	}
	d.mu.Unlock()
	if err := d.reg.save(next); err != nil {
		v.close()
		return fmt.Errorf("save registry: %w", err)
	}
	d.mu.Lock()
	d.vms[name] = v
	d.mu.Unlock()
	return nil
}

// stopExtendForFailover stops the extension of a replica VM about to fail
// over here and returns where it went ("" if it had none): what the
// failed-over VM writes is not a state of its primary, so it must not
// reach the third host as one.
func (d *Daemon) stopExtendForFailover(name string) string {
	x, ok := d.relays.Running(name)
	if !ok || !d.relays.Stop(name) {
		return ""
	}
	if err := d.relays.Save(); err != nil {
		d.log.Error("record extensions", "err", err)
	}
	if err := d.relays.Remove(name); err != nil {
		d.log.Error("remove the relay journal of a stopped extension", "vm", name, "err", err)
	}
	d.log.Warn("extended replication stopped by the failover", "vm", name, "to", x.Replica)
	return x.Replica
}

// failedOverSpec is the registry entry of a replica VM failed over here.
func failedOverSpec(name string, fo failover.Target) control.VMSpec {
	spec := control.VMSpec{Name: name, Created: time.Now().UTC().Truncate(time.Second), FailedOver: true, Lacks: fo.Excluded}
	for i, disk := range fo.Disks {
		spec.Disks = append(spec.Disks, control.DiskSpec{Name: disk.Name, Path: fo.Images[i], Size: disk.Size})
	}
	return spec
}

// failedOverVM returns a VM of this daemon that is a failover not yet
// completed.
func (d *Daemon) failedOverVM(name string) (*vm, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[name]
	if !ok || !v.spec.FailedOver {
		return nil, fmt.Errorf("%w: VM %s is not failed over on this host", control.ErrInvalid, name)
	}
	if v.busy {
		return nil, errBusy(v)
	}
	return v, nil
}

// CompleteFailover makes a failover final: the recovery points are
// discarded and the VM is this host's own.
func (d *Daemon) CompleteFailover(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if _, err := d.failedOverVM(name); err != nil {
		return err
	}
	return d.failoverErr(d.fo.Complete(name, ""))
}

// CancelFailover ends a failover that is not completed: the VM's disks
// return to the latest replicated state (what was written since the
// failover is discarded), the VM is a replica again and takes its
// primary's cycles. Its clients must be gone.
func (d *Daemon) CancelFailover(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.failedOverVM(name)
	if err != nil {
		return err
	}
	d.mu.Lock()
	users := d.usersLocked(name)
	d.mu.Unlock()
	if users != "" {
		return fmt.Errorf("%w: VM %s is open (%s); shut the VM down first", control.ErrInUse, name, users)
	}
	if v.spec.Replication != nil {
		return fmt.Errorf("%w: VM %s replicates to %s; disable that replication first", control.ErrInUse, name, v.spec.Replication.Replica)
	}
	if _, testing := d.tests.Running(name); testing {
		return fmt.Errorf("%w: a test failover of VM %s is running; `vdrepl failover stop-test %s` first", control.ErrInUse, name, name)
	}
	if err := d.fo.Cancel(name); err != nil {
		return d.failoverErr(err)
	}
	d.log.Info("failover cancelled: a replica again, at the latest state before the failover", "vm", name)
	return nil
}

// forget drops a VM from the registry and its journal from the state
// directory (after a cancelled failover or an adoption).
func (d *Daemon) forget(name string) {
	d.mu.Lock()
	delete(d.vms, name)
	next := d.specsLocked()
	d.mu.Unlock()
	if err := d.reg.save(next); err != nil {
		// Run finds the cancel done in apply and forgets it then.
		d.log.Error("save registry after a cancelled failover", "vm", name, "err", err)
	}
	d.removeJournalDir(name)
}

// guardFS is the filesystem a VM's journal uses for its images: for a
// failed-over VM, the replica's recovery point guard.
func (d *Daemon) guardFS(s control.VMSpec) (vfs.FS, error) {
	if !s.FailedOver {
		return nil, nil
	}
	fo, ok := d.replica.FailedOver()[s.Name]
	if !ok {
		return nil, fmt.Errorf("the failover of VM %s was interrupted before its disks were rolled to the point; run `vdrepl failover unplanned %s` again", s.Name, s.Name)
	}
	return fo.Points.GuardFS(vfs.Default), nil
}

// testExport finds an export of a test failover.
func (d *Daemon) testExport(vmName, diskName string) (blockdev.Export, bool) {
	name, ok := strings.CutSuffix(vmName, testSuffix)
	if !ok {
		return blockdev.Export{}, false
	}
	run, ok := d.tests.Running(name)
	if !ok {
		return blockdev.Export{}, false
	}
	t := run.Copy
	i := slices.Index(t.disks, diskName)
	if i < 0 {
		return blockdev.Export{}, false
	}
	return blockdev.Export{Name: vmName + "/" + diskName, Disk: t.overlay.Disk(i),
		Description: fmt.Sprintf("vdrepl test failover of VM %s, point %s, disk %s (writes are discarded)", name, t.point.ID, diskName)}, true
}
