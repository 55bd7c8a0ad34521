package apply

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/snapshot"
)

// setupPoints is setup with a recovery point policy.
func setupPoints(t *testing.T, fsys vfs.FS, keep int, every time.Duration) (*harness, *client, string) {
	t.Helper()
	h := newHarness(t, fsys)
	h.allow("*.example.com", h.storage, "")
	a := h.client("a.example.com")
	var r wire.Replica
	en := wire.Enable{Disks: testDisks, RecoveryPoints: keep, PointInterval: every}
	if status, e := a.call("PUT", vmPath("vm1"), en, &r); status != 200 {
		t.Fatalf("enable: %d %+v", status, e)
	}
	if r.RecoveryPoints != keep || r.PointInterval != every {
		t.Fatalf("policy not recorded: %+v", r)
	}
	dir, _ := h.server().ImageDir("vm1")
	waitBuilt(t, h.server(), "vm1")
	return h, a, dir
}

// history sends cycles from..to with random frames (cycle c sealed c
// minutes after `sealed`) and records the model after each.
func history(t *testing.T, a *client, at map[uint64]model, cur model, from, to uint64, app func(uint64) bool) model {
	t.Helper()
	r := rand.New(rand.NewPCG(from, to))
	for c := from; c <= to; c++ {
		ops := randomOps(r, testDisks, 8)
		h := cycleHeader("vm1", c, c-1)
		h.AppConsistent = app != nil && app(c)
		h.Point = c == 7 // a quiesce that failed
		a.send("vm1", wire.CycleUploadID(c), buildStream(t, h, ops))
		cur = cur.clone()
		cur.apply(ops)
		at[c] = cur
	}
	return cur
}

// checkPoint reads point id through a View and compares it with want.
func checkPoint(t *testing.T, s *Server, id string, want model) {
	t.Helper()
	v, err := s.View("vm1", id)
	if err != nil {
		t.Fatalf("view %s: %v", id, err)
	}
	defer v.Close()
	for i, d := range testDisks {
		got := make([]byte, d.Size)
		if _, err := v.Disk(i).ReadAt(got, 0); err != nil {
			t.Fatalf("view %s disk %d: %v", id, i, err)
		}
		if !bytes.Equal(got, want[i]) {
			t.Fatalf("point %s disk %s differs from the primary at that cycle", id, d.Name)
		}
	}
}

func pointIDs(t *testing.T, s *Server) []string {
	t.Helper()
	ps, err := s.Points("vm1")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range ps {
		ids = append(ids, p.ID)
	}
	return ids
}

// TestRecoveryPointsExact: with a point per cycle and two kept, every point
// the replica lists reads back exactly as the primary was at its cycle,
// older ones are pruned, and status shows what they cost.
func TestRecoveryPointsExact(t *testing.T) {
	h, a, dir := setupPoints(t, nil, 2, time.Minute)
	at := map[uint64]model{}
	cur := history(t, a, at, newModel(testDisks), 1, 5, nil)
	if got := pointIDs(t, h.server()); !slices.Equal(got, []string{"4", "5"}) {
		t.Fatalf("points %v, want [4 5]", got)
	}
	checkImages(t, vfs.Default, dir, testDisks, cur)
	h.restart(nil)
	for _, id := range []string{"4", "5"} {
		c, _ := strconv.ParseUint(id, 10, 64)
		checkPoint(t, h.server(), id, at[c])
	}
	rep, _ := h.server().Replica("vm1")
	if rep.Points != 2 || rep.PointBytes <= 0 {
		t.Fatalf("status: %d points, %d bytes", rep.Points, rep.PointBytes)
	}
	// A view holds its point through pruning; the policy drops it after.
	v, err := h.server().View("vm1", "4")
	if err != nil {
		t.Fatal(err)
	}
	history(t, a, at, cur, 6, 7, nil)
	if got := pointIDs(t, h.server()); !slices.Equal(got, []string{"4", "5", "6", "7"}) {
		t.Fatalf("points with a view open on 4: %v", got)
	}
	checkPoint(t, h.server(), "4", at[4])
	v.Close()
	if err := h.server().Prune("vm1"); err != nil {
		t.Fatal(err)
	}
	if got := pointIDs(t, h.server()); !slices.Equal(got, []string{"6", "7"}) {
		t.Fatalf("points after the view closed: %v", got)
	}
	if _, err := h.server().View("vm1", "3"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("view of a pruned point: %v", err)
	}
}

// TestRecoveryPointPolicy: one point per interval of barrier time, plus
// every application-consistent cycle; none without a policy.
func TestRecoveryPointPolicy(t *testing.T) {
	h, a, _ := setupPoints(t, nil, 5, 3*time.Minute)
	at := map[uint64]model{}
	history(t, a, at, newModel(testDisks), 1, 8, func(c uint64) bool { return c == 5 })
	// 1 (first), 4 (3 min later), 5 (app-consistent), 7 (asked for); not 8
	// (1 min after 7).
	if got := pointIDs(t, h.server()); !slices.Equal(got, []string{"1", "4", "5", "7"}) {
		t.Fatalf("points %v", got)
	}
	ps, _ := h.server().Points("vm1")
	for _, p := range ps {
		if p.AppConsistent != (p.ID == "5") {
			t.Fatalf("point %s app-consistent=%v", p.ID, p.AppConsistent)
		}
		c, _ := strconv.ParseUint(p.ID, 10, 64)
		checkPoint(t, h.server(), p.ID, at[c])
	}
	// A new enable with no points: the next cycle prunes them all.
	if status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: testDisks}, nil); status != 200 {
		t.Fatalf("enable: %d %+v", status, e)
	}
	history(t, a, at, at[8], 9, 9, nil)
	if got := pointIDs(t, h.server()); len(got) != 0 {
		t.Fatalf("points without a policy: %v", got)
	}
	if status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: testDisks, RecoveryPoints: 25}, nil); status != http.StatusBadRequest {
		t.Fatalf("25 points: %d %+v", status, e)
	}
}

// guardedWrite writes p at off of disk d's image the way the daemon's
// journal does for a failed-over VM: through the points' guard.
func guardedWrite(t *testing.T, f FailedOverVM, d int, off int64, p []byte) {
	t.Helper()
	img, err := f.Points.GuardFS(vfs.Default).OpenFile(f.Images[d], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestUnplannedFailoverCancelComplete: fail over to an older point, write
// as the failed-over VM, restart, cancel back to the latest state, take
// the primary's cycles again, then fail over to the latest and complete.
func TestUnplannedFailoverCancelComplete(t *testing.T) {
	h, a, dir := setupPoints(t, nil, 3, time.Minute)
	at := map[uint64]model{}
	latest := history(t, a, at, newModel(testDisks), 1, 4, nil)
	if _, err := h.server().FailOver("vm1", "unplanned", "9"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("failover to a missing point: %v", err)
	}
	f, err := h.server().FailOver("vm1", "unplanned", "2")
	if err != nil {
		t.Fatal(err)
	}
	if f.Latest != 4 || f.Point != "2" || len(f.Images) != 2 || f.Images[0] != filepath.Join(dir, "d0.img") {
		t.Fatalf("failed over: %+v", f)
	}
	checkImages(t, vfs.Default, dir, testDisks, at[2])
	// The primary is refused from now on, and nothing it sends lands.
	stream := buildStream(t, cycleHeader("vm1", 5, 4), randomOps(rand.New(rand.NewPCG(5, 5)), testDisks, 4))
	if status, _, e := a.chunk("vm1", "c5", 0, stream); status != http.StatusConflict || e.Code != wire.CodeFailedOver {
		t.Fatalf("upload to a failed-over VM: %d %+v", status, e)
	}
	if status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: testDisks}, nil); e.Code != wire.CodeFailedOver {
		t.Fatalf("enable of a failed-over VM: %d %+v", status, e)
	}
	// The failed-over VM writes; every point stays exact.
	guardedWrite(t, f, 0, 8192, bytes.Repeat([]byte{0xAB}, 3*4096))
	for _, id := range []string{"2", "3", "4"} {
		c, _ := strconv.ParseUint(id, 10, 64)
		checkPoint(t, h.server(), id, at[c])
	}
	if _, err := h.server().FailOver("vm1", "unplanned", "3"); !errors.Is(err, ErrExists) {
		t.Fatalf("second failover to another point: %v", err)
	}
	h.restart(nil)
	if got := h.server().FailedOver(); len(got) != 1 || got["vm1"].Point != "2" {
		t.Fatalf("failed over after restart: %+v", got)
	}
	if err := h.server().CancelFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	checkImages(t, vfs.Default, dir, testDisks, latest)
	if got := pointIDs(t, h.server()); !slices.Equal(got, []string{"2", "3"}) {
		t.Fatalf("points after cancel: %v", got)
	}
	checkPoint(t, h.server(), "2", at[2])
	latest = history(t, a, at, latest, 5, 6, nil)
	checkImages(t, vfs.Default, dir, testDisks, latest)
	// Fail over to the latest state and complete: the replica VM is gone,
	// the images stay, and the guard passes writes through.
	f, err = h.server().FailOver("vm1", "unplanned", "")
	if err != nil {
		t.Fatal(err)
	}
	checkImages(t, vfs.Default, dir, testDisks, latest)
	if err := h.server().CompleteFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.server().Replica("vm1"); ok {
		t.Fatal("replica VM still registered after complete")
	}
	guardedWrite(t, f, 1, 0, []byte("after complete"))
	latest[1] = append([]byte("after complete"), latest[1][len("after complete"):]...)
	checkImages(t, vfs.Default, dir, testDisks, latest)
	if _, err := os.Stat(filepath.Join(dir, pointsDir)); !os.IsNotExist(err) {
		t.Fatalf("points directory left after complete: %v", err)
	}
}

// TestFailoverInterrupted: an I/O error in the middle of the revert, and
// one in the middle of the cancel's rollback; a restart finishes each.
func TestFailoverInterrupted(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, dir := setupPoints(t, efs, 3, time.Minute)
	at := map[uint64]model{}
	latest := history(t, a, at, newModel(testDisks), 1, 4, nil)
	efs.InjectAfterPath(vfs.OpWrite, "d0.img", 1, vfs.ErrInjected)
	if _, err := h.server().FailOver("vm1", "unplanned", "2"); !errors.Is(err, vfs.ErrInjected) {
		t.Fatalf("failover with a failing image: %v", err)
	}
	efs.Reset()
	// The failover is recorded: the primary is refused already.
	if status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: testDisks}, nil); e.Code != wire.CodeFailedOver {
		t.Fatalf("enable mid-failover: %d %+v", status, e)
	}
	h.restart(efs)
	if got := h.server().FailedOver(); got["vm1"].Point != "2" {
		t.Fatalf("failover not finished by the restart: %+v", got)
	}
	checkImages(t, vfs.Default, dir, testDisks, at[2])
	efs.InjectAfterPath(vfs.OpWrite, "d0.img", 0, vfs.ErrInjected)
	if err := h.server().CancelFailover("vm1"); err == nil {
		t.Fatal("cancel with a failing image succeeded")
	}
	efs.Reset()
	h.restart(efs)
	rep, _ := h.server().Replica("vm1")
	if rep.FailedOver != nil || rep.Applied != 4 {
		t.Fatalf("cancel not finished by the restart: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, latest)
	for _, id := range []string{"2", "3"} {
		c, _ := strconv.ParseUint(id, 10, 64)
		checkPoint(t, h.server(), id, at[c])
	}
}

// TestCancelRefusedWhileViewOpen: a cancel while a test failover's view is
// open changes nothing; once the view is closed it goes through.
func TestCancelRefusedWhileViewOpen(t *testing.T) {
	h, a, dir := setupPoints(t, nil, 3, time.Minute)
	at := map[uint64]model{}
	latest := history(t, a, at, newModel(testDisks), 1, 3, nil)
	if _, err := h.server().FailOver("vm1", "unplanned", "2"); err != nil {
		t.Fatal(err)
	}
	v, err := h.server().View("vm1", "2")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.server().CancelFailover("vm1"); !errors.Is(err, snapshot.ErrBusy) {
		t.Fatalf("cancel with a view open: %v", err)
	}
	if rep, _ := h.server().Replica("vm1"); rep.FailedOver == nil {
		t.Fatal("a refused cancel changed the failover")
	}
	if got := h.server().FailedOver(); len(got) != 1 {
		t.Fatalf("a refused cancel left the VM half cancelled: %+v", got)
	}
	checkImages(t, vfs.Default, dir, testDisks, at[2])
	v.Close()
	if err := h.server().CancelFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	checkImages(t, vfs.Default, dir, testDisks, latest)
}

// TestCompleteInterruptedCannotCancel: a complete that dropped the points
// but failed to forget the replica VM cannot be cancelled any more (the
// latest state is gone); complete again finishes it.
func TestCompleteInterruptedCannotCancel(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, _ := setupPoints(t, efs, 3, time.Minute)
	history(t, a, map[uint64]model{}, newModel(testDisks), 1, 3, nil)
	if _, err := h.server().FailOver("vm1", "unplanned", "1"); err != nil {
		t.Fatal(err)
	}
	efs.InjectAfterPath(vfs.OpRename, registryFile, 0, vfs.ErrInjected)
	if err := h.server().CompleteFailover("vm1"); !errors.Is(err, vfs.ErrInjected) {
		t.Fatalf("complete with a failing registry: %v", err)
	}
	efs.Reset()
	h.restart(efs)
	if got := h.server().FailedOver(); len(got) != 1 {
		t.Fatalf("the half-completed failover is not served: %+v", got)
	}
	if err := h.server().CancelFailover("vm1"); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "being completed") {
		t.Fatalf("cancel after an interrupted complete: %v", err)
	}
	if err := h.server().CompleteFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.server().Replica("vm1"); ok {
		t.Fatal("the replica VM is still there after complete")
	}
}
