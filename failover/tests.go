package failover

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Test failover: a writable, throw-away copy of a recovery point of a
// replica VM, served beside the replica while replication goes on. Tests
// keeps the running ones and their record, STATE/tests.json (statefile
// envelope, format "vdrepl-tests", version 1, body: VM -> point id), so a
// restart starts each again from the same point, without the writes made
// to it before: those lived in STATE/test/VM/ (the scratch directory),
// which every start and stop removes.
//
//	none --Start--> running --Stop / End--> none
//	running --crash--> recorded --Restart--> running (fresh copy) | none
//
// Opening and closing the copy is the host's (a view of the point and an
// overlay on it, exported as VM-test/DISK): Config.Open.

// TestCopy is the open copy a test failover serves.
type TestCopy interface {
	// PointID is the recovery point the copy is of.
	PointID() string
	// Close stops serving the copy and closes it.
	Close() error
}

// TestsConfig configures Tests.
type TestsConfig[C TestCopy] struct {
	FS       vfs.FS // vfs.Default when nil
	StateDir string
	// Open opens a copy of point ("" = the latest state) of replica VM vm
	// whose writes go to scratch, a directory that does not exist.
	Open func(vm, point, scratch string) (C, error)
	// Taken refuses vm when its copy's exports would clash with a VM of
	// the host; nil to allow.
	Taken  func(vm string) error
	Logger *slog.Logger
}

// TestRun is a running test failover.
type TestRun[C TestCopy] struct {
	VM      string
	Copy    C
	Started time.Time
	scratch string
}

// Tests runs the test failovers of a host. It is safe for concurrent use;
// its mutex guards the running set only and is never held across I/O or a
// call to Open, Taken or a copy. The caller serialises Start, Stop, End
// and Restart (the daemon's operation lock).
type Tests[C TestCopy] struct {
	cfg TestsConfig[C]
	log *slog.Logger

	mu      sync.Mutex
	running map[string]*TestRun[C]
}

const (
	testsFile   = "tests.json"
	testsFormat = "vdrepl-tests"
)

// NewTests returns Tests with none running.
func NewTests[C TestCopy](cfg TestsConfig[C]) *Tests[C] {
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Tests[C]{cfg: cfg, log: cfg.Logger, running: map[string]*TestRun[C]{}}
}

func (ts *Tests[C]) scratch(vm string) string { return filepath.Join(ts.cfg.StateDir, "test", vm) }

// Start starts a test failover of vm at point and records it.
func (ts *Tests[C]) Start(vm, point string) (TestRun[C], error) {
	run, err := ts.open(vm, point)
	if err != nil {
		return TestRun[C]{}, err
	}
	if err := ts.save(); err != nil {
		return TestRun[C]{}, errors.Join(err, ts.stop(vm))
	}
	return *run, nil
}

// open opens and registers a test failover without recording it.
func (ts *Tests[C]) open(vm, point string) (*TestRun[C], error) {
	if _, ok := ts.Running(vm); ok {
		return nil, refuse(ErrExists, "a test failover of VM %s is running; stop it first (`vdrepl failover stop-test %s`)", vm, vm)
	}
	if ts.cfg.Taken != nil {
		if err := ts.cfg.Taken(vm); err != nil {
			return nil, err
		}
	}
	scratch := ts.scratch(vm)
	if err := vfs.RemoveAll(ts.cfg.FS, scratch); err != nil {
		return nil, fmt.Errorf("test failover of %s: remove an old overlay: %w", vm, err)
	}
	c, err := ts.cfg.Open(vm, point, scratch)
	if err != nil {
		return nil, err
	}
	run := &TestRun[C]{VM: vm, Copy: c, Started: time.Now().UTC().Truncate(time.Second), scratch: scratch}
	ts.mu.Lock()
	ts.running[vm] = run
	ts.mu.Unlock()
	return run, nil
}

// Stop ends the test failover of vm, discarding what was written to it,
// and records that.
// The record is saved even when the copy does not close cleanly: the run is
// gone either way, and a stale record would start it again after a restart.
func (ts *Tests[C]) Stop(vm string) error {
	if _, ok := ts.Running(vm); !ok {
		return refuse(ErrInvalid, "no test failover of VM %s is running", vm)
	}
	return errors.Join(ts.stop(vm), ts.save())
}

// End ends the test failover of vm if one runs (a failover it ran beside
// was completed) and records that; it reports whether one ran. A copy
// that does not close cleanly is logged: it is discarded all the same.
func (ts *Tests[C]) End(vm string) (bool, error) {
	if _, ok := ts.Running(vm); !ok {
		return false, nil
	}
	if err := ts.stop(vm); err != nil {
		ts.log.Warn("close the copy of an ended test failover", "vm", vm, "err", err)
	}
	return true, ts.save()
}

func (ts *Tests[C]) stop(vm string) error {
	ts.mu.Lock()
	run, ok := ts.running[vm]
	delete(ts.running, vm)
	ts.mu.Unlock()
	if !ok {
		return refuse(ErrInvalid, "no test failover of VM %s is running", vm)
	}
	return errors.Join(run.Copy.Close(), vfs.RemoveAll(ts.cfg.FS, run.scratch))
}

// Running returns the test failover of vm.
func (ts *Tests[C]) Running(vm string) (TestRun[C], bool) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	run, ok := ts.running[vm]
	if !ok {
		return TestRun[C]{}, false
	}
	return *run, true
}

// List lists the running test failovers by VM name.
func (ts *Tests[C]) List() []TestRun[C] {
	ts.mu.Lock()
	out := make([]TestRun[C], 0, len(ts.running))
	for _, run := range ts.running {
		out = append(out, *run)
	}
	ts.mu.Unlock()
	slices.SortFunc(out, func(a, b TestRun[C]) int { return strings.Compare(a.VM, b.VM) })
	return out
}

// CloseAll closes every copy at shutdown and keeps the record, so that
// Restart starts them again.
func (ts *Tests[C]) CloseAll() error {
	ts.mu.Lock()
	runs := ts.running
	ts.running = map[string]*TestRun[C]{}
	ts.mu.Unlock()
	var errs []error
	for _, run := range runs {
		errs = append(errs, run.Copy.Close())
	}
	return errors.Join(errs...)
}

func (ts *Tests[C]) save() error {
	m := map[string]string{}
	ts.mu.Lock()
	for name, run := range ts.running {
		m[name] = run.Copy.PointID()
	}
	ts.mu.Unlock()
	b, err := statefile.Encode(testsFormat, 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(ts.cfg.FS, filepath.Join(ts.cfg.StateDir, testsFile), b, 0o600)
}

// Restart starts again, each from its point and without its old writes,
// the test failovers a restart ended; those that cannot start are logged
// and dropped from the record.
func (ts *Tests[C]) Restart() {
	if err := vfs.RemoveAll(ts.cfg.FS, filepath.Join(ts.cfg.StateDir, "test")); err != nil {
		ts.log.Error("overlays of test failovers ended by the restart not removed", "err", err)
	}
	b, err := vfs.ReadFile(ts.cfg.FS, filepath.Join(ts.cfg.StateDir, testsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var m map[string]string
	if err == nil {
		err = statefile.Decode(testsFormat, 1, b, &m)
	}
	if err != nil {
		ts.log.Error("test failovers not restarted", "file", testsFile, "err", err)
		return
	}
	for _, name := range slices.Sorted(maps.Keys(m)) {
		if _, err := ts.open(name, m[name]); err != nil {
			ts.log.Error("test failover ended by the restart and not started again", "vm", name, "point", m[name], "err", err)
			continue
		}
		ts.log.Warn("test failover started again after a restart: writes made to it before were discarded", "vm", name, "point", m[name])
	}
	if err := ts.save(); err != nil {
		ts.log.Warn("record test failovers", "err", err)
	}
}
