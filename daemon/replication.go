package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/quiesce"
	"github.com/vdrepl/vdrepl/ship"
)

// DefaultQuiesceTimeout bounds a guest freeze unless Config.QuiesceTimeout
// says otherwise: past it the guest is thawed and a standard point recorded
// instead (ship/appseal.go).
const DefaultQuiesceTimeout = 30 * time.Second

var errNoIdentity = errors.New("this daemon has no TLS certificate: start it with --tls-cert, --tls-key and --tls-ca (make them with `vdrepl pki init` and `vdrepl pki issue`)")

// checkSpec validates a replication spec against a VM and fills defaults.
func (d *Daemon) checkSpec(s control.VMSpec, r *control.ReplicationSpec) error {
	host, port, err := net.SplitHostPort(r.Replica)
	if err != nil || host == "" || port == "" {
		return fmt.Errorf("%w: --replica %q: want HOST:PORT (the replica's --replica-listen address)", control.ErrInvalid, r.Replica)
	}
	if r.Frequency == 0 {
		r.Frequency = control.Duration(5 * time.Minute)
	}
	if time.Duration(r.Frequency) < time.Second {
		return fmt.Errorf("%w: --frequency %v: the shortest is 1s (presets 30s, 5m, 15m)", control.ErrInvalid, time.Duration(r.Frequency))
	}
	for _, x := range r.ExcludeDisks {
		if !slices.ContainsFunc(s.Disks, func(ds control.DiskSpec) bool { return ds.Name == x }) {
			return fmt.Errorf("%w: --exclude-disk %s: VM %s has no such disk", control.ErrInvalid, x, s.Name)
		}
	}
	if len(r.ExcludeDisks) >= len(s.Disks) {
		return fmt.Errorf("%w: every disk of VM %s is excluded; nothing to replicate", control.ErrInvalid, s.Name)
	}
	if r.Initial == "" {
		r.Initial = "network"
	}
	switch mode, arg, _ := strings.Cut(r.Initial, ":"); mode {
	case "network", "existing":
		if arg != "" {
			return fmt.Errorf("%w: --initial %s takes no argument", control.ErrInvalid, mode)
		}
	case "at":
		if _, err := time.Parse(time.RFC3339, arg); err != nil {
			return fmt.Errorf("%w: --initial at:%s: want an RFC 3339 time like 2026-11-24T01:00:00Z", control.ErrInvalid, arg)
		}
	case "offline":
		if !filepath.IsAbs(arg) {
			return fmt.Errorf("%w: --initial offline:%s: want an absolute directory", control.ErrInvalid, arg)
		}
	default:
		return fmt.Errorf("%w: --initial %q: want network, at:TIME, offline:DIR or existing", control.ErrInvalid, r.Initial)
	}
	if r.RecoveryPoints < 0 || r.RecoveryPoints > wire.MaxRecoveryPoints {
		return fmt.Errorf("%w: --recovery-points %d: keep 0 to %d points besides the latest", control.ErrInvalid, r.RecoveryPoints, wire.MaxRecoveryPoints)
	}
	if r.PointInterval == 0 {
		r.PointInterval = control.Duration(time.Hour)
	}
	if time.Duration(r.PointInterval) < time.Second {
		return fmt.Errorf("%w: --recovery-point-interval %v: the shortest is 1s", control.ErrInvalid, time.Duration(r.PointInterval))
	}
	if r.QuiesceCmd != "" && r.QGASocket != "" {
		return fmt.Errorf("%w: give --quiesce-cmd or --qga-socket, not both", control.ErrInvalid)
	}
	if r.QuiesceCmd != "" {
		if !filepath.IsAbs(r.QuiesceCmd) {
			return fmt.Errorf("%w: --quiesce-cmd %s: want an absolute path to an executable", control.ErrInvalid, r.QuiesceCmd)
		}
		if st, err := os.Stat(r.QuiesceCmd); err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
			return fmt.Errorf("%w: --quiesce-cmd %s is not an executable file", control.ErrInvalid, r.QuiesceCmd)
		}
	}
	if r.QGASocket != "" && !filepath.IsAbs(r.QGASocket) {
		return fmt.Errorf("%w: --qga-socket %s: want an absolute path", control.ErrInvalid, r.QGASocket)
	}
	if r.VerifyEvery < 0 || (r.VerifyEvery > 0 && time.Duration(r.VerifyEvery) < time.Minute) {
		return fmt.Errorf("%w: --verify-every %v: want 0 (never) or at least 1m", control.ErrInvalid, time.Duration(r.VerifyEvery))
	}
	if r.AppConsistentEvery < 0 {
		return fmt.Errorf("%w: --app-consistent-every %v", control.ErrInvalid, time.Duration(r.AppConsistentEvery))
	}
	if r.AppConsistentEvery > 0 && r.QuiesceCmd == "" && r.QGASocket == "" {
		return fmt.Errorf("%w: --app-consistent-every needs a way to quiesce the guest: --quiesce-cmd CMD or --qga-socket PATH", control.ErrInvalid)
	}
	if r.AppConsistentEvery > 0 && r.RecoveryPoints == 0 {
		return fmt.Errorf("%w: --app-consistent-every needs --recovery-points of at least 1 to keep the application-consistent points", control.ErrInvalid)
	}
	for _, l := range []string{r.BandwidthLimit, r.SyncBandwidthLimit} {
		if l == "" {
			continue
		}
		if _, err := ship.ParseBandwidth(l); err != nil {
			return fmt.Errorf("%w: bandwidth limit %q: %v", control.ErrInvalid, l, err)
		}
	}
	return nil
}

// EnableReplication starts replicating a VM to a replica host. With check
// it first asks the replica (checkReplica) and enables nothing when the
// replica refuses or does not answer; an --initial offline:DIR copy is
// written without the replica, so for it a replica that does not answer
// is only logged.
func (d *Daemon) EnableReplication(ctx context.Context, name string, r control.ReplicationSpec, check bool) (control.ReplicationSpec, error) {
	if check {
		// Checked twice: before the question, so that a bad spec is not
		// sent to the network, and under opMu again after it. opMu is
		// not held while the replica is asked.
		probe := r
		d.opMu.Lock()
		_, err := d.enableable(name, &probe)
		d.opMu.Unlock()
		if err != nil {
			return r, err
		}
		err = d.checkReplica(ctx, name, probe)
		var down unreachableError
		if errors.As(err, &down) && strings.HasPrefix(probe.Initial, "offline:") {
			d.log.Warn("replication enabled while the replica does not answer: the offline initial copy needs it only once imported", "vm", name, "replica", r.Replica, "err", err)
			err = nil
		}
		if err != nil {
			return r, err
		}
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	return d.enableLocked(name, r)
}

// enableable checks that replication of VM name may be enabled as r says
// (and fills r's defaults). The caller holds opMu.
func (d *Daemon) enableable(name string, r *control.ReplicationSpec) (*vm, error) {
	v, err := d.servedVM(name)
	if err != nil {
		return nil, err
	}
	if v.spec.Replication != nil {
		return nil, fmt.Errorf("%w: replication of VM %s is already enabled (to %s); change it with `vdrepl replication set %s`, or disable it first", control.ErrExists, name, v.spec.Replication.Replica, name)
	}
	if v.spec.HandedOver != nil {
		return nil, fmt.Errorf("%w: VM %s was handed over to %s in a planned failover", control.ErrInUse, name, v.spec.HandedOver.To)
	}
	if v.spec.FailedOver {
		return nil, fmt.Errorf("%w: VM %s is failed over here and not completed; `vdrepl replication reverse %s --replica OLD_PRIMARY` completes the failover and replicates back", control.ErrInUse, name, name)
	}
	if d.identityErr != nil {
		return nil, d.identityErr
	}
	if d.identity == nil {
		return nil, fmt.Errorf("%w: %v", control.ErrInvalid, errNoIdentity)
	}
	if err := d.checkSpec(v.spec, r); err != nil {
		return nil, err
	}
	return v, nil
}

// enableLocked enables replication without asking the replica first; the
// caller holds opMu.
func (d *Daemon) enableLocked(name string, r control.ReplicationSpec) (control.ReplicationSpec, error) {
	v, err := d.enableable(name, &r)
	if err != nil {
		return r, err
	}
	r.Enabled = time.Now().UTC().Truncate(time.Second)
	next := v.spec
	next.Replication = &r
	if err := d.saveSpec(next); err != nil {
		return r, err
	}
	if err := v.j.SetRetain(true); err != nil {
		return r, err
	}
	d.mu.Lock()
	v.spec = next
	d.mu.Unlock()
	if err := d.startShipper(v); err != nil {
		return r, err
	}
	d.log.Info("replication enabled", "vm", name, "replica", r.Replica, "frequency", time.Duration(r.Frequency), "initial", r.Initial)
	return r, nil
}

// DisableReplication stops replicating a VM; its journal stops keeping
// cycles. The replica keeps what it has.
func (d *Daemon) DisableReplication(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.servedVM(name)
	if err != nil {
		return err
	}
	if v.spec.Replication == nil {
		return fmt.Errorf("%w: replication of VM %s is not enabled", control.ErrInvalid, name)
	}
	d.stopShipper(v)
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Replication = nil }); err != nil {
		return err
	}
	if err := d.fs.Remove(d.shipState(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		d.log.Error("shipper state of a disabled replication not removed", "vm", name, "file", d.shipState(name), "err", err)
	}
	d.shipEv.forget(name)
	d.log.Info("replication disabled", "vm", name)
	return v.j.SetRetain(false)
}

// servedVM returns a registered VM whose journal is open.
func (d *Daemon) servedVM(name string) (*vm, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	if v.j == nil {
		return nil, fmt.Errorf("VM %s is not served: %v", name, v.err)
	}
	return v, nil
}

func (d *Daemon) saveSpec(s control.VMSpec) error {
	d.mu.Lock()
	specs := d.specsLocked()
	d.mu.Unlock()
	for i := range specs {
		if specs[i].Name == s.Name {
			specs[i] = s
		}
	}
	if err := d.reg.save(specs); err != nil {
		return fmt.Errorf("save registry: %w", err)
	}
	return nil
}

func (d *Daemon) shipState(name string) string {
	return filepath.Join(d.cfg.StateDir, "vms", name, "ship.json")
}

// startShipper runs the shipper of a VM whose replication is enabled.
func (d *Daemon) startShipper(v *vm) error {
	r := v.spec.Replication
	host, _, _ := net.SplitHostPort(r.Replica)
	cfg := ship.Config{
		VM:           v.spec.Name,
		Journal:      ship.FromJournal(v.j),
		Replica:      r.Replica,
		TLS:          d.identity.ClientConfig(host),
		BypassProxy:  r.BypassProxy,
		Compress:     r.Compression,
		Frequency:    time.Duration(r.Frequency),
		Initial:      r.Initial,
		StateFile:    d.shipState(v.spec.Name),
		HostLimit:    d.hostLimit,
		RetryScale:   d.cfg.RetryScale,
		BlockSize:    d.cfg.ResyncBlockSize,
		ResyncWindow: d.cfg.ResyncWindow,
		Logger:       d.log,

		RecoveryPoints:     r.RecoveryPoints,
		PointInterval:      time.Duration(r.PointInterval),
		Excluded:           r.ExcludeDisks,
		AppConsistentEvery: time.Duration(r.AppConsistentEvery),
		Quiesce:            quiesceFunc(v.spec.Name, r, d.cfg.QuiesceTimeout),
		VerifyEvery:        time.Duration(r.VerifyEvery),
		Events:             d.fenceEvents(v.spec.Name, d.shipEv.events(v.spec.Name)),
	}
	for i, ds := range v.spec.Disks {
		if slices.Contains(r.ExcludeDisks, ds.Name) {
			continue
		}
		cfg.Disks = append(cfg.Disks, wire.Disk{Name: ds.Name, Size: ds.Size})
		cfg.DiskIndex = append(cfg.DiskIndex, i)
	}
	var err error
	if cfg.VerifyEvery > 0 {
		if cfg.VerifyRate, err = ship.ParseBandwidth(ship.DefaultVerifyRate); err != nil {
			return err
		}
	}
	if r.BandwidthLimit != "" {
		if cfg.Limit, err = ship.ParseBandwidth(r.BandwidthLimit); err != nil {
			return err
		}
	}
	if r.SyncBandwidthLimit != "" {
		if cfg.SyncLimit, err = ship.ParseBandwidth(r.SyncBandwidthLimit); err != nil {
			return err
		}
	}
	s, err := ship.New(cfg)
	if err != nil {
		return fmt.Errorf("VM %s: start replication: %w", v.spec.Name, err)
	}
	ctx, cancel := context.WithCancel(d.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.Run(ctx); err != nil {
			d.log.Error("replication stopped", "vm", v.spec.Name, "err", err)
		}
	}()
	d.mu.Lock()
	v.ship, v.shipStop, v.shipDone = s, cancel, done
	d.mu.Unlock()
	return nil
}

// quiesceFunc binds a VM's quiescer to quiesce.QuiescedBarrier; nil
// without one.
func quiesceFunc(vm string, r *control.ReplicationSpec, timeout time.Duration) ship.QuiesceFunc {
	if timeout <= 0 {
		timeout = DefaultQuiesceTimeout
	}
	var q quiesce.Quiescer
	switch {
	case r.QuiesceCmd != "":
		q = quiesce.CommandQuiescer{Cmd: r.QuiesceCmd, VM: vm}
	case r.QGASocket != "":
		q = quiesce.QGAQuiescer{Socket: r.QGASocket}
	default:
		return nil
	}
	return func(ctx context.Context, barrier func(bool) (journal.CycleInfo, error)) (journal.CycleInfo, bool, error, error) {
		info, app, reason, err := quiesce.QuiescedBarrier(ctx, q, timeout, barrier)
		if !app && errors.Is(reason, context.DeadlineExceeded) {
			reason = fmt.Errorf("the guest did not freeze within %s (serve --quiesce-timeout), so it was thawed: %w", timeout, reason)
		}
		return info, app, reason, err
	}
}

// stopShipper ends a VM's shipper and waits for it.
func (d *Daemon) stopShipper(v *vm) {
	d.mu.Lock()
	s, stop, done := v.ship, v.shipStop, v.shipDone
	v.ship = nil
	d.mu.Unlock()
	if s == nil {
		return
	}
	stop()
	<-done
	s.Close()
}

// shipper returns the shipper of a VM with replication enabled.
func (d *Daemon) shipper(name string) (*ship.Shipper, error) {
	v, err := d.servedVM(name)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if v.ship == nil {
		return nil, fmt.Errorf("%w: replication of VM %s is not enabled", control.ErrInvalid, name)
	}
	return v.ship, nil
}

// SyncReplication closes a cycle now (with app, quiesced: an
// application-consistent point) and waits until the replica applied it.
func (d *Daemon) SyncReplication(ctx context.Context, name string, app bool) (uint64, error) {
	s, err := d.shipper(name)
	if x, ok := d.relays.Shipper(name); ok && errors.Is(err, control.ErrUnknownVM) {
		s, err = x, nil // a replica VM whose replication is extended from here
	}
	if err != nil {
		return 0, err
	}
	c, err := s.Sync(ctx, app)
	if errors.Is(err, ship.ErrBadConfig) {
		err = fmt.Errorf("%w: %v", control.ErrInvalid, err)
	}
	return c, err
}

// ReplicationControl pauses, resumes or resyncs a VM's replication.
func (d *Daemon) ReplicationControl(name, op string) error {
	s, err := d.shipper(name)
	if x, ok := d.relays.Shipper(name); ok && errors.Is(err, control.ErrUnknownVM) {
		s, err = x, nil
	}
	if err != nil {
		return err
	}
	switch op {
	case "pause":
		return s.Pause()
	case "resume":
		return s.Resume()
	case "resync":
		return s.Resync()
	}
	return fmt.Errorf("%w: unknown operation %q", control.ErrInvalid, op)
}

// ReplicationStatus reports replication of every VM, or of one.
func (d *Daemon) ReplicationStatus(name string) (control.Replication, error) {
	var out control.Replication
	d.mu.Lock()
	specs := d.specsLocked()
	vms := make(map[string]*vm, len(d.vms))
	for k, v := range d.vms {
		vms[k] = v
	}
	d.mu.Unlock()
	out.Primaries, out.Replicas = []control.ReplicationStatus{}, []control.ReplicaStatus{}
	found := name == ""
	for _, s := range specs {
		if name != "" && s.Name != name {
			continue
		}
		v := vms[s.Name]
		if s.Replication == nil {
			continue
		}
		found = true
		rs := control.ReplicationStatus{VM: s.Name, Role: "primary", Spec: *s.Replication, Excluded: s.Replication.ExcludeDisks}
		d.mu.Lock()
		sh := v.ship
		d.mu.Unlock()
		switch {
		case s.HandedOver != nil:
			rs.Status.VM, rs.Status.Replica = s.Name, s.HandedOver.To
			rs.Status.State, rs.Status.Health = "handed-over", "normal"
			rs.Status.LastApplied = s.HandedOver.Cycle
			rs.Status.Reason = fmt.Sprintf("planned failover: handed over to %s at cycle %d; served read-only here until it replicates back", s.HandedOver.To, s.HandedOver.Cycle)
		case sh != nil:
			rs.Status = sh.Status()
		default:
			rs.Status.State = "error"
			rs.Status.Health = "critical"
			if v.err != nil {
				rs.Status.Reason = v.err.Error()
			}
		}
		if f := s.Fenced; f != nil {
			rs.Fenced = f
			rs.Status.State, rs.Status.Health, rs.Status.Metrics.Health = "fenced", ship.HealthCritical, 2
			rs.Status.Reason = f.Sentence() + "; served read-only: replicate it back from there or `vdrepl vm unfence " + s.Name + " --force`"
		}
		out.Primaries = append(out.Primaries, rs)
	}
	if xs := d.extensionStatus(name); len(xs) > 0 {
		found = true
		out.Primaries = append(out.Primaries, xs...)
	}
	if d.replica != nil {
		for _, r := range d.replica.Statuses() {
			if name != "" && r.VM != name {
				continue
			}
			found = true
			rs := control.NewReplicaStatus(r)
			rs.TestFailover = d.testFailoverOf(r.VM)
			out.Replicas = append(out.Replicas, rs)
		}
	}
	if !found {
		return out, fmt.Errorf("%w: %s (neither replicated from nor to this host)", control.ErrUnknownVM, name)
	}
	if d.identity != nil {
		out.Warnings = d.identity.Warnings(time.Now())
	}
	if d.identityErr != nil {
		out.Warnings = append(out.Warnings, d.identityErr.Error())
	}
	return out, nil
}

// serveReplica runs the replica role's HTTPS listener.
func (d *Daemon) serveReplica(ctx context.Context, errc chan<- error) (func(), error) {
	if d.identity == nil {
		return nil, errNoIdentity
	}
	l, err := net.Listen("tcp", d.cfg.ReplicaListen)
	if err != nil {
		return nil, fmt.Errorf("replica listen %s: %w", d.cfg.ReplicaListen, err)
	}
	d.mu.Lock()
	d.replicaAddr = l.Addr().String()
	d.mu.Unlock()
	srv := &http.Server{
		Handler:           d.replica.Handler(),
		TLSConfig:         d.identity.ServerConfig(),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		// Refused handshakes (unknown CA, no client certificate) are worth
		// a line in the daemon's own log.
		ErrorLog: slog.NewLogLogger(d.log.With("role", "replica").Handler(), slog.LevelWarn),
	}
	go func() {
		if err := srv.Serve(tls.NewListener(l, srv.TLSConfig)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("replica listener: %w", err)
		}
	}()
	d.log.Info("replica role serving", "listen", l.Addr().String(), "name", d.identity.Name())
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}, nil
}

// Allow adds an allow-list entry of the replica role.
func (d *Daemon) Allow(e apply.AllowEntry) error { return d.replica.Allow(e) }

// Disallow removes an allow-list entry.
func (d *Daemon) Disallow(pattern string) error { return d.replica.Disallow(pattern) }

// AllowList lists the replica role's allow-list.
func (d *Daemon) AllowList() []apply.AllowEntry { return d.replica.AllowList() }

// ImportInitial loads an offline initial copy on the replica.
func (d *Daemon) ImportInitial(vm, dir string) error { return d.replica.ImportInitial(vm, dir) }

// RemoveReplica forgets a replica VM kept on this host (issue 15 item 3:
// the primary disabled its replication, or is gone for good): it leaves
// the replica role's registry with its bookkeeping, recovery points and
// block tree. Its images stay unless deleteImages, which deletes them
// too; an adopted VM's images, outside its replica directory, are never
// deleted. A VM failed over here, in a test failover or extended to a
// third host is refused with the command that ends that first.
func (d *Daemon) RemoveReplica(name string, deleteImages bool) (control.ReplicaRemoved, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	out := control.ReplicaRemoved{VM: name}
	rep, ok := d.replica.Replica(name)
	if !ok {
		return out, fmt.Errorf("%w: %s is not a replica VM on this host", control.ErrUnknownVM, name)
	}
	d.mu.Lock()
	v, registered := d.vms[name]
	failedOver := registered && v.spec.FailedOver
	d.mu.Unlock()
	if rep.FailedOver != nil || failedOver {
		return out, fmt.Errorf("%w: replica VM %s is failed over on this host; end the failover first (`vdrepl failover complete %s` to keep it as this host's VM, or `vdrepl failover cancel %s`)", control.ErrInUse, name, name, name)
	}
	if _, testing := d.tests.Running(name); testing {
		return out, fmt.Errorf("%w: a test failover of replica VM %s is running; `vdrepl failover stop-test %s` first", control.ErrInUse, name, name)
	}
	if _, extended := d.relays.Running(name); extended {
		return out, fmt.Errorf("%w: replication of %s is extended from this host; `vdrepl replication extend %s --stop` first", control.ErrInUse, name, name)
	}
	if deleteImages && d.replica.Adopted(name) {
		return out, fmt.Errorf("%w: replica VM %s was adopted from this host's own VM: its images (%s) are outside its replica directory and are never deleted; run `vdrepl replica remove %s` without --delete-images", control.ErrInvalid, name, strings.Join(d.replica.Images(name), ", "), name)
	}
	out.Dir, _ = d.replica.ImageDir(name)
	out.Images = d.replica.Images(name)
	remove := d.replica.RemoveReplica
	if deleteImages {
		remove = d.replica.DeleteReplica
	}
	if err := remove(name); err != nil {
		return out, d.pointErr(err)
	}
	out.ImagesDeleted = deleteImages
	d.log.Info("replica VM removed", "vm", name, "dir", out.Dir, "images_deleted", deleteImages)
	return out, nil
}
