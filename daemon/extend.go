package daemon

import (
	"fmt"
	"net"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/relay"
)

// Extended (chained) replication: a replica host passes what it applies of
// a VM on to a third host. Package relay runs it; here are the commands
// and the daemon's wiring.

func relaySpec(s control.ExtendSpec) relay.Spec {
	return relay.Spec{Replica: s.Replica, Frequency: time.Duration(s.Frequency), Compression: s.Compression, BypassProxy: s.BypassProxy, Enabled: s.Enabled}
}

// newRelays builds the relays of this host over its replica role.
func (d *Daemon) newRelays() *relay.Relays {
	cfg := relay.Config{
		StateDir: d.cfg.StateDir, FS: d.fs, Replica: d.replica, NoTLS: errNoIdentity,
		JournalCap: d.cfg.JournalCap, HostLimit: d.hostLimit, RetryScale: d.cfg.RetryScale,
		BlockSize: d.cfg.ResyncBlockSize, ResyncWindow: d.cfg.ResyncWindow, Logger: d.log,
	}
	if d.identity != nil {
		cfg.TLS = d.identity.ClientConfig
	}
	return relay.New(cfg)
}

// ExtendReplication starts passing a replica VM on to a third host.
func (d *Daemon) ExtendReplication(name string, s control.ExtendSpec) (control.ExtendSpec, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	rep, ok := d.replica.Replica(name)
	if !ok {
		return s, fmt.Errorf("%w: %s is not a replica VM on this host; extend replication on the replica host", control.ErrUnknownVM, name)
	}
	if _, running := d.relays.Running(name); running {
		return s, fmt.Errorf("%w: replication of %s is already extended; stop it first (`vdrepl replication extend %s --stop`)", control.ErrExists, name, name)
	}
	if rep.FailedOver != nil {
		return s, fmt.Errorf("%w: replica VM %s is failed over here", control.ErrInUse, name)
	}
	if d.identity == nil {
		return s, fmt.Errorf("%w: %v", control.ErrInvalid, errNoIdentity)
	}
	if _, _, err := net.SplitHostPort(s.Replica); err != nil {
		return s, fmt.Errorf("%w: --replica %q: want HOST:PORT", control.ErrInvalid, s.Replica)
	}
	if s.Frequency == 0 {
		s.Frequency = control.Duration(5 * time.Minute)
	}
	if time.Duration(s.Frequency) < time.Second {
		return s, fmt.Errorf("%w: --frequency %v: the shortest is 1s (extended replication: 5m or 15m)", control.ErrInvalid, time.Duration(s.Frequency))
	}
	s.Enabled = time.Now().UTC().Truncate(time.Second)
	if err := d.relays.Start(d.ctx, name, relaySpec(s), true); err != nil {
		return s, d.pointErr(err)
	}
	if err := d.relays.Save(); err != nil {
		d.relays.Stop(name)
		return s, err
	}
	d.log.Info("replication extended", "vm", name, "to", s.Replica, "frequency", time.Duration(s.Frequency))
	return s, nil
}

// StopExtend ends the extension of a replica VM.
func (d *Daemon) StopExtend(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !d.relays.Stop(name) {
		return fmt.Errorf("%w: replication of %s is not extended from this host", control.ErrInvalid, name)
	}
	if err := d.relays.Save(); err != nil {
		return err
	}
	if err := d.relays.Remove(name); err != nil {
		return fmt.Errorf("extended replication of %s stopped; its relay journal not removed: %w", name, err)
	}
	d.log.Info("extended replication stopped", "vm", name)
	return nil
}

// extensionStatus lists the extensions as primaries of role "extended".
func (d *Daemon) extensionStatus(name string) []control.ReplicationStatus {
	if d.relays == nil {
		return nil
	}
	var out []control.ReplicationStatus
	for _, x := range d.relays.List(name) {
		out = append(out, control.ReplicationStatus{VM: x.VM, Role: "extended",
			Spec:   control.ReplicationSpec{Replica: x.Spec.Replica, Frequency: control.Duration(x.Spec.Frequency), Compression: x.Spec.Compression, Enabled: x.Spec.Enabled},
			Status: x.Status})
	}
	return out
}
