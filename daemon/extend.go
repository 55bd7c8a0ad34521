package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

// Extended (chained) replication: a replica host passes what it applies of
// a VM on to a third host.
//
// The relay is a journal (package journal, with all its cycles, coalescing,
// crash recovery, cap and dirty tracking) over the replica images that
// never writes back: its FS drops image writes (sinkFS), since apply has
// written the same content to the images already, and reads pass through.
// Apply feeds it every frame it applies (apply.Relay), one applied cycle or
// resync between Begin and End; the relay's seals take the same lock, so
// a relay cycle always ends on a cycle boundary of the primary, and they
// are refused while the replica VM is not consistent. A shipper (package
// ship, as on a primary) ships the relay's cycles to the third host, with
// an initial copy and resyncs read from the live replica images, exactly
// as a primary reads its disks while its guest writes.
//
// extend.json records each extension; the relay journal and the shipper's
// state live in STATE/extend/VM/.

const extendFile = "extend.json"

// extension is a running extension.
type extension struct {
	vm    string
	spec  ExtendSpec
	relay *relay
	ship  *ship.Shipper
	stop  context.CancelFunc
	done  chan struct{}
}

// relay is a replica VM's relay journal as apply.Relay and ship.Journal.
type relay struct {
	j  *journal.Journal
	d  *Daemon
	vm string

	mu  sync.Mutex // held from Begin to End, and by Seal
	err error      // the first error since Begin
}

func (r *relay) Begin() { r.mu.Lock(); r.err = nil }

func (r *relay) WriteAt(disk int, p []byte, off int64) error {
	if r.err == nil {
		_, r.err = r.j.Disk(disk).WriteAt(p, off)
	}
	return r.err
}

func (r *relay) Zero(disk int, off, n int64, typ wire.FrameType) error {
	if r.err == nil {
		switch typ {
		case wire.FrameTrim:
			r.err = r.j.Disk(disk).Trim(off, n)
		default:
			r.err = r.j.Disk(disk).Zero(off, n, typ != wire.FrameZeroAlloc)
		}
	}
	return r.err
}

func (r *relay) End(err error) error {
	defer r.mu.Unlock()
	if err == nil {
		err = r.err
	}
	if err == nil {
		err = r.j.Flush()
	}
	return err
}

// errNotConsistent: the relay does not cut a cycle while the replica VM is
// not consistent (an initial copy or a resync has not finished there).
var errNotConsistent = errors.New("the replica VM is not consistent yet")

// relayJournal is what the extension's shipper reads: the relay journal,
// with seals between applies only.
type relayJournal struct {
	ship.Journal
	r *relay
}

// Seal and BeginResync check consistency holding the relay's lock, so no
// apply (a sync piece that makes the replica inconsistent) slips in
// between the check and the cut. Lock order: relay.mu, then the replica
// VM's state lock (apply's vm.mu), never the other way.
func (rj relayJournal) Seal(flags uint64) (journal.CycleInfo, error) {
	rj.r.mu.Lock()
	defer rj.r.mu.Unlock()
	if err := rj.r.consistent(); err != nil {
		return journal.CycleInfo{}, err
	}
	return rj.r.j.Seal(flags)
}

func (rj relayJournal) BeginResync() (journal.CycleInfo, error) {
	rj.r.mu.Lock()
	defer rj.r.mu.Unlock()
	if err := rj.r.consistent(); err != nil {
		return journal.CycleInfo{}, err
	}
	return rj.r.j.BeginResync()
}

func (r *relay) consistent() error {
	rep, ok := r.d.replica.Replica(r.vm)
	if !ok {
		return fmt.Errorf("replica VM %s is gone", r.vm)
	}
	if !rep.Consistent {
		return fmt.Errorf("%w (state %s)", errNotConsistent, rep.State)
	}
	return nil
}

// sinkFS passes everything to vfs.Default except writes of the images,
// which it drops.
type sinkFS struct {
	vfs.FS
	images map[string]bool
}

func (s sinkFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := s.FS.OpenFile(name, flag, perm)
	if err != nil || !s.images[filepath.Clean(name)] {
		return f, err
	}
	return sinkFile{f}, nil
}

// sinkFile is an image the relay only reads. It lacks vfs.DirectWriter.
type sinkFile struct{ vfs.File }

func (sinkFile) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (sinkFile) PunchHole(off, n int64) error             { return nil }
func (sinkFile) ZeroRange(off, n int64) error             { return nil }
func (sinkFile) Sync() error                              { return nil }
func (sinkFile) Truncate(int64) error                     { return nil }

// ExtendReplication starts passing a replica VM on to a third host.
func (d *Daemon) ExtendReplication(name string, s ExtendSpec) (ExtendSpec, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	rep, ok := d.replica.Replica(name)
	if !ok {
		return s, fmt.Errorf("%w: %s is not a replica VM on this host; extend replication on the replica host", ErrUnknownVM, name)
	}
	d.mu.Lock()
	_, running := d.extensions[name]
	d.mu.Unlock()
	if running {
		return s, fmt.Errorf("%w: replication of %s is already extended; stop it first (`vdrepl replication extend %s --stop`)", ErrExists, name, name)
	}
	if rep.FailedOver != nil {
		return s, fmt.Errorf("%w: replica VM %s is failed over here", ErrInUse, name)
	}
	if d.identity == nil {
		return s, fmt.Errorf("%w: %v", ErrInvalid, errNoIdentity)
	}
	if _, _, err := net.SplitHostPort(s.Replica); err != nil {
		return s, fmt.Errorf("%w: --replica %q: want HOST:PORT", ErrInvalid, s.Replica)
	}
	if s.Frequency == 0 {
		s.Frequency = Duration(5 * time.Minute)
	}
	if time.Duration(s.Frequency) < time.Second {
		return s, fmt.Errorf("%w: --frequency %v: the shortest is 1s (extended replication: 5m or 15m)", ErrInvalid, time.Duration(s.Frequency))
	}
	s.Enabled = time.Now().UTC().Truncate(time.Second)
	os.RemoveAll(d.extendDir(name)) // a leftover of an earlier extension
	if err := d.startExtension(name, s); err != nil {
		return s, err
	}
	if err := d.saveExtensions(); err != nil {
		d.stopExtension(name)
		return s, err
	}
	d.log.Info("replication extended", "vm", name, "to", s.Replica, "frequency", time.Duration(s.Frequency))
	return s, nil
}

// StopExtend ends the extension of a replica VM.
func (d *Daemon) StopExtend(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !d.stopExtension(name) {
		return fmt.Errorf("%w: replication of %s is not extended from this host", ErrInvalid, name)
	}
	if err := d.saveExtensions(); err != nil {
		return err
	}
	os.RemoveAll(d.extendDir(name))
	d.log.Info("extended replication stopped", "vm", name)
	return nil
}

func (d *Daemon) extendDir(name string) string {
	return filepath.Join(d.cfg.StateDir, "extend", name)
}

// startExtension opens the relay of a replica VM and starts its shipper.
func (d *Daemon) startExtension(name string, s ExtendSpec) error {
	rep, ok := d.replica.Replica(name)
	if !ok {
		return fmt.Errorf("%w: %s is not a replica VM on this host", ErrUnknownVM, name)
	}
	images := map[string]bool{}
	jc := journal.Config{
		Dir:      filepath.Join(d.extendDir(name), "journal"),
		IndexDir: filepath.Join(d.extendDir(name), "index"),
		Retain:   true,
		Cap:      d.cfg.JournalCap,
		Logger:   d.log.With("vm", name, "role", "relay"),
	}
	paths := d.replica.Images(name)
	for i, disk := range rep.Disks {
		p := paths[i]
		images[filepath.Clean(p)] = true
		jc.Disks = append(jc.Disks, journal.DiskSpec{Name: disk.Name, Path: p, Size: disk.Size})
	}
	jc.FS = sinkFS{FS: vfs.Default, images: images}
	j, err := journal.Open(jc)
	if err != nil {
		return fmt.Errorf("extend %s: relay journal: %w", name, err)
	}
	r := &relay{j: j, d: d, vm: name}
	host, _, _ := net.SplitHostPort(s.Replica)
	sh, err := ship.New(ship.Config{
		VM: name, Disks: rep.Disks, Journal: relayJournal{Journal: ship.FromJournal(j), r: r},
		Replica: s.Replica, TLS: d.identity.ClientConfig(host), BypassProxy: s.BypassProxy,
		Compress: s.Compression, Frequency: time.Duration(s.Frequency), Initial: "network",
		StateFile: filepath.Join(d.extendDir(name), "ship.json"), HostLimit: d.hostLimit,
		RetryScale: d.cfg.RetryScale, BlockSize: d.cfg.ResyncBlockSize, ResyncWindow: d.cfg.ResyncWindow,
		Logger: d.log.With("role", "extended"),
	})
	if err != nil {
		j.Close()
		return fmt.Errorf("extend %s: %w", name, err)
	}
	if err := d.replica.SetRelay(name, r); err != nil {
		sh.Close()
		j.Close()
		return err
	}
	ctx, cancel := context.WithCancel(d.ctx)
	x := &extension{vm: name, spec: s, relay: r, ship: sh, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(x.done)
		if err := sh.Run(ctx); err != nil {
			d.log.Error("extended replication stopped", "vm", name, "err", err)
		}
	}()
	d.mu.Lock()
	d.extensions[name] = x
	d.mu.Unlock()
	return nil
}

// stopExtension stops an extension's shipper and closes its relay.
func (d *Daemon) stopExtension(name string) bool {
	d.mu.Lock()
	x, ok := d.extensions[name]
	delete(d.extensions, name)
	d.mu.Unlock()
	if !ok {
		return false
	}
	d.replica.SetRelay(name, nil)
	x.stop()
	<-x.done
	x.ship.Close()
	if err := x.relay.j.Close(); err != nil {
		d.log.Warn("close relay journal", "vm", name, "err", err)
	}
	return true
}

func (d *Daemon) saveExtensions() error {
	d.mu.Lock()
	m := map[string]ExtendSpec{}
	for name, x := range d.extensions {
		m[name] = x.spec
	}
	d.mu.Unlock()
	b, err := statefile.Encode("vdrepl-extend", 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(d.fs, filepath.Join(d.cfg.StateDir, extendFile), b, 0o600)
}

// restartExtensions starts the extensions recorded in extend.json.
func (d *Daemon) restartExtensions() {
	b, err := os.ReadFile(filepath.Join(d.cfg.StateDir, extendFile))
	if err != nil {
		return
	}
	var m map[string]ExtendSpec
	if err := statefile.Decode("vdrepl-extend", 1, b, &m); err != nil {
		d.log.Error("extended replication not started", "file", extendFile, "err", err)
		return
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		if d.identity == nil {
			d.log.Error("extended replication not running", "vm", name, "err", errNoIdentity)
			continue
		}
		if err := d.startExtension(name, m[name]); err != nil {
			d.log.Error("extended replication not running", "vm", name, "err", err)
		}
	}
}

// extensionShipper returns the shipper of an extended replica VM.
func (d *Daemon) extensionShipper(name string) (*ship.Shipper, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	x, ok := d.extensions[name]
	if !ok {
		return nil, false
	}
	return x.ship, true
}

// extensionStatus lists the extensions as primaries of role "extended".
func (d *Daemon) extensionStatus(name string) []ReplicationStatus {
	d.mu.Lock()
	xs := make([]*extension, 0, len(d.extensions))
	for _, x := range d.extensions {
		if name == "" || x.vm == name {
			xs = append(xs, x)
		}
	}
	d.mu.Unlock()
	slices.SortFunc(xs, func(a, b *extension) int { return strings.Compare(a.vm, b.vm) })
	var out []ReplicationStatus
	for _, x := range xs {
		out = append(out, ReplicationStatus{VM: x.vm, Role: "extended",
			Spec:   ReplicationSpec{Replica: x.spec.Replica, Frequency: x.spec.Frequency, Compression: x.spec.Compression, Enabled: x.spec.Enabled},
			Status: x.ship.Status()})
	}
	return out
}
