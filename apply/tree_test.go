package apply

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// freshTree builds a tree over m from nothing: what the replica's tree
// must agree with when its images hold m.
func freshTree(t *testing.T, m model) *blocktree.Tree {
	t.Helper()
	db, err := badger.Open(blocktree.Options("").WithInMemory(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	sizes := make([]int64, len(m))
	for i := range m {
		sizes[i] = int64(len(m[i]))
	}
	tr, _, err := blocktree.Open(db, nil, sizes)
	if err != nil {
		t.Fatal(err)
	}
	for i := range m {
		for {
			done, err := tr.BuildStep(i, bytes.NewReader(m[i]), 1<<20, nil)
			if err != nil {
				t.Fatal(err)
			}
			if done {
				break
			}
		}
	}
	return tr
}

func rootStrings(rs []blocktree.Root) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.String()
	}
	return out
}

// primaryRoots are the roots a primary whose disks hold m sends.
func primaryRoots(t *testing.T, m model) []string {
	t.Helper()
	return rootStrings(freshTree(t, m).Roots())
}

// waitBuilt waits, with a deadline, until the VM's tree holds every disk.
func waitBuilt(t testing.TB, s *Server, name string) *vm {
	t.Helper()
	v, err := s.lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		v.apply.Lock()
		ok := v.tree != nil
		if ok {
			ds, dirty := v.tree.State()
			ok = !dirty && !slices.ContainsFunc(ds, func(d blocktree.DiskState) bool { return d.Built < d.Size })
		}
		v.apply.Unlock()
		if ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("the block tree of %s was not built in time", name)
		}
		time.Sleep(time.Millisecond)
	}
}

// checkTreeMatches: the VM's tree is complete and its roots, leaves and
// blocks are those of a tree built afresh over want.
func checkTreeMatches(t *testing.T, v *vm, want model) {
	t.Helper()
	ref := freshTree(t, want)
	v.apply.Lock()
	defer v.apply.Unlock()
	got := v.tree.Roots()
	if got == nil {
		ds, dirty := v.tree.State()
		t.Fatalf("the tree knows no roots: %+v dirty %v", ds, dirty)
	}
	if !slices.Equal(got, ref.Roots()) {
		t.Fatalf("tree roots %v, a fresh build over the images %v", got, ref.Roots())
	}
	for i := range want {
		n := int64(len(want[i]))
		gl, _ := v.tree.Leaves(i, 0, (n+blocktree.LeafSize-1)/blocktree.LeafSize)
		wl, _ := ref.Leaves(i, 0, (n+blocktree.LeafSize-1)/blocktree.LeafSize)
		if !slices.Equal(gl, wl) {
			t.Fatalf("disk %d: leaves differ from a fresh build", i)
		}
	}
}

// checkTreeHonest: every block hash the tree claims is the hash of the
// image's block as it is now (Unknown claims nothing).
func checkTreeHonest(t *testing.T, v *vm, images model, what string) {
	t.Helper()
	v.apply.Lock()
	defer v.apply.Unlock()
	if v.tree == nil {
		return
	}
	for i, img := range images {
		hs, err := v.tree.Blocks(i, 0, int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		for b, h := range hs {
			off := b * blocktree.BlockSize
			if h != blocktree.Unknown && h != blocktree.HashBlock(img[off:min(off+blocktree.BlockSize, len(img))]) {
				t.Fatalf("%s: the tree claims hash %x for block %d of disk %d, the image's is not that", what, h, b, i)
			}
		}
	}
}

// treeSums asks /sums of a kind.
func treeSums(t *testing.T, c *client, req wire.SumsRequest) (int, http.Header, []byte) {
	t.Helper()
	hr, err := http.NewRequest("POST", c.base+vmPath("vm1")+"/sums", bytes.NewReader(mustJSON(t, req)))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.hc.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header, b.Bytes()
}

func le64s(b []byte) []uint64 {
	out := make([]uint64, len(b)/8)
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(b[i*8:])
	}
	return out
}

// TestTreeCyclesVerified: cycles with unaligned writes, trims and zeroes
// keep the tree equal to a fresh build over the images; a cycle whose
// header carries the primary's roots is Verified, one whose roots differ
// on a disk makes the VM Diverged, naming it, and both survive a restart.
func TestTreeCyclesVerified(t *testing.T) {
	h, a, _ := setup(t, nil)
	v := waitBuilt(t, h.server(), "vm1")
	want := newModel(testDisks)
	r := rand.New(rand.NewPCG(71, 72))
	for c := uint64(1); c <= 3; c++ {
		ops := randomOps(r, testDisks, 20)
		want.apply(ops)
		hdr := cycleHeader("vm1", c, c-1)
		hdr.Roots = primaryRoots(t, want)
		rep := a.send("vm1", wire.CycleUploadID(c), buildStream(t, hdr, ops))
		if rep.Verified != c || rep.Diverged != nil {
			t.Fatalf("cycle %d with the primary's roots: %+v", c, rep)
		}
		checkTreeMatches(t, v, want)
	}
	// A cycle without roots (the primary's tree was being built) checks
	// nothing and keeps the last verified cycle.
	ops := randomOps(r, testDisks, 5)
	want.apply(ops)
	if rep := a.send("vm1", "c4", buildStream(t, cycleHeader("vm1", 4, 3), ops)); rep.Verified != 3 || rep.Diverged != nil {
		t.Fatalf("cycle without roots: %+v", rep)
	}
	checkTreeMatches(t, v, want)

	// The primary's disk 1 is not what the replica holds.
	ops = []op{{t: wire.FrameData, disk: 0, off: 12345, data: randBytes(5, 7000)}}
	want.apply(ops)
	other := want.clone()
	other[1][300<<10] ^= 1
	hdr := cycleHeader("vm1", 5, 4)
	hdr.Roots = primaryRoots(t, other)
	rep := a.send("vm1", "c5", buildStream(t, hdr, ops))
	if d := rep.Diverged; d == nil || d.Cycle != 5 || !slices.Equal(d.Disks, []string{"d1"}) || rep.Verified != 3 {
		t.Fatalf("cycle with other roots: %+v (diverged %+v)", rep, rep.Diverged)
	}
	if got := h.ev.get(&h.ev.diverged); !slices.Equal(got, []string{"vm1/5/[d1]"}) {
		t.Fatalf("Diverged events %v", got)
	}
	if got := h.ev.get(&h.ev.verified); !slices.Equal(got, []string{"vm1/1", "vm1/2", "vm1/3"}) {
		t.Fatalf("Verified events %v", got)
	}
	// Cycles go on being applied; the divergence stays until a sync.
	ops = []op{{t: wire.FrameZero, disk: 1, off: 0, n: 8192}}
	want.apply(ops)
	hdr = cycleHeader("vm1", 6, 5)
	hdr.Roots = primaryRoots(t, want)
	if rep := a.send("vm1", "c6", buildStream(t, hdr, ops)); rep.Applied != 6 || rep.Diverged == nil || rep.Verified != 6 {
		t.Fatalf("cycle after the divergence: %+v", rep)
	}

	// Both are in replica.json, and the tree is kept on disk.
	s := h.restart(nil)
	rep, _ = s.Replica("vm1")
	if rep.Diverged == nil || rep.Diverged.Cycle != 5 || rep.Verified != 6 {
		t.Fatalf("after a restart: %+v", rep)
	}
	checkTreeMatches(t, waitBuilt(t, s, "vm1"), want)
}

// TestTreeSums: /sums of kind leaves and blocks answers from the tree what
// a fresh build over the images holds; unavailable (409) while the disk's
// tree is being built; offsets checked.
func TestTreeSums(t *testing.T) {
	h, a, _ := setup(t, nil)
	waitBuilt(t, h.server(), "vm1")
	want := newModel(testDisks)
	ops := randomOps(rand.New(rand.NewPCG(81, 82)), testDisks, 30)
	want.apply(ops)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	ref := freshTree(t, want)
	for i, d := range testDisks {
		status, hdr, b := treeSums(t, a, wire.SumsRequest{Disk: i, Offset: 0, Length: d.Size, Kind: wire.SumsLeaves})
		if status != 200 || hdr.Get(wire.SumsKindHeader) != wire.SumsLeaves || hdr.Get(wire.SumsCycleHeader) != "1" {
			t.Fatalf("leaves of disk %d: %d %v %s", i, status, hdr, b)
		}
		wl, _ := ref.Leaves(i, 0, d.Size/blocktree.LeafSize)
		if got := le64s(b); !slices.Equal(got, wl) {
			t.Fatalf("leaves of disk %d: %x, want %x", i, got, wl)
		}
		off, n := int64(3*blocktree.BlockSize), int64(70*blocktree.BlockSize+100) // a short last block
		status, hdr, b = treeSums(t, a, wire.SumsRequest{Disk: i, Offset: off, Length: n, Kind: wire.SumsBlocks})
		if status != 200 || hdr.Get(wire.SumsKindHeader) != wire.SumsBlocks {
			t.Fatalf("blocks of disk %d: %d %s", i, status, b)
		}
		wb, _ := ref.Blocks(i, off, n)
		got := le64s(b)
		if len(got) != len(wb) {
			t.Fatalf("blocks of disk %d: %d hashes, want %d", i, len(got), len(wb))
		}
		for k := range got {
			if blocktree.Hash(got[k]) != wb[k] || got[k] == 0 {
				t.Fatalf("block %d of disk %d: %x, want %x", k, i, got[k], wb[k])
			}
		}
	}
	for _, req := range []wire.SumsRequest{
		{Disk: 0, Offset: 4096, Length: blocktree.LeafSize, Kind: wire.SumsLeaves},               // not leaf-aligned
		{Disk: 0, Offset: 100, Length: 4096, Kind: wire.SumsBlocks},                              // not block-aligned
		{Disk: 0, Offset: 0, Length: testDisks[0].Size + 1, Kind: wire.SumsBlocks},               // past the end
		{Disk: 1, Offset: testDisks[1].Size, Length: 4096, Kind: wire.SumsBlocks},                // past the end
		{Disk: 0, Offset: 0, Length: 0, Kind: wire.SumsLeaves},                                   // empty
		{Disk: 2, Offset: 0, Length: 4096, Kind: wire.SumsBlocks},                                // no such disk
		{Disk: 0, Offset: 0, Length: 4096, Kind: "roots"},                                        // no such kind
		{Disk: 0, Offset: -blocktree.LeafSize, Length: 4096, Kind: wire.SumsLeaves},              // negative
		{Disk: 0, Offset: 0, Length: maxTreeSums*blocktree.BlockSize + 1, Kind: wire.SumsBlocks}, // too long
	} {
		status, _, b := treeSums(t, a, req)
		var e wire.Error
		json.Unmarshal(b, &e)
		if status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
			t.Fatalf("%+v: %d %s", req, status, b)
		}
	}

	// Disk 0's tree forgotten, no builder started yet: it cannot answer,
	// disk 1's can.
	v, _ := h.server().lookup("vm1")
	v.apply.Lock()
	if err := v.tree.Reset(0); err != nil {
		t.Fatal(err)
	}
	v.apply.Unlock()
	status, _, b := treeSums(t, a, wire.SumsRequest{Disk: 0, Offset: 0, Length: blocktree.LeafSize, Kind: wire.SumsLeaves})
	var e wire.Error
	json.Unmarshal(b, &e)
	if status != http.StatusConflict || e.Code != wire.CodeUnavailable {
		t.Fatalf("sums while building: %d %s", status, b)
	}
	if status, _, b := treeSums(t, a, wire.SumsRequest{Disk: 1, Offset: 0, Length: blocktree.LeafSize, Kind: wire.SumsLeaves}); status != 200 {
		t.Fatalf("sums of the other disk: %d %s", status, b)
	}
	// BLAKE3 sums still answer.
	if sumsCycle(t, a) != "1" {
		t.Fatal("BLAKE3 sums while the tree is built")
	}
	v.apply.Lock()
	v.kickBuild()
	v.apply.Unlock()
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm1"), want)
	if status, _, b := treeSums(t, a, wire.SumsRequest{Disk: 0, Offset: 0, Length: blocktree.LeafSize, Kind: wire.SumsLeaves}); status != 200 {
		t.Fatalf("sums once built: %d %s", status, b)
	}
}

// TestTreeSyncAndImport: an initial copy's pieces, a resync's pieces and an
// offline import keep the tree equal to a fresh build over the images.
func TestTreeSyncAndImport(t *testing.T) {
	h, a, _ := setup(t, nil)
	v := waitBuilt(t, h.server(), "vm1")
	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	primary := primaryModel()
	start := wire.SyncStart{Gen: 7, Kind: wire.KindFull, Base: 41, PieceSize: pieceSize, Pieces: pieces}
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, nil); status != 200 {
		t.Fatalf("sync start: %d %+v", status, e)
	}
	all := make([]int64, pieces)
	for p := range all {
		all[p] = int64(p)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindFull, 7, pieceSize, primary, all)
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", wire.SyncFinish{Gen: 7, Base: 41}, nil); status != 200 {
		t.Fatalf("finish: %d %+v", status, e)
	}
	checkTreeMatches(t, v, primary)

	// A resync after the primary changed.
	next := primary.clone()
	next.apply(randomOps(rand.New(rand.NewPCG(91, 92)), testDisks, 20))
	start = wire.SyncStart{Gen: 8, Kind: wire.KindResync, Base: 45, PieceSize: pieceSize, Pieces: pieces}
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, nil); status != 200 {
		t.Fatalf("resync start: %d %+v", status, e)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindResync, 8, pieceSize, next, all)
	checkTreeMatches(t, v, primary) // staged, not applied
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", wire.SyncFinish{Gen: 8, Base: 45}, nil); status != 200 {
		t.Fatalf("resync finish: %d %+v", status, e)
	}
	checkTreeMatches(t, v, next)

	// An offline initial copy of another VM.
	m := primaryModel()
	m[1][5] = 9
	dir, _ := writeOffline(t, "vm2", "a.example.com", m, 3, 17, 256<<10)
	if err := h.server().ImportInitial("vm2", dir); err != nil {
		t.Fatal(err)
	}
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm2"), m)
}

// TestTreeDivergedRepairedByResync: an image damaged at rest, behind
// apply's back, is found by the next cycle's root check once the tree is
// rebuilt from the images (here: a restart on an in-memory filesystem);
// the disk is named, later cycles still apply, and a resync's finish
// clears the divergence; the cycle that makes the resync exact is checked
// like any other.
func TestTreeDivergedRepairedByResync(t *testing.T) {
	rig := newCrashRig(t)
	v, _ := rig.s.lookup("vm1")
	r := rand.New(rand.NewPCG(101, 102))
	primary := newModel(testDisks)
	send := func(c uint64, ops []op) wire.Replica {
		t.Helper()
		primary.apply(ops)
		hdr := cycleHeader("vm1", c, c-1)
		hdr.Roots = primaryRoots(t, primary)
		rep, err := resend(t, v, wire.CycleUploadID(c), buildStream(t, hdr, ops))
		if err != nil || rep.Applied != c {
			t.Fatalf("cycle %d: %+v %v", c, rep, err)
		}
		return rep
	}
	if rep := send(1, randomOps(r, testDisks, 10)); rep.Verified != 1 {
		t.Fatalf("cycle 1: %+v", rep)
	}
	dir, _ := rig.s.ImageDir("vm1")
	f, err := rig.mem.OpenFile(filepath.Join(dir, "d1.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("bit rot"), 200<<10)
	f.Sync()
	f.Close()
	rig.s.Close()
	rig.s = rig.open(rig.efs)
	v = waitBuilt(t, rig.s, "vm1")
	rep := send(2, []op{{t: wire.FrameData, disk: 0, off: 0, data: randBytes(7, 9000)}})
	if d := rep.Diverged; d == nil || d.Cycle != 2 || !slices.Equal(d.Disks, []string{"d1"}) || rep.Verified != 1 {
		t.Fatalf("cycle 2 over a damaged image: %+v (diverged %+v)", rep, rep.Diverged)
	}
	if rep := send(3, randomOps(r, testDisks, 4)); rep.Diverged == nil || rep.Applied != 3 {
		t.Fatalf("cycle 3: %+v", rep)
	}

	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	if _, err := v.syncStart(wire.SyncStart{Gen: 4, Kind: wire.KindResync, Base: 3, PieceSize: pieceSize, Pieces: pieces}); err != nil {
		t.Fatal(err)
	}
	for p := range pieces {
		d, off, n, _ := wire.PieceRange(testDisks, pieceSize, p)
		hdr := wire.Header{VM: "vm1", Kind: wire.KindResync, Disks: testDisks, Gen: 4, Piece: p}
		id := wire.SyncUploadID(4, p)
		stage(t, v, id, buildStream(t, hdr, []op{{t: wire.FrameData, disk: d, off: off, data: primary[d][off : off+n]}}))
		if _, err := commitID(v, id); err != nil {
			t.Fatal(err)
		}
	}
	rep, err = v.syncFinish(wire.SyncFinish{Gen: 4, Base: 3})
	if err != nil || rep.Diverged != nil || rep.Applied != 3 {
		t.Fatalf("resync finish: %+v %v", rep, err)
	}
	checkTreeMatches(t, v, primary)
	// Cycle 4 makes the resync exact: its roots are checked.
	if rep := send(4, randomOps(r, testDisks, 4)); !rep.Consistent || rep.Verified != 4 || rep.Diverged != nil {
		t.Fatalf("the cycle that makes the resync exact: %+v", rep)
	}
}

// TestTreeDirtyResetAtOpen: a tree marked dirty (an apply began) when the
// daemon stopped is reset at open and rebuilt from the images, so it does
// not keep claiming what the images no longer hold; a clean one is kept.
func TestTreeDirtyResetAtOpen(t *testing.T) {
	h, a, dir := setup(t, nil)
	ops := randomOps(rand.New(rand.NewPCG(111, 112)), testDisks, 10)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	want := newModel(testDisks)
	want.apply(ops)
	v := waitBuilt(t, h.server(), "vm1")
	checkTreeMatches(t, v, want)
	if _, err := os.Stat(filepath.Join(dir, treeDir)); err != nil {
		t.Fatalf("no tree in the VM directory: %v", err)
	}
	// An apply that began and stopped before its commit.
	v.apply.Lock()
	if err := v.tree.Begin(); err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(filepath.Join(dir, "d0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	img.WriteAt(bytes.Repeat([]byte{7}, 10000), 50000)
	img.Close()
	v.apply.Unlock()
	s := h.restart(nil)
	got := readImages(t, vfs.Default, dir, testDisks)
	if bytes.Equal(got[0], want[0]) {
		t.Fatal("the image did not change")
	}
	checkTreeMatches(t, waitBuilt(t, s, "vm1"), got)

	// Removing the VM removes its tree.
	if err := s.RemoveReplica("vm1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, treeDir)); !os.IsNotExist(err) {
		t.Fatalf("tree left after the VM was removed: %v", err)
	}
}

// TestTreeResetByFailover: a failover reverts the images behind apply and
// lets the failed-over VM write them: the tree forgets them (sums are
// unavailable), stays forgotten over a restart, and is rebuilt from the
// images the cancel rolled back.
func TestTreeResetByFailover(t *testing.T) {
	h, a, dir := setupPoints(t, nil, 3, time.Minute)
	at := map[uint64]model{}
	latest := history(t, a, at, newModel(testDisks), 1, 4, nil)
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm1"), latest)
	f, err := h.server().FailOver("vm1", "unplanned", "2")
	if err != nil {
		t.Fatal(err)
	}
	forgotten := func(s *Server) {
		t.Helper()
		v, _ := s.lookup("vm1")
		v.apply.Lock()
		ds, _ := v.tree.State()
		v.apply.Unlock()
		for i, d := range ds {
			if d.Built != 0 {
				t.Fatalf("disk %d of a failed-over VM: the tree holds %+v", i, d)
			}
		}
		status, _, b := treeSums(t, a, wire.SumsRequest{Disk: 0, Offset: 0, Length: blocktree.LeafSize, Kind: wire.SumsLeaves})
		if status != http.StatusConflict || !bytes.Contains(b, []byte(wire.CodeUnavailable)) {
			t.Fatalf("tree sums of a failed-over VM: %d %s", status, b)
		}
	}
	forgotten(h.server())
	// A tree that kept claiming what it knew (a crash before the reset
	// at failover was durable) is reset when the daemon comes back.
	v, _ := h.server().lookup("vm1")
	v.apply.Lock()
	imgs, err := v.openImages(os.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	for i := range testDisks {
		for done := false; !done; {
			if done, err = v.tree.BuildStep(i, imgs[i], 1<<20, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	closeImages(imgs)
	v.apply.Unlock()
	guardedWrite(t, f, 0, 8192, bytes.Repeat([]byte{0xAB}, 3*4096))
	forgotten(h.restart(nil))
	if err := h.server().CancelFailover("vm1"); err != nil {
		t.Fatal(err)
	}
	checkImages(t, vfs.Default, dir, testDisks, latest)
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm1"), latest)
	latest = history(t, a, at, latest, 5, 6, nil)
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm1"), latest)
}

// TestTreeHonestAfterFailedApply: an image write that fails mid-apply
// leaves the images between two cycles; the tree must claim no hash the
// images do not have, then agree again once the retry applies the cycle.
func TestTreeHonestAfterFailedApply(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, dir := setup(t, efs)
	c2, _, want2 := cycleTwo(t, a)
	v := waitBuilt(t, h.server(), "vm1")
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpWrite, "d0.img", 1, vfs.ErrInjected)
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError {
		t.Fatalf("commit with a failing image: %d %+v", status, e)
	}
	checkTreeHonest(t, v, readImages(t, vfs.Default, dir, testDisks), "after the failed apply")
	if status, rep, e := a.commit("vm1", "c2"); status != 200 || rep.Applied != 2 {
		t.Fatalf("retry: %d %+v", status, e)
	}
	checkTreeMatches(t, waitBuilt(t, h.server(), "vm1"), want2)
}

// TestTreeRootsCheckedAfterRecovery: a cycle whose apply a failure cut is
// applied again at restart, when the tree is still being built (here it
// starts afresh): its roots, in the staged stream's header, are checked
// once the build completes.
func TestTreeRootsCheckedAfterRecovery(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	h, a, _ := setup(t, efs)
	_, want1, want2 := cycleTwo(t, a)
	ops2 := []op{
		{t: wire.FrameTrim, disk: 0, off: 0, n: 128 << 10},
		{t: wire.FrameData, disk: 0, off: 4096, data: randBytes(2, 300<<10)},
		{t: wire.FrameData, disk: 0, off: 600 << 10, data: randBytes(3, 200<<10)},
		{t: wire.FrameData, disk: 1, off: 0, data: randBytes(4, 100<<10)},
	}
	m := want1.clone()
	m.apply(ops2)
	if !bytes.Equal(m[0], want2[0]) || !bytes.Equal(m[1], want2[1]) {
		t.Fatal("ops2 are not cycleTwo's")
	}
	hdr := cycleHeader("vm1", 2, 1)
	hdr.Roots = primaryRoots(t, want2)
	a.upload("vm1", "c2", buildStream(t, hdr, ops2))
	efs.InjectAfterPath(vfs.OpWrite, "d0.img", 1, vfs.ErrInjected)
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError {
		t.Fatalf("commit with a failing image: %d %+v", status, e)
	}
	s := h.restart(vfs.Default)
	deadline := time.Now().Add(30 * time.Second)
	for {
		rep, _ := s.Replica("vm1")
		if rep.Applied != 2 {
			t.Fatalf("after recovery: %+v", rep)
		}
		if rep.Verified == 2 {
			break
		}
		if rep.Diverged != nil || time.Now().After(deadline) {
			t.Fatalf("cycle 2's roots not verified after recovery: %+v", rep)
		}
		time.Sleep(time.Millisecond)
	}
	checkTreeMatches(t, waitBuilt(t, s, "vm1"), want2)
	if got := h.ev.get(&h.ev.verified); !slices.Equal(got, []string{"vm1/2"}) {
		t.Fatalf("Verified events %v", got)
	}
}

// TestTreeHeldResyncChecked: a resync held for the cycle that makes it
// exact is applied with that cycle in one go; the divergence stays until
// then, and that cycle's roots are checked against the images the resync
// left.
func TestTreeHeldResyncChecked(t *testing.T) {
	rig := newCrashRig(t)
	v, _ := rig.s.lookup("vm1")
	r := rand.New(rand.NewPCG(121, 122))
	primary := newModel(testDisks)
	ops1 := randomOps(r, testDisks, 10)
	primary.apply(ops1)
	wrong := primary.clone()
	wrong[0][0] ^= 0x80
	hdr := cycleHeader("vm1", 1, 0)
	hdr.Roots = primaryRoots(t, wrong)
	if rep, err := resend(t, v, "c1", buildStream(t, hdr, ops1)); err != nil || rep.Diverged == nil || !slices.Equal(rep.Diverged.Disks, []string{"d0"}) {
		t.Fatalf("cycle 1 with other roots: %+v %v", rep, err)
	}

	// The pieces are read while the guest writes cycle 2: they hold its
	// data already, and cycle 2 writes it again.
	ops2 := randomOps(r, testDisks, 6)
	primary.apply(ops2)
	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	if _, err := v.syncStart(wire.SyncStart{Gen: 5, Kind: wire.KindResync, Base: 1, PieceSize: pieceSize, Pieces: pieces}); err != nil {
		t.Fatal(err)
	}
	for p := range pieces {
		d, off, n, _ := wire.PieceRange(testDisks, pieceSize, p)
		ph := wire.Header{VM: "vm1", Kind: wire.KindResync, Disks: testDisks, Gen: 5, Piece: p}
		id := wire.SyncUploadID(5, p)
		stage(t, v, id, buildStream(t, ph, []op{{t: wire.FrameData, disk: d, off: off, data: primary[d][off : off+n]}}))
		if _, err := commitID(v, id); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := v.syncFinish(wire.SyncFinish{Gen: 5, Base: 1, ConsistentAt: 2})
	if err != nil || rep.Diverged == nil || rep.Applied != 1 {
		t.Fatalf("held resync: %+v %v", rep, err)
	}
	hdr = cycleHeader("vm1", 2, 1)
	hdr.Roots = primaryRoots(t, primary)
	rep, err = resend(t, v, "c2", buildStream(t, hdr, ops2))
	if err != nil || rep.Applied != 2 || !rep.Consistent || rep.Diverged != nil || rep.Verified != 2 {
		t.Fatalf("the cycle that makes the held resync exact: %+v %v", rep, err)
	}
	checkTreeMatches(t, v, primary)
}

// TestTreeUnreadableStartsAfresh: a tree directory that is not a tree is
// replaced by a new one, built from the images.
func TestTreeUnreadableStartsAfresh(t *testing.T) {
	h, a, dir := setup(t, nil)
	ops := randomOps(rand.New(rand.NewPCG(131, 132)), testDisks, 10)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	want := newModel(testDisks)
	want.apply(ops)
	h.server().Close()
	names, err := os.ReadDir(filepath.Join(dir, treeDir))
	if err != nil || len(names) == 0 {
		t.Fatalf("tree directory: %v %v", names, err)
	}
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, treeDir, n.Name()), []byte("not badger"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := h.restart(nil)
	checkTreeMatches(t, waitBuilt(t, s, "vm1"), want)
}
