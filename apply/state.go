package apply

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path/filepath"
	"time"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// Names of the files and directories this package keeps.
const (
	allowFile    = "allow.json"    // in the state dir
	registryFile = "replicas.json" // in the state dir
	stateFile    = "replica.json"  // in a VM dir
	stagingDir   = "staging"       // in a VM dir
	syncDir      = "sync"          // in a VM dir
	imageExt     = ".img"
	partExt      = ".part"
	streamExt    = ".stream"
)

// State file envelope: see the package documentation.
const (
	formatAllow    = "vdrepl-allow"
	formatRegistry = "vdrepl-replicas"
	formatReplica  = "vdrepl-replica"
	stateVersion   = 1
)

func join(elem ...string) string { return filepath.Join(elem...) }

// encodeState renders v as a state file of format (internal/statefile).
func encodeState(format string, v any) ([]byte, error) {
	return statefile.Encode(format, stateVersion, v)
}

func decodeState(name, format string, data []byte, v any) error {
	if err := statefile.Decode(format, stateVersion, data, v); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrState, name, err)
	}
	return nil
}

// writeState replaces name atomically with v.
func writeState(fsys vfs.FS, name, format string, v any) error {
	b, err := encodeState(format, v)
	if err != nil {
		return fmt.Errorf("apply: encode %s: %w", name, err)
	}
	if err := vfs.WriteFileAtomic(fsys, name, b, 0o600); err != nil {
		return fmt.Errorf("apply: write %s: %w", name, err)
	}
	return nil
}

// readState reads name into v; ok is false if the file does not exist.
func readState(fsys vfs.FS, name, format string, v any) (ok bool, err error) {
	b, err := vfs.ReadFile(fsys, name)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("apply: read %s: %w", name, err)
	}
	return true, decodeState(name, format, b, v)
}

// replicaState is the body of a VM's replica.json.
type replicaState struct {
	VM         string      `json:"vm"`
	Primary    string      `json:"primary"`
	TrustGroup string      `json:"trust_group,omitempty"`
	Disks      []wire.Disk `json:"disks"`
	State      string      `json:"state"`
	Applied    uint64      `json:"applied"`
	AppliedAt  time.Time   `json:"applied_at,omitzero"`
	Consistent bool        `json:"consistent"`
	// ConsistentAt: after a sync, applying this cycle makes the images
	// exact (wire.SyncFinish).
	ConsistentAt uint64 `json:"consistent_at,omitempty"`
	// NeedsSync: the images were there before (Enable.Existing) and are
	// not known to match anything until a sync finishes; cycles alone do
	// not make the VM replicating.
	NeedsSync bool        `json:"needs_sync,omitempty"`
	Sync      *syncRecord `json:"sync,omitempty"`
	// Held is a finished resync whose pieces wait, staged, for the cycles up
	// to its ConsistentAt: pieces and cycles are then applied under one
	// intent, so the images go straight from their last consistent point to
	// the next one (no resync cliff).
	Held *heldResync `json:"held,omitempty"`
	// LastSync is the generation of the last finished sync, so that a
	// repeated finish is answered without doing anything.
	LastSync uint64    `json:"last_sync,omitempty"`
	Intent   *intent   `json:"intent,omitempty"`
	Created  time.Time `json:"created"`
	// Points and PointInterval: the recovery point policy (wire.Enable).
	Points        int           `json:"points,omitempty"`
	PointInterval time.Duration `json:"point_interval,omitempty"`
	// Failover is set while the VM is failed over on this host.
	Failover *failoverRecord `json:"failover,omitempty"`
	// Excluded: the primary's disks it does not replicate (wire.Enable).
	Excluded []string `json:"excluded,omitempty"`
	// Images: where the images are when they are not <disk>.img in the
	// VM directory: a VM of this host adopted as a replica (host.go).
	Images []string `json:"images,omitempty"`
	// Frequency is the primary's cycle frequency (wire.Enable; 0 when it
	// does not send it), Gaps the barrier spacing of the last cycles
	// applied one after the other, newest last (at most maxGaps): health
	// goes by Frequency, else by the largest gap (health.go).
	Frequency time.Duration   `json:"frequency,omitempty"`
	Gaps      []time.Duration `json:"cycle_gaps,omitempty"`
	// LastCycleAt is this host's clock when a cycle was last applied, or
	// when the VM last became replicating (a sync finished, a failover was
	// cancelled): the "since" of its health.
	LastCycleAt time.Time `json:"last_cycle_at,omitzero"`
	// LastPieceAt is this host's clock when the running sync last made
	// progress: it began, a piece was committed, or (its pieces held) a
	// cycle it waits for was staged. The "since" of the health of a VM in
	// a sync; zero when no sync runs.
	LastPieceAt time.Time `json:"last_piece_at,omitzero"`
	// Verified is the last cycle whose block-tree roots, after it was
	// applied, equalled the primary's at its barrier; Diverged is set
	// when they differed, until a sync finishes (tree.go).
	Verified uint64           `json:"verified,omitempty"`
	Diverged *wire.Divergence `json:"diverged,omitempty"`
	// PointRoots are the block-tree roots of the images when each
	// recovery point was taken (by point id, one hex root per disk), for
	// `vdrepl verify VM --point ID`; a point taken while the tree could
	// not vouch for the images has none.
	PointRoots map[string][]string `json:"point_roots,omitempty"`
}

// failoverRecord is a failover of the VM on this host (see points.go).
type failoverRecord struct {
	wire.FailedOver
	// Reverted: the images hold the point (the revert finished).
	Reverted bool `json:"reverted,omitempty"`
	// Cancelling: a cancel began; the rollback to Latest is finished at
	// recovery.
	Cancelling bool `json:"cancelling,omitempty"`
	// Completing: a complete began and may have dropped the points, so
	// the failover can no longer be cancelled; complete is run again.
	Completing bool `json:"completing,omitempty"`
}

// Replica states (wire.Replica.State).
const (
	stateNew         = "new"
	stateInitialCopy = "initial-copy"
	stateResyncing   = "resyncing"
	stateReplicating = "replicating"
)

// syncRecord is a running sync.
type syncRecord struct {
	wire.SyncStart
	// Done holds the committed pieces as ascending, disjoint, half-open
	// ranges [from, to): pieces mostly finish in order, so this stays
	// short where a list of numbers would make replica.json grow with
	// every piece.
	Done    [][2]int64 `json:"done"`
	Started time.Time  `json:"started"`
}

func (r *syncRecord) isDone(p int64) bool {
	for _, d := range r.Done {
		if p >= d[0] && p < d[1] {
			return true
		}
	}
	return false
}

// markDone adds piece p to Done, merging ranges.
func (r *syncRecord) markDone(p int64) {
	if r.isDone(p) {
		return
	}
	out := make([][2]int64, 0, len(r.Done)+1)
	added := false
	for _, d := range r.Done {
		if !added && p < d[0] {
			out = append(out, [2]int64{p, p + 1})
			added = true
		}
		out = append(out, d)
	}
	if !added {
		out = append(out, [2]int64{p, p + 1})
	}
	merged := out[:1]
	for _, d := range out[1:] {
		last := &merged[len(merged)-1]
		if d[0] <= last[1] {
			last[1] = max(last[1], d[1])
		} else {
			merged = append(merged, d)
		}
	}
	r.Done = merged
}

func (r *syncRecord) doneCount() int64 {
	var n int64
	for _, d := range r.Done {
		n += d[1] - d[0]
	}
	return n
}

func (r *syncRecord) wire() *wire.SyncState {
	st := &wire.SyncState{SyncStart: r.SyncStart, Done: []int64{}}
	for _, d := range r.Done {
		for p := d[0]; p < d[1]; p++ {
			st.Done = append(st.Done, p)
		}
	}
	return st
}

// intent records an apply in progress: what recovery must redo.
type intent struct {
	Op string `json:"op"` // intentCycle or intentResync
	// A cycle: staging/c<Cycle>.stream holds it.
	Cycle  uint64    `json:"cycle,omitempty"`
	Sealed time.Time `json:"sealed,omitzero"`
	App    bool      `json:"app,omitempty"`   // the cycle is application-consistent
	Point  bool      `json:"point,omitempty"` // wire.Header.Point
	// A resync finish: sync/<Gen>/*.stream hold its pieces; the image then
	// follows cycle Base.
	Gen          uint64 `json:"gen,omitempty"`
	Base         uint64 `json:"base,omitempty"`
	ConsistentAt uint64 `json:"consistent_at,omitempty"`
	// Cycles are staged cycles applied after a resync's pieces.
	Cycles []heldCycle `json:"cycles,omitempty"`
}

// heldResync: see replicaState.Held.
type heldResync struct {
	Gen          uint64      `json:"gen"`
	Base         uint64      `json:"base"`
	ConsistentAt uint64      `json:"consistent_at"`
	Cycles       []heldCycle `json:"cycles,omitempty"`
}

// heldCycle is a cycle staged as staging/c<Cycle>.stream, not applied yet.
type heldCycle struct {
	Cycle  uint64    `json:"cycle"`
	Sealed time.Time `json:"sealed,omitzero"`
	App    bool      `json:"app,omitempty"`
	Point  bool      `json:"point,omitempty"` // wire.Header.Point
}

// last is the newest cycle the held resync covers.
func (h *heldResync) last() uint64 {
	if n := len(h.Cycles); n > 0 {
		return h.Cycles[n-1].Cycle
	}
	return h.Base
}

func (h *heldResync) holds(c uint64) bool {
	for _, hc := range h.Cycles {
		if hc.Cycle == c {
			return true
		}
	}
	return false
}

const (
	intentCycle  = "cycle"
	intentResync = "resync"
)

func (in *intent) String() string {
	if in.Op == intentCycle {
		return fmt.Sprintf("cycle %d", in.Cycle)
	}
	return fmt.Sprintf("resync %d", in.Gen)
}

// clone returns a deep copy, so that an update can be prepared, persisted,
// and only then published.
func (st *replicaState) clone() replicaState {
	c := *st
	c.Disks = append([]wire.Disk(nil), st.Disks...)
	c.Excluded = append([]string(nil), st.Excluded...)
	c.Images = append([]string(nil), st.Images...)
	c.Gaps = append([]time.Duration(nil), st.Gaps...)
	if st.Sync != nil {
		sc := *st.Sync
		sc.Done = append([][2]int64(nil), st.Sync.Done...)
		c.Sync = &sc
	}
	if st.Intent != nil {
		ic := *st.Intent
		ic.Cycles = append([]heldCycle(nil), st.Intent.Cycles...)
		c.Intent = &ic
	}
	if st.Held != nil {
		hc := *st.Held
		hc.Cycles = append([]heldCycle(nil), st.Held.Cycles...)
		c.Held = &hc
	}
	if st.Failover != nil {
		fc := *st.Failover
		c.Failover = &fc
	}
	if st.Diverged != nil {
		dc := *st.Diverged
		dc.Disks = append([]string(nil), st.Diverged.Disks...)
		c.Diverged = &dc
	}
	c.PointRoots = maps.Clone(st.PointRoots)
	return c
}

func (st *replicaState) wire() wire.Replica {
	r := wire.Replica{
		VM:         st.VM,
		Primary:    st.Primary,
		Disks:      append([]wire.Disk(nil), st.Disks...),
		State:      st.State,
		Applied:    st.Applied,
		AppliedAt:  st.AppliedAt,
		Consistent: st.Consistent,
	}
	if !st.Consistent {
		r.ConsistentAt = st.ConsistentAt
	}
	if st.Sync != nil {
		r.Sync = st.Sync.wire()
	}
	r.RecoveryPoints, r.PointInterval = st.Points, st.PointInterval
	r.Excluded = append([]string(nil), st.Excluded...)
	if st.Failover != nil {
		f := st.Failover.FailedOver
		r.FailedOver = &f
	}
	r.Verified = st.Verified
	if st.Diverged != nil {
		d := *st.Diverged
		d.Disks = append([]string(nil), st.Diverged.Disks...)
		r.Diverged = &d
	}
	return r
}

// registry is the body of replicas.json: VM name -> VM directory.
type registry map[string]string

func loadRegistry(fsys vfs.FS, name string) (registry, error) {
	reg := registry{}
	if _, err := readState(fsys, name, formatRegistry, &reg); err != nil {
		return nil, err
	}
	for vm, dir := range reg {
		if !wire.ValidName(vm) || !filepath.IsAbs(dir) {
			return nil, fmt.Errorf("%w: %s: bad entry %q -> %q", ErrState, name, vm, dir)
		}
	}
	return reg, nil
}

// saveRegistry writes replicas.json from the VMs in memory.
func (s *Server) saveRegistry() error {
	s.regMu.Lock()
	defer s.regMu.Unlock()
	reg := registry{}
	s.mu.Lock()
	for name, v := range s.vms {
		reg[name] = v.dir
	}
	s.mu.Unlock()
	return writeState(s.fs, s.regPath, formatRegistry, reg)
}

// removeAll removes name and, if it is a directory, everything in it.
func removeAll(fsys vfs.FS, name string) error { return vfs.RemoveAll(fsys, name) }
