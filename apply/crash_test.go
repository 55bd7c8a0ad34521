package apply

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// cycleTwo sets up vm1 at cycle 1 and returns the frames of cycle 2 (data
// on both disks and a trim) with the model after cycles 1 and 2.
func cycleTwo(t *testing.T, a *client) (c2 []byte, want1, want2 model) {
	t.Helper()
	r := rand.New(rand.NewPCG(11, 12))
	ops1 := randomOps(r, testDisks, 12)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops1))
	want1 = newModel(testDisks)
	want1.apply(ops1)
	ops2 := []op{
		{t: wire.FrameTrim, disk: 0, off: 0, n: 128 << 10},
		{t: wire.FrameData, disk: 0, off: 4096, data: randBytes(2, 300<<10)},
		{t: wire.FrameData, disk: 0, off: 600 << 10, data: randBytes(3, 200<<10)},
		{t: wire.FrameData, disk: 1, off: 0, data: randBytes(4, 100<<10)},
	}
	want2 = want1.clone()
	want2.apply(ops2)
	return buildStream(t, cycleHeader("vm1", 2, 1), ops2), want1, want2
}

// readReplicaState reads a VM's replica.json as it is on disk.
func readReplicaState(t *testing.T, fsys vfs.FS, dir string) replicaState {
	t.Helper()
	var st replicaState
	if ok, err := readState(fsys, filepath.Join(dir, stateFile), formatReplica, &st); !ok || err != nil {
		t.Fatalf("replica.json: %v %v", ok, err)
	}
	return st
}

// TestCrashMidApply fails an image write in the middle of applying cycle 2,
// so the image holds part of it; a restart must finish the apply.
func TestCrashMidApply(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, dir := setup(t, efs)
	c2, want1, want2 := cycleTwo(t, a)
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpWrite, "d0.img", 1, vfs.ErrInjected) // the second data frame
	status, _, e := a.commit("vm1", "c2")
	if status != http.StatusInternalServerError || e.Code != wire.CodeInternal {
		t.Fatalf("commit with a failing image: %d %+v", status, e)
	}
	// The image is between cycles 1 and 2, and replica.json says so.
	got := readImages(t, vfs.Default, dir, testDisks)
	if bytes.Equal(got[0], want1[0]) || bytes.Equal(got[0], want2[0]) {
		t.Fatal("the injected failure did not stop the apply midway")
	}
	st := readReplicaState(t, vfs.Default, dir)
	if st.Applied != 1 || st.Intent == nil || st.Intent.Cycle != 2 {
		t.Fatalf("replica.json mid-apply: %+v", st)
	}
	if rep, _ := h.server().Replica("vm1"); rep.Applied != 1 {
		t.Fatalf("mid-apply the replica says %+v", rep)
	}

	s := h.restart(vfs.Default)
	rep, _ := s.Replica("vm1")
	if rep.Applied != 2 || !rep.Consistent || !rep.AppliedAt.Equal(cycleHeader("vm1", 2, 1).Sealed) {
		t.Fatalf("after recovery: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
	if got := h.ev.get(&h.ev.recovered); !slices.Equal(got, []string{"vm1/cycle 2"}) {
		t.Fatalf("Recovered events %v", got)
	}
	if names, _ := os.ReadDir(filepath.Join(dir, stagingDir)); len(names) != 0 {
		t.Fatalf("staging after recovery: %v", names)
	}
	// The primary's retry is answered as done.
	if status, rep, _ := a.commit("vm1", "c2"); status != 200 || rep.Applied != 2 {
		t.Fatalf("retried commit: %d %+v", status, rep)
	}
}

// TestFailedApplyRetried: without a restart, the primary's retry of the
// commit finishes the interrupted apply.
func TestFailedApplyRetried(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	_, a, dir := setup(t, efs)
	c2, _, want2 := cycleTwo(t, a)
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpSync, ".img", 0, vfs.ErrInjected) // the images' fsync
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError {
		t.Fatalf("commit with a failing fsync: %d %+v", status, e)
	}
	status, rep, e := a.commit("vm1", "c2")
	if status != 200 || rep.Applied != 2 || !rep.Consistent {
		t.Fatalf("retry: %d %+v %+v", status, rep, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
}

// TestIntentWrittenNothingApplied: the intent is durable but no frame was
// written (the images could not be opened); a restart applies the cycle.
func TestIntentWrittenNothingApplied(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, dir := setup(t, efs)
	c2, want1, want2 := cycleTwo(t, a)
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpOpen, ".img", 0, vfs.ErrInjected)
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError {
		t.Fatalf("commit: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want1)
	if st := readReplicaState(t, vfs.Default, dir); st.Intent == nil || st.Applied != 1 {
		t.Fatalf("replica.json: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(dir, stagingDir, "c2.stream")); err != nil {
		t.Fatalf("staged stream: %v", err)
	}
	s := h.restart(vfs.Default)
	if rep, _ := s.Replica("vm1"); rep.Applied != 2 {
		t.Fatalf("after recovery: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
}

// TestFailBeforeWatermark: the images hold all of cycle 2 but writing
// applied=2 fails; a restart finishes the bookkeeping.
func TestFailBeforeWatermark(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, dir := setup(t, efs)
	c2, _, want2 := cycleTwo(t, a)
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpRename, stateFile, 1, vfs.ErrInjected) // the intent's write passes, applied=2's fails
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError {
		t.Fatalf("commit: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
	if st := readReplicaState(t, vfs.Default, dir); st.Intent == nil || st.Applied != 1 {
		t.Fatalf("replica.json: %+v", st)
	}
	s := h.restart(vfs.Default)
	if rep, _ := s.Replica("vm1"); rep.Applied != 2 {
		t.Fatalf("after recovery: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
}

func TestStorageFull(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	_, a, dir := setup(t, efs)
	c2, want1, want2 := cycleTwo(t, a)

	// Staging a chunk.
	efs.InjectAfterPath(vfs.OpWrite, ".part", 0, syscall.ENOSPC)
	status, _, e := a.chunk("vm1", "c2", 0, c2[:1000])
	if status != http.StatusInsufficientStorage || e.Code != wire.CodeFull || !bytes.Contains([]byte(e.Message), []byte("full")) {
		t.Fatalf("chunk on a full disk: %d %+v", status, e)
	}
	var u wire.Upload
	if a.call("GET", vmPath("vm1")+"/uploads/c2", nil, &u); u.Offset != 0 {
		t.Fatalf("failed chunk left %d bytes staged", u.Offset)
	}
	// A short write that runs out of space leaves the staged length as it was.
	efs.InjectAfterPath(vfs.OpWrite, ".part", 0, syscall.ENOSPC)
	a.chunk("vm1", "c2", 0, c2[:1000])
	if a.call("GET", vmPath("vm1")+"/uploads/c2", nil, &u); u.Offset != 0 {
		t.Fatalf("failed chunk left %d bytes staged", u.Offset)
	}

	// Writing the intent.
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpWrite, stateFile, 0, syscall.ENOSPC)
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInsufficientStorage || e.Code != wire.CodeFull {
		t.Fatalf("intent on a full disk: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want1)

	// Applying (a trim on a full thin pool, say).
	efs.InjectAfterPath(vfs.OpPunch, ".img", 0, syscall.ENOSPC)
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInsufficientStorage || e.Code != wire.CodeFull {
		t.Fatalf("apply on a full disk: %d %+v", status, e)
	}
	// Space freed: the retry applies.
	if status, rep, e := a.commit("vm1", "c2"); status != 200 || rep.Applied != 2 {
		t.Fatalf("retry: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)

	// Creating a VM.
	efs.InjectAfterPath(vfs.OpTruncate, "vm9", 0, syscall.ENOSPC)
	if status, e := a.call("PUT", vmPath("vm9"), wire.Enable{Disks: testDisks}, nil); status != http.StatusInsufficientStorage || e.Code != wire.CodeFull {
		t.Fatalf("create on a full disk: %d %+v", status, e)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "vm9")); !os.IsNotExist(err) {
		t.Fatalf("failed create left its directory: %v", err)
	}
}

// crashRig is a Server on an in-memory filesystem that can lose power.
type crashRig struct {
	t   *testing.T
	mem *vfs.MemFS
	efs *vfs.ErrorFS
	s   *Server
}

const (
	crashState   = "/vdrepl-apply-test/state"
	crashStorage = "/vdrepl-apply-test/storage"
)

func newCrashRig(t *testing.T) *crashRig {
	t.Helper()
	mem := vfs.NewMemFS()
	rig := &crashRig{t: t, mem: mem, efs: vfs.NewErrorFS(mem)}
	rig.s = rig.open(rig.efs)
	if err := rig.s.Allow(AllowEntry{Primary: "*", Storage: crashStorage}); err != nil {
		t.Fatal(err)
	}
	if _, err := rig.s.enable("vm1", "a.example.com", nil, AllowEntry{Primary: "*", Storage: crashStorage}, wire.Enable{Disks: testDisks}); err != nil {
		t.Fatal(err)
	}
	// The tree's build reads the images through efs: done before a test
	// counts or injects faults.
	waitBuilt(t, rig.s, "vm1")
	return rig
}

func (rig *crashRig) open(fsys vfs.FS) *Server {
	rig.t.Helper()
	s, err := New(Config{StateDir: crashState, FS: fsys})
	if err != nil {
		rig.t.Fatalf("New: %v", err)
	}
	return s
}

// stage uploads a stream through putChunk, from what is staged, as a
// primary resumes.
func stage(t testing.TB, v *vm, id string, stream []byte) {
	t.Helper()
	u, err := parseUploadID(id)
	if err != nil {
		t.Fatal(err)
	}
	up, err := v.uploadOffset(u)
	if err != nil {
		t.Fatal(err)
	}
	for off := up.Offset; off < int64(len(stream)); off += chunkSize {
		p := stream[off:min(off+chunkSize, int64(len(stream)))]
		if _, err := v.putChunk(u, off, wire.CRC(p), bytes.NewReader(p)); err != nil {
			t.Fatalf("chunk %s@%d: %v", id, off, err)
		}
	}
}

// resend stages and commits a stream as a primary does: a corrupt upload
// (what a power cut left of it) is sent again once.
func resend(t *testing.T, v *vm, id string, stream []byte) (wire.Replica, error) {
	t.Helper()
	stage(t, v, id, stream)
	rep, err := commitID(v, id)
	if errors.Is(err, ErrCorrupt) {
		stage(t, v, id, stream)
		rep, err = commitID(v, id)
	}
	return rep, err
}

func commitID(v *vm, id string) (wire.Replica, error) {
	u, err := parseUploadID(id)
	if err != nil {
		return wire.Replica{}, err
	}
	return v.commit(u)
}

// TestPowerCutDuringApply fails every filesystem call of a cycle commit in
// turn, cuts the power right after (keeping only synced data, or a random
// part of the rest), and restarts: the replica must come back at cycle 1
// or 2 with images exactly equal to the primary's at that cycle, at 2 if
// the commit was acknowledged, and must then take cycle 2 (again).
func TestPowerCutDuringApply(t *testing.T) {
	ops := []vfs.Op{vfs.OpWrite, vfs.OpSync, vfs.OpSyncDir, vfs.OpRename, vfs.OpRemove, vfs.OpPunch, vfs.OpOpen, vfs.OpRead, vfs.OpStat, vfs.OpTruncate}
	var c1, c2 []byte
	var want [3]model
	{
		r := rand.New(rand.NewPCG(21, 22))
		ops1, ops2 := randomOps(r, testDisks, 10), randomOps(r, testDisks, 10)
		c1 = buildStream(t, cycleHeader("vm1", 1, 0), ops1)
		c2 = buildStream(t, cycleHeader("vm1", 2, 1), ops2)
		want[0] = newModel(testDisks)
		want[1] = want[0].clone()
		want[1].apply(ops1)
		want[2] = want[1].clone()
		want[2].apply(ops2)
	}
	runs := 0
	for _, fop := range ops {
		for n := 0; ; n++ {
			rig := newCrashRig(t)
			v, _ := rig.s.lookup("vm1")
			stage(t, v, "c1", c1)
			if _, err := commitID(v, "c1"); err != nil {
				t.Fatal(err)
			}
			stage(t, v, "c2", c2)
			before := rig.efs.Count(fop)
			rig.efs.InjectAfter(fop, n, vfs.ErrInjected)
			_, err := commitID(v, "c2")
			fired := rig.efs.Count(fop)-before > int64(n)
			if err != nil && !errors.Is(err, vfs.ErrInjected) {
				t.Fatalf("%s #%d: commit failed with %v", fop, n, err)
			}
			// Whatever the failure left in the images, the tree claims
			// nothing they do not hold.
			{
				dir, _ := rig.s.ImageDir("vm1")
				checkTreeHonest(t, v, readImages(t, rig.mem, dir, testDisks), fmt.Sprintf("%s #%d", fop, n))
			}
			for _, random := range []bool{false, true} {
				crashed := rig.mem.CrashClone()
				if random {
					crashed = rig.mem.CrashCloneRandom(rand.New(rand.NewPCG(uint64(fop), uint64(n))))
				}
				name := fmt.Sprintf("%s #%d random=%v", fop, n, random)
				s := rig.open(crashed)
				rep, ok := s.Replica("vm1")
				if !ok || rep.Applied < 1 || rep.Applied > 2 || err == nil && rep.Applied != 2 {
					t.Fatalf("%s (commit error %v): recovered %+v", name, err, rep)
				}
				dir, _ := s.ImageDir("vm1")
				got := readImages(t, crashed, dir, testDisks)
				for i := range got {
					if !bytes.Equal(got[i], want[rep.Applied][i]) {
						t.Fatalf("%s: recovered at cycle %d but disk %d is not the primary's at that cycle", name, rep.Applied, i)
					}
				}
				// The tree agrees with the images it came back to.
				nv := waitBuilt(t, s, "vm1")
				checkTreeMatches(t, nv, want[rep.Applied])
				// And replication goes on.
				if rep, err := resend(t, nv, "c2", c2); err != nil || rep.Applied != 2 {
					t.Fatalf("%s: cycle 2 after recovery: %+v %v", name, rep, err)
				}
				checkImages(t, crashed, dir, testDisks, want[2])
				checkTreeMatches(t, nv, want[2])
				s.Close()
			}
			rig.s.Close()
			runs++
			if !fired {
				break
			}
		}
	}
	t.Logf("%d crash points", runs)
}

// TestPowerCutDuringResyncFinish: the same for applying a resync's pieces.
func TestPowerCutDuringResyncFinish(t *testing.T) {
	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	primary := newModel(testDisks)
	for i := range primary {
		copy(primary[i], randBytes(uint64(i+30), len(primary[i])))
	}
	start := wire.SyncStart{Gen: 4, Kind: wire.KindResync, Base: 9, PieceSize: pieceSize, Pieces: pieces}
	var streams [][]byte
	for p := range pieces {
		d, off, n, _ := wire.PieceRange(testDisks, pieceSize, p)
		h := wire.Header{VM: "vm1", Kind: wire.KindResync, Disks: testDisks, Gen: 4, Piece: p}
		streams = append(streams, buildStream(t, h, []op{{t: wire.FrameData, disk: d, off: off, data: primary[d][off : off+n]}}))
	}
	for _, fop := range []vfs.Op{vfs.OpWrite, vfs.OpSync, vfs.OpRename, vfs.OpSyncDir, vfs.OpOpen, vfs.OpRemove} {
		for n := 0; ; n++ {
			rig := newCrashRig(t)
			v, _ := rig.s.lookup("vm1")
			if _, err := v.syncStart(start); err != nil {
				t.Fatal(err)
			}
			for p := range pieces {
				id := wire.SyncUploadID(4, p)
				stage(t, v, id, streams[p])
				if _, err := commitID(v, id); err != nil {
					t.Fatal(err)
				}
			}
			before := rig.efs.Count(fop)
			rig.efs.InjectAfter(fop, n, vfs.ErrInjected)
			_, err := v.syncFinish(wire.SyncFinish{Gen: 4, Base: 9})
			fired := rig.efs.Count(fop)-before > int64(n)
			crashed := rig.mem.CrashClone()
			s := rig.open(crashed)
			rep, _ := s.Replica("vm1")
			dir, _ := s.ImageDir("vm1")
			want := newModel(testDisks)
			switch {
			case rep.Applied == 9 && rep.State == stateReplicating:
				want = primary
			case rep.Applied == 0 && rep.State == stateResyncing && err != nil:
			default:
				t.Fatalf("%s #%d (finish error %v): recovered %+v", fop, n, err, rep)
			}
			checkImages(t, crashed, dir, testDisks, want)
			if _, err := s.lookup("vm1"); err != nil {
				t.Fatal(err)
			}
			nv, _ := s.lookup("vm1")
			if _, err := nv.syncFinish(wire.SyncFinish{Gen: 4, Base: 9}); err != nil {
				t.Fatalf("%s #%d: finish after recovery: %v", fop, n, err)
			}
			checkImages(t, crashed, dir, testDisks, primary)
			s.Close()
			rig.s.Close()
			if !fired {
				break
			}
		}
	}
}

func TestRecoveryTidies(t *testing.T) {
	h, a, dir := setup(t, nil)
	c2, _, want2 := cycleTwo(t, a)
	staging := filepath.Join(dir, stagingDir)
	// A verified cycle 2 whose intent never became durable, a stale cycle
	// 1 stream, an upload of the applied cycle 1 that was never committed,
	// an abandoned sync piece, an upload in progress, a temp file.
	for name, data := range map[string][]byte{
		"c2.stream": c2, "c1.stream": []byte("old"), "c1.part": []byte("stale"),
		"s5-0.part": []byte("x"), "c3.part": []byte("partial"),
	} {
		if err := os.WriteFile(filepath.Join(staging, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, stateFile+".tmp"), []byte("junk"), 0o600)
	os.MkdirAll(filepath.Join(dir, syncDir, "5"), 0o700)
	h.restart(nil)
	names, _ := os.ReadDir(staging)
	var got []string
	for _, n := range names {
		got = append(got, n.Name())
	}
	if !slices.Equal(got, []string{"c2.part", "c3.part"}) {
		t.Fatalf("staging after recovery: %v", got)
	}
	for _, p := range []string{filepath.Join(dir, stateFile+".tmp"), filepath.Join(dir, syncDir, "5")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s kept", p)
		}
	}
	// The restored upload commits without being sent again.
	if status, rep, e := a.commit("vm1", "c2"); status != 200 || rep.Applied != 2 {
		t.Fatalf("commit: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
}

func TestCorruptStateRefused(t *testing.T) {
	h, a, dir := setup(t, nil)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), nil))
	h.server().Close()
	name := filepath.Join(dir, stateFile)
	good, _ := os.ReadFile(name)
	bad := bytes.Replace(good, []byte(`"applied":1`), []byte(`"applied":7`), 1)
	if bytes.Equal(bad, good) {
		t.Fatalf("no applied field in %s", good)
	}
	os.WriteFile(name, bad, 0o600)
	if _, err := New(Config{StateDir: h.stateDir}); !errors.Is(err, ErrState) {
		t.Fatalf("New with a damaged replica.json: %v", err)
	}
	os.WriteFile(name, bytes.Replace(good, []byte(`"version":1`), []byte(`"version":2`), 1), 0o600)
	if _, err := New(Config{StateDir: h.stateDir}); !errors.Is(err, ErrState) {
		t.Fatalf("New with replica.json version 2: %v", err)
	}
	os.WriteFile(name, good, 0o600)
	os.WriteFile(filepath.Join(h.stateDir, allowFile), []byte("{}"), 0o600)
	if _, err := New(Config{StateDir: h.stateDir}); !errors.Is(err, ErrState) {
		t.Fatalf("New with a bad allow.json: %v", err)
	}
}

func TestCloseWaitsAndRefuses(t *testing.T) {
	h, a, _ := setup(t, nil)
	s := h.server()
	v, _ := s.lookup("vm1")
	unlock := v.lockUpload("c1")
	sent := make(chan int)
	go func() {
		status, _, _ := a.chunk("vm1", "c1", 0, []byte("x"))
		sent <- status
	}()
	// Wait until the request holds its place in line for the upload.
	deadline := time.Now().Add(10 * time.Second)
	for {
		v.mu.Lock()
		waiting := v.uploads["c1"] != nil && v.uploads["c1"].refs == 2
		v.mu.Unlock()
		if waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the chunk request never reached the upload lock")
		}
		time.Sleep(time.Millisecond)
	}
	closed := make(chan struct{})
	go func() {
		s.Close()
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned with a request in flight")
	case <-sent:
		t.Fatal("the request passed the upload lock")
	default:
	}
	unlock()
	if status := <-sent; status != 200 {
		t.Fatalf("chunk in flight at Close: %d", status)
	}
	<-closed
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if status, e := a.call("GET", vmPath("vm1"), nil, nil); status != http.StatusServiceUnavailable || e.Code != wire.CodeBusy {
		t.Fatalf("after Close: %d %+v", status, e)
	}
}

func TestDoneRanges(t *testing.T) {
	for _, tc := range []struct {
		mark   []int64
		unmark []int64
		want   [][2]int64
	}{
		{[]int64{0, 1, 2}, nil, [][2]int64{{0, 3}}},
		{[]int64{2, 0, 1}, nil, [][2]int64{{0, 3}}},
		{[]int64{5, 1, 3}, nil, [][2]int64{{1, 2}, {3, 4}, {5, 6}}},
		{[]int64{5, 1, 3, 4, 2}, nil, [][2]int64{{1, 6}}},
		{[]int64{1, 1, 1}, nil, [][2]int64{{1, 2}}},
		{[]int64{0, 1, 2, 3}, []int64{1}, [][2]int64{{0, 1}, {2, 4}}},
		{[]int64{0, 1, 2, 3}, []int64{0, 3, 9}, [][2]int64{{1, 3}}},
	} {
		var r syncRecord
		for _, p := range tc.mark {
			r.markDone(p)
		}
		for _, p := range tc.unmark {
			r.unmark(p)
		}
		if !slices.Equal(r.Done, tc.want) {
			t.Errorf("mark %v unmark %v: %v, want %v", tc.mark, tc.unmark, r.Done, tc.want)
		}
		for p := int64(0); p < 10; p++ {
			in := slices.ContainsFunc(tc.want, func(d [2]int64) bool { return p >= d[0] && p < d[1] })
			if r.isDone(p) != in {
				t.Errorf("mark %v unmark %v: isDone(%d) = %v", tc.mark, tc.unmark, p, !in)
			}
		}
	}
}

func TestStateEnvelope(t *testing.T) {
	b, err := encodeState(formatRegistry, registry{"vm<1>": "/a&b"})
	if err != nil {
		t.Fatal(err)
	}
	var reg registry
	if err := decodeState("x", formatRegistry, b, &reg); err != nil || reg["vm<1>"] != "/a&b" {
		t.Fatalf("round trip: %v %v", reg, err)
	}
	if err := decodeState("x", formatReplica, b, &reg); !errors.Is(err, ErrState) {
		t.Fatalf("wrong format accepted: %v", err)
	}
	for i := range b {
		bad := bytes.Clone(b)
		bad[i] ^= 0x01
		var r registry
		if err := decodeState("x", formatRegistry, bad, &r); err == nil && !bytes.Equal(bytes.TrimSpace(bad), bytes.TrimSpace(b)) {
			// A flipped bit may still be valid JSON with the same
			// meaning only in insignificant whitespace.
			if r["vm<1>"] != "/a&b" || len(r) != 1 {
				t.Fatalf("flipped bit %d accepted as %v", i, r)
			}
		}
	}
}
