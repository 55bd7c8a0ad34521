package apply

import (
	"crypto/x509"
	"strings"

	"fmt"
	"slices"

	"github.com/vdrepl/vdrepl/internal/crashpoint"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// Host is what the replica role needs from the daemon that runs it for a
// planned failover and for reverse replication. The daemon owns the VMs
// this host runs as a primary; apply owns its replica VMs; a VM is one or
// the other here, never both.
//
// Planned failover (POST /v1/replicas/{vm}/failover, a wire.Handover): once
// the replica VM is checked to hold the primary's last cycle, Promote makes
// it a VM of this host and starts replicating it back to the old primary.
// Promote must be idempotent: the old primary sends the handover again
// when it did not see the answer, and by then the replica VM may be gone
// from apply (the daemon recognises the VM it promoted for that peer).
//
// Reverse replication: a primary enables a VM this host runs as a primary
// itself, with existing images (wire.Enable.Existing): it is the host this
// VM failed over to, replicating back. Adopt checks that the peer is the
// host the VM replicates to (or was handed over to), that nothing uses
// the VM, stops serving it and returns the paths of its images for the
// enabled disks; apply then registers a replica VM over those images
// (they stay where they are) and calls finish(true), upon which the
// daemon forgets the VM. finish(false) gives the VM back to the daemon.
type Host interface {
	// Local reports whether vm is a VM of this host.
	Local(vm string) bool
	Adopt(vm, peer string, cert *x509.Certificate, en wire.Enable) (images []string, finish func(ok bool), err error)
	Promote(vm, peer string, h wire.Handover) error
}

// adoptedDir is where the state of an adopted replica VM lives: its images
// stay where the daemon had them.
const adoptedDir = "adopted" // in the state dir

// adopt makes a VM of this host the replica VM of peer (see Host). The
// caller holds the name's reservation.
func (s *Server) adopt(name, peer string, cert *x509.Certificate, entry AllowEntry, en wire.Enable) (*vm, error) {
	if !en.Existing {
		return nil, fmt.Errorf("%w: VM %q runs on this host as a primary (it failed over here); to replicate it back from %q, reverse replication there (`vdrepl replication reverse`)", ErrFailedOver, name, peer)
	}
	images, finish, err := s.host.Adopt(name, peer, cert, en)
	if err != nil {
		return nil, err
	}
	v, undo, err := s.createAdopted(name, peer, entry, en, images)
	if err == nil {
		if err = s.register(v); err != nil {
			v.apply.Lock()
			undo.undo(s.fs)
			v.apply.Unlock()
		}
	}
	if err == nil {
		crashpoint.Hit("adopt-registered")
	}
	finish(err == nil)
	if err != nil {
		return nil, err
	}
	s.log.Info("VM of this host adopted as a replica: replication reversed", "vm", name, "peer", peer, "images", images)
	return v, nil
}

func (s *Server) createAdopted(name, peer string, entry AllowEntry, en wire.Enable, images []string) (*vm, *created, error) {
	if len(images) != len(en.Disks) {
		return nil, nil, fmt.Errorf("%w: %d images for %d disks", ErrMismatch, len(images), len(en.Disks))
	}
	dir := join(s.stateDir, adoptedDir, name)
	undo := &created{}
	if err := undo.mkdir(s.fs, join(dir, stagingDir)); err != nil {
		undo.undo(s.fs)
		return nil, nil, fmt.Errorf("apply: adopted VM directory: %w", err)
	}
	st := replicaState{
		VM: name, Primary: peer, TrustGroup: entry.TrustGroup,
		Disks: slices.Clone(en.Disks), State: stateNew, NeedsSync: true,
		Created: s.now().UTC(), Points: en.RecoveryPoints, PointInterval: en.PointInterval,
		Excluded: slices.Clone(en.Excluded), Images: slices.Clone(images),
	}
	undo.files = append(undo.files, join(dir, stateFile))
	if err := writeState(s.fs, join(dir, stateFile), formatReplica, &st); err != nil {
		undo.undo(s.fs)
		return nil, nil, err
	}
	v := newVM(s, name, dir, st)
	if err := v.openPoints(); err != nil {
		undo.undo(s.fs)
		return nil, nil, err
	}
	if err := removeAll(s.fs, v.treePath()); err != nil {
		undo.undo(s.fs)
		return nil, nil, fmt.Errorf("apply: block tree: %w", err)
	}
	v.openTree()
	undo.vm = v
	return v, undo, nil
}

// handover serves a planned failover (see Host). v is nil when apply no
// longer has the VM: a repeated handover the daemon may have finished.
func (s *Server) handover(name, peer string, v *vm, h wire.Handover) (wire.Replica, error) {
	if s.host == nil {
		return wire.Replica{}, fmt.Errorf("%w: this replica cannot take a planned failover", ErrInvalid)
	}
	if v != nil {
		v.apply.Lock()
		err := v.finishIntent(true)
		st := v.snapshot()
		v.apply.Unlock()
		if err != nil {
			return wire.Replica{}, err
		}
		// Only the VM's own primary hands it over; a trust-group peer
		// moves a VM by writing it, never by promoting it.
		if !strings.EqualFold(st.Primary, peer) {
			return wire.Replica{}, fmt.Errorf("%w: replica VM %q belongs to primary %q; %q may not hand it over", ErrForbidden, name, st.Primary, peer)
		}
		if st.Failover == nil && (st.Applied != h.Cycle || !st.Consistent) {
			return wire.Replica{}, fmt.Errorf("%w: replica VM %q holds cycle %d (consistent: %v), the primary's last is %d; sync first", ErrMismatch, name, st.Applied, st.Consistent, h.Cycle)
		}
		if f := st.Failover; f != nil && (f.Kind != "planned" || f.Latest != h.Cycle) {
			return wire.Replica{}, fmt.Errorf("%w: replica VM %q is already failed over (%s)", ErrFailedOver, name, f.Kind)
		}
	}
	if err := s.host.Promote(name, peer, h); err != nil {
		return wire.Replica{}, err
	}
	s.log.Info("planned failover: this host is the VM's primary now", "vm", name, "old_primary", peer, "cycle", h.Cycle, "replicate_to", h.ReplicateTo)
	return wire.Replica{VM: name, Primary: peer, State: "promoted", Applied: h.Cycle, Consistent: true}, nil
}

// Adopted reports whether replica VM name is a VM of this host adopted as
// a replica (its images outside any storage directory).
func (s *Server) Adopted(name string) bool {
	v, err := s.lookup(name)
	return err == nil && len(v.images) > 0
}

// Images are the paths of a replica VM's images, one per disk.
func (s *Server) Images(name string) []string {
	v, err := s.lookup(name)
	if err != nil {
		return nil
	}
	out := make([]string, len(v.disks))
	for i := range v.disks {
		out[i] = v.image(i)
	}
	return out
}
