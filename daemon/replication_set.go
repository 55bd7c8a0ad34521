package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// `replication set`: changing a running replication without a resync.
//
// Every setting the shipper reads at its start (frequency, limits,
// compression, proxy, quiescing, the recovery-point policy) changes by
// saving the spec and restarting the VM's shipper: it resumes from its
// state file where it stopped (an upload in flight resumes at its offset),
// and its first request, wire.Enable, carries the new frequency and point
// policy to the replica. Nothing is copied again.
//
// The replica address is different: a new address may be the same replica
// reached another way (a new name, a moved IP) or another replica host.
// The daemon asks the new address about the VM (askReplica): it is the
// same replica when it holds the VM for this primary, with the same disks,
// at the cycle this host last saw applied (or the one being committed).
// Then replication goes on from there. Anything else (the VM unknown
// there, another cycle, no answer) is another replica, which `--force`
// accepts: the shipper's state is dropped and a new initial copy follows
// (over the network; a replica that already holds the VM gets a checksum
// resync instead, as after a disable and enable).

// applyChange returns spec with c's settings applied, and the flag names
// of those that differ, in the order of the flags.
func applyChange(spec control.ReplicationSpec, c control.ReplicationChange) (control.ReplicationSpec, []string) {
	changed := []string{}
	set := func(flag string, differs bool, apply func()) {
		if differs {
			apply()
			changed = append(changed, flag)
		}
	}
	if c.Replica != nil {
		set("replica", *c.Replica != spec.Replica, func() { spec.Replica = *c.Replica })
	}
	if c.Frequency != nil {
		set("frequency", *c.Frequency != spec.Frequency, func() { spec.Frequency = *c.Frequency })
	}
	if c.Compression != nil {
		set("compression", *c.Compression != spec.Compression, func() { spec.Compression = *c.Compression })
	}
	if c.BypassProxy != nil {
		set("bypass-proxy", *c.BypassProxy != spec.BypassProxy, func() { spec.BypassProxy = *c.BypassProxy })
	}
	if c.BandwidthLimit != nil {
		set("bandwidth-limit", *c.BandwidthLimit != spec.BandwidthLimit, func() { spec.BandwidthLimit = *c.BandwidthLimit })
	}
	if c.SyncBandwidthLimit != nil {
		set("sync-bandwidth-limit", *c.SyncBandwidthLimit != spec.SyncBandwidthLimit, func() { spec.SyncBandwidthLimit = *c.SyncBandwidthLimit })
	}
	if c.RecoveryPoints != nil {
		set("recovery-points", *c.RecoveryPoints != spec.RecoveryPoints, func() { spec.RecoveryPoints = *c.RecoveryPoints })
	}
	if c.PointInterval != nil {
		set("recovery-point-interval", *c.PointInterval != spec.PointInterval, func() { spec.PointInterval = *c.PointInterval })
	}
	if c.AppConsistentEvery != nil {
		set("app-consistent-every", *c.AppConsistentEvery != spec.AppConsistentEvery, func() { spec.AppConsistentEvery = *c.AppConsistentEvery })
	}
	if c.QuiesceCmd != nil {
		set("quiesce-cmd", *c.QuiesceCmd != spec.QuiesceCmd, func() { spec.QuiesceCmd = *c.QuiesceCmd })
	}
	if c.QGASocket != nil {
		set("qga-socket", *c.QGASocket != spec.QGASocket, func() { spec.QGASocket = *c.QGASocket })
	}
	if c.VerifyEvery != nil {
		set("verify-every", *c.VerifyEvery != spec.VerifyEvery, func() { spec.VerifyEvery = *c.VerifyEvery })
	}
	return spec, changed
}

// sameReplica says whether rep, the answer of a replica address about a
// VM, is the replica the VM replicates to: it holds the VM for primary me
// with disks, at cycle applied or committing (a commit in flight when the
// shipper stopped).
func sameReplica(rep wire.Replica, me string, disks []wire.Disk, applied, committing uint64) bool {
	if !strings.EqualFold(rep.Primary, me) || rep.FailedOver != nil || !slices.Equal(rep.Disks, disks) {
		return false
	}
	return rep.Applied == applied || (committing != 0 && rep.Applied == committing)
}

// SetReplication changes the settings of a VM's running replication.
func (d *Daemon) SetReplication(ctx context.Context, name string, c control.ReplicationChange) (control.ReplicationChanged, error) {
	out := control.ReplicationChanged{VM: name, Changed: []string{}}
	if c.Replica != nil {
		*c.Replica = strings.TrimSpace(*c.Replica)
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	v, err := d.servedVM(name)
	if err != nil {
		return out, err
	}
	cur := v.spec.Replication
	switch {
	case cur == nil:
		return out, fmt.Errorf("%w: replication of VM %s is not enabled; `vdrepl replication enable %s --replica HOST:PORT` first", control.ErrInvalid, name, name)
	case v.spec.HandedOver != nil:
		return out, fmt.Errorf("%w: VM %s was handed over to %s in a planned failover", control.ErrInUse, name, v.spec.HandedOver.To)
	case v.spec.Fenced != nil:
		return out, fmt.Errorf("%w: VM %s is fenced (%s): replicate it back from there (`vdrepl replication reverse`), or `vdrepl vm unfence %s --force`", control.ErrInUse, name, v.spec.Fenced.Sentence(), name)
	}
	next, changed := applyChange(*cur, c)
	out.Spec = *cur
	if len(changed) == 0 {
		return out, nil
	}
	if err := d.checkSpec(v.spec, &next); err != nil {
		return out, err
	}
	d.mu.Lock()
	sh := v.ship
	d.mu.Unlock()
	if sh == nil {
		return out, fmt.Errorf("%w: replication of VM %s is not running: %v", control.ErrInvalid, name, v.err)
	}
	st := sh.Status()
	d.stopShipper(v)
	restart := func() {
		if err := d.startShipper(v); err != nil {
			d.log.Error("replication not running", "vm", name, "err", err)
		}
	}
	if slices.Contains(changed, "replica") {
		cert, rep, unknown, err := d.askReplica(ctx, next.Replica, next.BypassProxy, name)
		var down unreachableError
		switch {
		case err == nil && !unknown && sameReplica(rep, d.identity.Name(), d.replicatedDisks(v.spec, cur), st.LastApplied, st.Committing):
			out.SameReplica = true
		case err != nil && !c.Force:
			restart()
			return out, fmt.Errorf("VM %s keeps replicating to %s: %w", name, cur.Replica, d.replicaRefusal(next.Replica, name, err))
		case err != nil && !errors.As(d.replicaRefusal(next.Replica, name, err), &down):
			// It answered, and said no: --force does not change that.
			restart()
			return out, fmt.Errorf("VM %s keeps replicating to %s: %w", name, cur.Replica, d.replicaRefusal(next.Replica, name, err))
		case !c.Force:
			restart()
			held := "does not hold VM " + name
			if err == nil && !unknown {
				held = fmt.Sprintf("holds VM %s for %q at cycle %d, where this host last saw cycle %d applied at %s", name, rep.Primary, rep.Applied, st.LastApplied, cur.Replica)
			}
			who := next.Replica
			if cert != nil {
				who = fmt.Sprintf("%s (%s)", next.Replica, pki.CertName(cert))
			}
			return out, fmt.Errorf("%w: %s %s: it is another replica, not %s at a new address; `vdrepl replication set %s --replica %s --force` replicates there with a new initial copy (VM %s keeps replicating to %s)",
				control.ErrInvalid, who, held, cur.Replica, name, next.Replica, name, cur.Replica)
		default:
			out.NewReplica = true
			next.Initial = "network"
		}
	}
	if out.NewReplica {
		// A new replica: its progress starts again (a new initial copy).
		if err := d.fs.Remove(d.shipState(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			restart()
			return out, fmt.Errorf("VM %s: drop the shipper state for the new replica: %w", name, err)
		}
		d.shipEv.forget(name)
	}
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Replication = &next }); err != nil {
		restart()
		return out, err
	}
	restart()
	out.Spec, out.Changed = next, changed
	d.log.Info("replication changed", "vm", name, "changed", strings.Join(changed, ","), "replica", next.Replica,
		"frequency", next.Frequency, "recovery_points", next.RecoveryPoints, "new_replica", out.NewReplica)
	return out, nil
}

// replicatedDisks are the disks of s that r replicates, as the shipper
// sends them (wire.Enable.Disks).
func (d *Daemon) replicatedDisks(s control.VMSpec, r *control.ReplicationSpec) []wire.Disk {
	var out []wire.Disk
	for _, ds := range s.Disks {
		if !slices.Contains(r.ExcludeDisks, ds.Name) {
			out = append(out, wire.Disk{Name: ds.Name, Size: ds.Size})
		}
	}
	return out
}
