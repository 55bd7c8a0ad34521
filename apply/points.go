package apply

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/crashpoint"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/snapshot"
)

// Recovery points and failover on the replica host.
//
// Each VM has a snapshot.Store in <vmdir>/points. Apply keeps its contract
// (snapshot package documentation): before the images change, every range
// a stream will write is passed to BeforeWrite or BeforeZero and the undo
// data synced; after the images hold a cycle, Cycle records it, as a point
// when the policy (replica.json points, point_interval) wants one — the
// first, one per interval of barrier time, and every application-
// consistent cycle — and Prune keeps the newest Points. Cycles are
// recorded before replica.json says applied: a crash in between redoes the
// apply, which the Store takes as a repeat, so no point is missed.
//
// A failover (FailOver) records failover{point, latest} in replica.json
// first: from then on the primary's writes are refused (CodeFailedOver).
// Then the latest cycle becomes a point, and the images are reverted to the
// chosen point keeping every point (snapshot.Store.Revert), so that cancel
// is a Rollback to the latest point. Reverted is recorded last; recovery
// redoes the revert when it is missing. The images are then the failed-over
// VM's: the daemon serves them through a journal whose files are guarded
// (snapshot.Store.GuardFS), so the points stay exact until complete drops
// them.

const (
	pointsDir = "points" // in a VM dir
	// defaultPointInterval is the interval of recovery points when the
	// primary sends none.
	defaultPointInterval = time.Hour
)

// ErrFailedOver: the replica VM is failed over on this host.
var ErrFailedOver = errors.New("apply: replica VM failed over")

// openPoints opens the VM's recovery point store.
func (v *vm) openPoints() error {
	disks := make([]snapshot.Disk, len(v.disks))
	for i, d := range v.disks {
		disks[i] = snapshot.Disk{Name: d.Name, Size: d.Size, Path: v.image(i)}
	}
	st, err := snapshot.Open(snapshot.Config{FS: v.s.fs, Dir: join(v.dir, pointsDir), Disks: disks, Logger: v.s.log.With("vm", v.name)})
	if err != nil {
		return fmt.Errorf("apply: replica VM %q: recovery points: %w", v.name, err)
	}
	v.snap = st
	return nil
}

// pointsErr says what to do about a store an I/O error broke. The store
// is not reopened in place: a failed-over VM's journal writes through it
// (GuardFS), and readers take v.snap without the apply lock. A restart of
// the daemon opens it again, which recovers it (snapshot.Open).
func (v *vm) pointsErr(err error) error {
	if errors.Is(err, snapshot.ErrBroken) {
		return fmt.Errorf("%w (replica VM %q: fix the cause, e.g. free space, and restart the daemon to recover its recovery points)", err, v.name)
	}
	return err
}

// saveUndo passes every range the streams will change to the Store and
// syncs the undo data. With no points it does nothing.
func (v *vm) saveUndo(names []string) error {
	if len(v.snap.Points()) == 0 {
		return nil
	}
	for _, name := range names {
		if err := v.saveStreamUndo(name); err != nil {
			return v.pointsErr(err)
		}
	}
	return v.pointsErr(v.snap.Sync())
}

func (v *vm) saveStreamUndo(name string) error {
	f, r, err := v.openStream(name)
	if err != nil {
		return err
	}
	defer f.Close()
	return forEachFrame(r, readErrOf(name), func(fr wire.Frame) error {
		if fr.Type == wire.FrameData {
			return v.snap.BeforeWrite(fr.Disk, fr.Offset, int64(len(fr.Data)))
		}
		return v.snap.BeforeZero(fr.Disk, fr.Offset, fr.Length)
	})
}

// recordCycles tells the Store which cycles the images now hold (next is
// the state the apply leads to) and takes a point where the policy wants
// one.
func (v *vm) recordCycles(next *replicaState, in *intent) error {
	var cycles []heldCycle
	switch in.Op {
	case intentCycle:
		cycles = []heldCycle{{Cycle: in.Cycle, Sealed: in.Sealed, App: in.App, Point: in.Point}}
	case intentResync:
		cycles = in.Cycles
	}
	for i, c := range cycles {
		take := i == len(cycles)-1 && next.Consistent && v.wantPoint(next, c)
		if err := v.snap.Cycle(c.Cycle, c.Sealed, c.App, take); err != nil {
			return v.pointsErr(err)
		}
		if take {
			v.notePointRoots(next, c.Cycle)
		}
	}
	return v.prune(next)
}

// notePointRoots records in next the tree's roots as those of the point
// at cycle c, which the images hold now, and forgets the roots of points
// that are gone. Caller holds v.apply.
func (v *vm) notePointRoots(next *replicaState, c uint64) {
	var roots []blocktree.Root
	if v.tree != nil {
		roots = v.tree.Roots()
	}
	if next.PointRoots == nil {
		next.PointRoots = map[string][]string{}
	}
	id := strconv.FormatUint(c, 10)
	delete(next.PointRoots, id)
	if roots != nil {
		hex := make([]string, len(roots))
		for i, r := range roots {
			hex[i] = r.String()
		}
		next.PointRoots[id] = hex
	}
	keep := map[string]bool{id: true}
	for _, p := range v.snap.Points() {
		keep[p.ID] = true
	}
	maps.DeleteFunc(next.PointRoots, func(k string, _ []string) bool { return !keep[k] })
}

// wantPoint: the policy of st says cycle c becomes a recovery point.
func (v *vm) wantPoint(st *replicaState, c heldCycle) bool {
	if st.Points <= 0 {
		return false
	}
	ps := v.snap.Points()
	if len(ps) == 0 || c.App || c.Point {
		return true
	}
	every := st.PointInterval
	if every <= 0 {
		every = defaultPointInterval
	}
	return c.Sealed.Sub(ps[len(ps)-1].Time) >= every
}

// prune keeps the newest points of the policy; while the VM is failed
// over, every point is kept (cancel needs them).
func (v *vm) prune(st *replicaState) error {
	if st.Failover != nil {
		return nil
	}
	return v.pointsErr(v.snap.Prune(st.Points))
}

// setPolicy records a new recovery point policy (an enable).
func (v *vm) setPolicy(en wire.Enable) error {
	cur := v.snapshot()
	if cur.Points == en.RecoveryPoints && cur.PointInterval == en.PointInterval && slices.Equal(cur.Excluded, en.Excluded) && cur.Frequency == en.Frequency {
		return nil
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	return v.update(func(st *replicaState) error {
		st.Points, st.PointInterval = en.RecoveryPoints, en.PointInterval
		st.Excluded = slices.Clone(en.Excluded)
		st.Frequency = en.Frequency
		return nil
	})
}

// checkPolicy validates the recovery point policy of an enable.
func checkPolicy(en wire.Enable) error {
	if en.RecoveryPoints < 0 || en.RecoveryPoints > wire.MaxRecoveryPoints {
		return fmt.Errorf("%w: %d recovery points: keep 0 to %d", ErrInvalid, en.RecoveryPoints, wire.MaxRecoveryPoints)
	}
	if en.PointInterval < 0 {
		return fmt.Errorf("%w: recovery point interval %v", ErrInvalid, en.PointInterval)
	}
	if en.Frequency < 0 {
		return fmt.Errorf("%w: frequency %v", ErrInvalid, en.Frequency)
	}
	return nil
}

// Points lists a replica VM's recovery points, oldest first.
func (s *Server) Points(name string) ([]snapshot.Point, error) {
	v, err := s.lookup(name)
	if err != nil {
		return nil, err
	}
	return v.snap.Points(), nil
}

// View opens a read-only view of a recovery point of a replica VM for a
// test failover; id "" is the latest state, which becomes a point for the
// purpose (the policy prunes it once the view is closed). Apply goes on
// underneath; the view does not change.
func (s *Server) View(name, id string) (*snapshot.View, error) {
	v, release, err := s.lockVM(name)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := v.finishIntent(true); err != nil {
		return nil, err
	}
	if id == "" {
		if id, err = v.latestPoint(); err != nil {
			return nil, err
		}
	}
	view, err := v.snap.View(id)
	if errors.Is(err, snapshot.ErrNotFound) {
		return nil, fmt.Errorf("%w: replica VM %q has no recovery point %q (see `vdrepl replication points %s`)", ErrNotFound, name, id, name)
	}
	return view, err
}

// latestPoint makes the latest applied cycle a point, if it is not one,
// and returns its id. The images must be consistent. Caller holds v.apply.
func (v *vm) latestPoint() (string, error) {
	st := v.snapshot()
	if !st.Consistent {
		return "", fmt.Errorf("%w: replica VM %q has no consistent latest state yet (state %s, applied %d); choose a recovery point", ErrInvalid, v.name, st.State, st.Applied)
	}
	if err := v.snap.Cycle(st.Applied, st.AppliedAt, false, true); err != nil {
		return "", v.pointsErr(err)
	}
	return strconv.FormatUint(st.Applied, 10), nil
}

// Prune applies the VM's recovery point policy now (after a test failover
// closed its view).
func (s *Server) Prune(name string) error {
	v, err := s.lookup(name)
	if err != nil {
		return err
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	st := v.snapshot()
	return v.prune(&st)
}

// FailedOverVM is what the daemon needs to serve a failed-over replica VM.
type FailedOverVM struct {
	Disks  []wire.Disk
	Images []string // the image of each disk
	// Points guards the images: open them through Points.GuardFS.
	Points *snapshot.Store
	// Excluded: the primary's disks that were never replicated.
	Excluded []string
	wire.FailedOver
}

// FailOver fails a replica VM over on this host: no more data is taken
// from its primary, and the images are rolled to point id ("" = the latest
// state) with every point kept, so CancelFailover can return to the latest
// state. Calling it again for a VM already failed over to the same point
// finishes an interrupted failover and returns the same.
func (s *Server) FailOver(name, kind, id string) (FailedOverVM, error) {
	v, release, err := s.lockVM(name)
	if err != nil {
		return FailedOverVM{}, err
	}
	defer release()
	if err := v.finishIntent(true); err != nil {
		return FailedOverVM{}, err
	}
	st := v.snapshot()
	if f := st.Failover; f != nil {
		if f.Point != id || f.Kind != kind {
			return FailedOverVM{}, fmt.Errorf("%w: replica VM %q is already failed over (%s, to %s); cancel or complete that failover first", ErrExists, name, f.Kind, PointName(f.Point))
		}
	} else {
		if id == "" && !st.Consistent {
			return FailedOverVM{}, fmt.Errorf("%w: replica VM %q has no consistent latest state (state %s); fail over to a recovery point (`vdrepl replication points %s`)", ErrInvalid, name, st.State, name)
		}
		if id != "" && !containsPoint(v.snap.Points(), id) {
			return FailedOverVM{}, fmt.Errorf("%w: replica VM %q has no recovery point %q (see `vdrepl replication points %s`)", ErrNotFound, name, id, name)
		}
		if st.Applied == 0 && !st.Consistent {
			return FailedOverVM{}, fmt.Errorf("%w: replica VM %q holds no data yet (state %s)", ErrInvalid, name, st.State)
		}
		err := v.update(func(st *replicaState) error {
			st.Failover = &failoverRecord{FailedOver: wire.FailedOver{Kind: kind, Point: id, Latest: st.Applied, At: v.s.now().UTC()}}
			return nil
		})
		if err != nil {
			return FailedOverVM{}, err
		}
		crashpoint.Hit("failover-recorded")
	}
	// From here the images follow the failover (the revert, then the
	// failed-over VM's writes through GuardFS): the block tree forgets
	// them and is not built until a cancel (openTree resets it too). A
	// failure only leaves a tree nobody asks while the VM is failed over.
	if err := v.resetTree(nil); err != nil {
		v.s.log.Error("block tree at failover", "vm", v.name, "err", err)
	}
	if err := v.revert(); err != nil {
		return FailedOverVM{}, err
	}
	return v.failedOver(), nil
}

// PointName names a failover target: recovery point id, or "" for the
// latest state.
func PointName(id string) string {
	if id == "" {
		return "the latest state"
	}
	return "recovery point " + id
}

func containsPoint(ps []snapshot.Point, id string) bool {
	for _, p := range ps {
		if p.ID == id {
			return true
		}
	}
	return false
}

// revert carries out a recorded failover: the latest cycle becomes a
// point, the images are reverted to the chosen one, and Reverted is
// recorded. Each step may be redone. Caller holds v.apply.
func (v *vm) revert() error {
	st := v.snapshot()
	f := st.Failover
	if f == nil || f.Reverted || f.Cancelling {
		return nil
	}
	latest := strconv.FormatUint(f.Latest, 10)
	if !containsPoint(v.snap.Points(), latest) {
		if err := v.snap.Cycle(f.Latest, st.AppliedAt, false, true); err != nil {
			return v.pointsErr(err)
		}
	}
	if f.Point != "" && f.Point != latest {
		if err := v.snap.Revert(f.Point); err != nil {
			return v.pointsErr(err)
		}
		crashpoint.Hit("failover-reverted")
	}
	err := v.update(func(st *replicaState) error {
		st.Failover.Reverted = true
		return nil
	})
	if err != nil {
		return err
	}
	v.s.log.Info("replica VM failed over", "vm", v.name, "kind", f.Kind, "point", PointName(f.Point), "latest", f.Latest)
	return nil
}

func (v *vm) failedOver() FailedOverVM {
	st := v.snapshot()
	out := FailedOverVM{Disks: append([]wire.Disk(nil), v.disks...), Points: v.snap, FailedOver: st.Failover.FailedOver, Excluded: st.Excluded}
	for i := range v.disks {
		out.Images = append(out.Images, v.image(i))
	}
	return out
}

// FailedOver lists the replica VMs failed over on this host (for the
// daemon to serve after a restart).
func (s *Server) FailedOver() map[string]FailedOverVM {
	out := map[string]FailedOverVM{}
	s.mu.Lock()
	vms := make([]*vm, 0, len(s.vms))
	for _, v := range s.vms {
		vms = append(vms, v)
	}
	s.mu.Unlock()
	for _, v := range vms {
		v.apply.Lock()
		if st := v.snapshot(); st.Failover != nil && st.Failover.Reverted && !st.Failover.Cancelling {
			out[v.name] = v.failedOver()
		}
		v.apply.Unlock()
	}
	return out
}

// CancelFailover returns a failed-over VM to being a replica: the images
// go back to the latest state before the failover (everything written
// since is discarded), every older point stays, and the primary's data is
// taken again. The daemon must have stopped serving the images.
func (s *Server) CancelFailover(name string) error {
	v, release, err := s.lockVM(name)
	if err != nil {
		return err
	}
	defer release()
	st := v.snapshot()
	if st.Failover == nil {
		return fmt.Errorf("%w: replica VM %q is not failed over", ErrInvalid, name)
	}
	if st.Failover.Completing {
		return fmt.Errorf("%w: the failover of replica VM %q is being completed and can no longer be cancelled; run `vdrepl failover complete %s` again", ErrInvalid, name, name)
	}
	if n := v.snap.OpenViews(); n > 0 && !st.Failover.Cancelling {
		return fmt.Errorf("%w: %d views of replica VM %q's recovery points are open (a test failover)", snapshot.ErrBusy, n, name)
	}
	if !st.Failover.Cancelling {
		err := v.update(func(st *replicaState) error {
			st.Failover.Cancelling = true
			return nil
		})
		if err != nil {
			return err
		}
		crashpoint.Hit("cancel-recorded")
	}
	return v.cancel()
}

// cancel finishes a cancel recorded in replica.json. Caller holds v.apply.
func (v *vm) cancel() error {
	f := v.snapshot().Failover
	latest := strconv.FormatUint(f.Latest, 10)
	// The rollback rewrites the images behind the block tree: it forgets
	// them (it should already, since the failover), and is built again
	// once the VM is a replica again. A reset that fails leaves the tree
	// dropped, and no image changes until its files are gone (treeBegin).
	if err := v.resetTree(nil); err != nil {
		v.s.log.Error("block tree at cancel", "vm", v.name, "err", err)
	}
	// Rollback finishes at Open once its intent is durable, so the point
	// is there exactly when the rollback has not happened.
	if containsPoint(v.snap.Points(), latest) {
		if err := v.snap.Rollback(latest); err != nil {
			return v.pointsErr(err)
		}
	}
	err := v.update(func(st *replicaState) error {
		st.Failover = nil
		return nil
	})
	if err != nil {
		return err
	}
	v.kickBuild()
	st := v.snapshot()
	v.s.log.Info("failover cancelled: replica again", "vm", v.name, "applied", st.Applied)
	return v.prune(&st)
}

// CompleteFailover makes a failover final: the recovery points are
// discarded and the VM leaves the replica role (its images stay, the
// daemon's VM now). The daemon keeps serving the images meanwhile: with no
// points the guard writes straight through.
func (s *Server) CompleteFailover(name string) error {
	if err := s.dropPoints(name); err != nil {
		return err
	}
	return s.RemoveReplica(name)
}

// dropPoints finishes a failover's revert if needed and discards every
// recovery point, for CompleteFailover.
func (s *Server) dropPoints(name string) error {
	v, release, err := s.lockVM(name)
	if err != nil {
		return err
	}
	defer release()
	st := v.snapshot()
	if st.Failover == nil || st.Failover.Cancelling {
		return fmt.Errorf("%w: replica VM %q is not failed over", ErrInvalid, name)
	}
	if err := v.revert(); err != nil {
		return err
	}
	if !st.Failover.Completing {
		err := v.update(func(st *replicaState) error {
			st.Failover.Completing = true
			return nil
		})
		if err != nil {
			return err
		}
	}
	return v.pointsErr(v.snap.Prune(0))
}

// lockVM finds a replica VM and takes its apply lock, as an operation in
// flight; release undoes both.
func (s *Server) lockVM(name string) (*vm, func(), error) {
	done, err := s.enter()
	if err != nil {
		return nil, nil, err
	}
	v, err := s.lookup(name)
	if err != nil {
		done()
		return nil, nil, err
	}
	v.apply.Lock()
	return v, func() { v.apply.Unlock(); done() }, nil
}

// recoverFailover finishes a failover or a cancel a crash interrupted.
// Caller holds v.apply.
func (v *vm) recoverFailover() error {
	f := v.snapshot().Failover
	switch {
	case f == nil:
		return nil
	case f.Cancelling:
		return v.cancel()
	case !f.Reverted:
		return v.revert()
	}
	return nil
}
