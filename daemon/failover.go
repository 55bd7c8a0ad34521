package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/statefile"
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

// testFailover is one running test failover.
type testFailover struct {
	vm      string
	point   snapshot.Point
	disks   []string
	view    *snapshot.View
	overlay *snapshot.Overlay
	scratch string
	started time.Time
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

func (t *testFailover) info() TestFailoverInfo {
	out := TestFailoverInfo{VM: t.vm, Point: t.point.ID, Cycle: t.point.Cycle, Time: t.point.Time, Started: t.started}
	for _, d := range t.disks {
		out.Exports = append(out.Exports, t.vm+testSuffix+"/"+d)
	}
	return out
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

const testsFile = "tests.json"

// PointsInfo lists a replica VM's recovery points.
type PointsInfo struct {
	VM     string           `json:"vm"`
	Keep   int              `json:"keep"`
	Points []snapshot.Point `json:"points"`
	// Bytes is the undo data all points take.
	Bytes int64 `json:"bytes"`
}

// Points lists the recovery points of a replica VM kept on this host.
func (d *Daemon) Points(name string) (PointsInfo, error) {
	ps, err := d.replica.Points(name)
	if errors.Is(err, apply.ErrUnknownVM) {
		return PointsInfo{}, fmt.Errorf("%w: %s is not a replica VM on this host", ErrUnknownVM, name)
	}
	if err != nil {
		return PointsInfo{}, err
	}
	out := PointsInfo{VM: name, Points: ps}
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

// FailoverTest starts a test failover of a replica VM: a writable,
// throw-away copy of point id ("" = the latest state) exported as
// VM-test/DISK. Replication goes on underneath.
func (d *Daemon) FailoverTest(name, id string) (FailoverResult, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	t, err := d.startTest(name, id)
	if err != nil {
		return FailoverResult{}, err
	}
	if err := d.saveTests(); err != nil {
		d.stopTestLocked(name)
		return FailoverResult{}, err
	}
	info := t.info()
	d.log.Info("test failover started", "vm", name, "point", info.Point, "exports", info.Exports)
	return FailoverResult{VM: name, Point: info.Point, Cycle: info.Cycle, Exports: info.Exports, Lacks: d.lacks(name)}, nil
}

func (d *Daemon) startTest(name, id string) (*testFailover, error) {
	d.mu.Lock()
	_, running := d.tests[name]
	_, clash := d.vms[name+testSuffix]
	d.mu.Unlock()
	switch {
	case running:
		return nil, fmt.Errorf("%w: a test failover of VM %s is running; stop it first (`vdrepl failover stop-test %s`)", ErrExists, name, name)
	case clash:
		return nil, fmt.Errorf("%w: a VM named %s%s is registered here; its exports would clash with the test failover's", ErrExists, name, testSuffix)
	}
	r, ok := d.replica.Replica(name)
	if !ok {
		return nil, fmt.Errorf("%w: %s is not a replica VM on this host", ErrUnknownVM, name)
	}
	view, err := d.replica.View(name, id)
	if err != nil {
		return nil, d.pointErr(err)
	}
	scratch := filepath.Join(d.cfg.StateDir, "test", name)
	if err := vfs.RemoveAll(d.fs, scratch); err != nil {
		view.Close()
		return nil, fmt.Errorf("test failover of %s: remove an old overlay: %w", name, err)
	}
	ov, err := view.Writable(scratch)
	if err != nil {
		view.Close()
		return nil, fmt.Errorf("test failover of %s: %w", name, err)
	}
	t := &testFailover{vm: name, point: view.Point(), view: view, overlay: ov, scratch: scratch, started: time.Now().UTC().Truncate(time.Second)}
	for _, disk := range r.Disks {
		t.disks = append(t.disks, disk.Name)
	}
	d.mu.Lock()
	d.tests[name] = t
	d.mu.Unlock()
	return t, nil
}

// pointErr turns apply's errors about points into the daemon's.
func (d *Daemon) pointErr(err error) error {
	switch {
	case errors.Is(err, apply.ErrUnknownVM):
		return fmt.Errorf("%w: %v", ErrUnknownVM, err)
	case errors.Is(err, apply.ErrNotFound), errors.Is(err, apply.ErrInvalid):
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	case errors.Is(err, apply.ErrExists):
		return fmt.Errorf("%w: %v", ErrExists, err)
	case errors.Is(err, snapshot.ErrBusy):
		return fmt.Errorf("%w: %v (stop the VM's test failover first)", ErrInUse, err)
	}
	return err
}

// StopTest ends a test failover: its exports are closed and what was
// written to them is discarded.
func (d *Daemon) StopTest(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.stopTestLocked(name); err != nil {
		return err
	}
	if err := d.saveTests(); err != nil {
		return err
	}
	if err := d.replica.Prune(name); err != nil {
		d.log.Warn("prune recovery points after a test failover", "vm", name, "err", err)
	}
	d.log.Info("test failover stopped", "vm", name)
	return nil
}

func (d *Daemon) stopTestLocked(name string) error {
	d.mu.Lock()
	t, ok := d.tests[name]
	delete(d.tests, name)
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: no test failover of VM %s is running", ErrInvalid, name)
	}
	for _, disk := range t.disks {
		d.nbd.CloseExport(name + testSuffix + "/" + disk)
	}
	return errors.Join(t.overlay.Close(), t.view.Close(), vfs.RemoveAll(d.fs, t.scratch))
}

// TestFailovers lists the running test failovers.
func (d *Daemon) TestFailovers() []TestFailoverInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []TestFailoverInfo{}
	for _, t := range d.tests {
		out = append(out, t.info())
	}
	slices.SortFunc(out, func(a, b TestFailoverInfo) int { return strings.Compare(a.VM, b.VM) })
	return out
}

// saveTests records the running test failovers (VM -> point).
func (d *Daemon) saveTests() error {
	d.mu.Lock()
	m := map[string]string{}
	for name, t := range d.tests {
		m[name] = t.point.ID
	}
	d.mu.Unlock()
	b, err := statefile.Encode("vdrepl-tests", 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(d.fs, filepath.Join(d.cfg.StateDir, testsFile), b, 0o600)
}

// restartTests starts again the test failovers a restart ended.
func (d *Daemon) restartTests() {
	if err := vfs.RemoveAll(d.fs, filepath.Join(d.cfg.StateDir, "test")); err != nil {
		d.log.Error("overlays of test failovers ended by the restart not removed", "err", err)
	}
	b, err := vfs.ReadFile(d.fs, filepath.Join(d.cfg.StateDir, testsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		d.log.Error("test failovers not restarted", "file", testsFile, "err", err)
		return
	}
	var m map[string]string
	if err := statefile.Decode("vdrepl-tests", 1, b, &m); err != nil {
		d.log.Error("test failovers not restarted", "file", testsFile, "err", err)
		return
	}
	for name, id := range m {
		if _, err := d.startTest(name, id); err != nil {
			d.log.Error("test failover ended by the restart and not started again", "vm", name, "point", id, "err", err)
			continue
		}
		d.log.Warn("test failover started again after a restart: writes made to it before were discarded", "vm", name, "point", id)
	}
	if err := d.saveTests(); err != nil {
		d.log.Warn("record test failovers", "err", err)
	}
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
func (d *Daemon) FailoverUnplanned(name, id string) (FailoverResult, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.notBusy(name); err != nil {
		return FailoverResult{}, err
	}
	fo, stopped, err := d.fo.Unplanned(name, id)
	if err != nil {
		return FailoverResult{}, d.failoverErr(err)
	}
	res := FailoverResult{VM: name, Point: fo.Point, Cycle: fo.Latest, Lacks: fo.Excluded, ExtendStopped: stopped}
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
func failedOverSpec(name string, fo failover.Target) VMSpec {
	spec := VMSpec{Name: name, Created: time.Now().UTC().Truncate(time.Second), FailedOver: true, Lacks: fo.Excluded}
	for i, disk := range fo.Disks {
		spec.Disks = append(spec.Disks, DiskSpec{Name: disk.Name, Path: fo.Images[i], Size: disk.Size})
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
		return nil, fmt.Errorf("%w: VM %s is not failed over on this host", ErrInvalid, name)
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
		return fmt.Errorf("%w: VM %s is open (%s); shut the VM down first", ErrInUse, name, users)
	}
	if v.spec.Replication != nil {
		return fmt.Errorf("%w: VM %s replicates to %s; disable that replication first", ErrInUse, name, v.spec.Replication.Replica)
	}
	d.mu.Lock()
	_, testing := d.tests[name]
	d.mu.Unlock()
	if testing {
		return fmt.Errorf("%w: a test failover of VM %s is running; `vdrepl failover stop-test %s` first", ErrInUse, name, name)
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
func (d *Daemon) guardFS(s VMSpec) (vfs.FS, error) {
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
func (d *Daemon) testExportLocked(vmName, diskName string) (blockdev.Export, bool) {
	name, ok := strings.CutSuffix(vmName, testSuffix)
	if !ok {
		return blockdev.Export{}, false
	}
	t, ok := d.tests[name]
	if !ok {
		return blockdev.Export{}, false
	}
	i := slices.Index(t.disks, diskName)
	if i < 0 {
		return blockdev.Export{}, false
	}
	return blockdev.Export{Name: vmName + "/" + diskName, Disk: t.overlay.Disk(i),
		Description: fmt.Sprintf("vdrepl test failover of VM %s, point %s, disk %s (writes are discarded)", name, t.point.ID, diskName)}, true
}
