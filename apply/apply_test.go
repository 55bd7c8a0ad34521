package apply

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"lukechampine.com/blake3"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// setup is a harness with one primary allowed into its storage, and VM
// "vm1" enabled by it.
func setup(t *testing.T, fsys vfs.FS) (*harness, *client, string) {
	t.Helper()
	h := newHarness(t, fsys)
	h.allow("*.example.com", h.storage, "")
	a := h.client("a.example.com")
	r := a.enable("vm1", testDisks)
	if r.State != stateNew || r.Primary != "a.example.com" || r.Applied != 0 || r.Consistent {
		t.Fatalf("new replica: %+v", r)
	}
	dir, ok := h.server().ImageDir("vm1")
	if !ok || dir != filepath.Join(h.storage, "vm1") {
		t.Fatalf("ImageDir = %q, %v", dir, ok)
	}
	// The tree's build reads the images through the same filesystem: done
	// before a test injects faults into it.
	waitBuilt(t, h.server(), "vm1")
	return h, a, dir
}

func TestCyclesApplied(t *testing.T) {
	h, a, dir := setup(t, nil)
	want := newModel(testDisks)
	checkImages(t, vfs.Default, dir, testDisks, want)
	r := rand.New(rand.NewPCG(1, 2))
	for c := uint64(1); c <= 3; c++ {
		ops := randomOps(r, testDisks, 20)
		rep := a.send("vm1", wire.CycleUploadID(c), buildStream(t, cycleHeader("vm1", c, c-1), ops))
		want.apply(ops)
		if rep.Applied != c || !rep.AppliedAt.Equal(cycleHeader("vm1", c, 0).Sealed) || rep.State != stateReplicating || !rep.Consistent {
			t.Fatalf("after cycle %d: %+v", c, rep)
		}
		checkImages(t, vfs.Default, dir, testDisks, want)
	}
	// Nothing staged is left behind.
	if names, _ := vfs.Default.ReadDir(filepath.Join(dir, stagingDir)); len(names) != 0 {
		t.Fatalf("staging holds %v", names)
	}
	if got := h.ev.get(&h.ev.applied); !slices.Equal(got, []string{"vm1/1", "vm1/2", "vm1/3"}) {
		t.Fatalf("CycleApplied events %v", got)
	}
	// State survives a restart.
	h.restart(nil)
	rep, ok := h.server().Replica("vm1")
	if !ok || rep.Applied != 3 || !rep.Consistent {
		t.Fatalf("after restart: %+v %v", rep, ok)
	}
	var got wire.Replica
	if status, e := a.call("GET", vmPath("vm1"), nil, &got); status != 200 || got.Applied != 3 {
		t.Fatalf("GET: %d %+v %+v", status, e, got)
	}
}

func TestCycleRepeatedIsIdempotent(t *testing.T) {
	h, a, dir := setup(t, nil)
	ops := []op{{t: wire.FrameData, disk: 0, off: 4096, data: bytes.Repeat([]byte{7}, 8192)}}
	c1 := buildStream(t, cycleHeader("vm1", 1, 0), ops)
	a.send("vm1", "c1", c1)
	want := newModel(testDisks)
	want.apply(ops)
	// Cycle 2 overwrites the same blocks: re-applying cycle 1 would show.
	ops2 := []op{{t: wire.FrameData, disk: 0, off: 4096, data: bytes.Repeat([]byte{9}, 4096)}}
	a.send("vm1", "c2", buildStream(t, cycleHeader("vm1", 2, 1), ops2))
	want.apply(ops2)
	for range 2 {
		rep := a.send("vm1", "c1", c1) // a retry after a lost answer
		if rep.Applied != 2 {
			t.Fatalf("repeated cycle 1: %+v", rep)
		}
	}
	// A commit retried with nothing staged is answered too.
	if status, rep, e := a.commit("vm1", "c2"); status != 200 || rep.Applied != 2 {
		t.Fatalf("repeated commit: %d %+v %+v", status, rep, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want)
	if got := h.ev.get(&h.ev.applied); len(got) != 2 {
		t.Fatalf("applied %v, want cycles 1 and 2 once", got)
	}
	if _, err := os.Stat(filepath.Join(dir, stagingDir, "c1.part")); !os.IsNotExist(err) {
		t.Fatalf("repeated upload left staged: %v", err)
	}
}

func TestGapRejected(t *testing.T) {
	_, a, dir := setup(t, nil)
	ops := []op{{t: wire.FrameData, disk: 1, off: 0, data: []byte("cycle one")}}
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	want := newModel(testDisks)
	want.apply(ops)
	state := fileBytes(t, vfs.Default, filepath.Join(dir, stateFile))

	later := []op{{t: wire.FrameData, disk: 1, off: 0, data: []byte("cycle three")}}
	for _, tc := range []struct {
		id   string
		h    wire.Header
		code string
	}{
		{"c3", cycleHeader("vm1", 3, 2), wire.CodeGap},      // skips cycle 2
		{"c2", cycleHeader("vm1", 2, 0), wire.CodeGap},      // says it follows 0
		{"c3", cycleHeader("vm1", 2, 1), wire.CodeMismatch}, // id and header disagree
	} {
		a.upload("vm1", tc.id, buildStream(t, tc.h, later))
		status, _, e := a.commit("vm1", tc.id)
		if status != http.StatusConflict || e.Code != tc.code {
			t.Fatalf("%s %+v: %d %+v", tc.id, tc.h, status, e)
		}
		if tc.code == wire.CodeGap && e.Applied != 1 {
			t.Fatalf("gap answer says applied %d, want 1", e.Applied)
		}
		a.do("DELETE", vmPath("vm1")+"/uploads/"+tc.id, nil, nil)
	}
	checkImages(t, vfs.Default, dir, testDisks, want)
	if got := fileBytes(t, vfs.Default, filepath.Join(dir, stateFile)); got != state {
		t.Fatalf("replica.json changed by rejected cycles:\n%s\n%s", state, got)
	}
}

func TestChunkChecks(t *testing.T) {
	_, a, dir := setup(t, nil)
	data := randBytes(1, 200<<10)
	stream := buildStream(t, cycleHeader("vm1", 1, 0), []op{{t: wire.FrameData, disk: 0, off: 0, data: data}})

	// A chunk that does not match its CRC is not stored.
	status, _, e := a.chunkCRC("vm1", "c1", 0, stream[:1000], wire.CRC(stream[:1000])^1)
	if status != http.StatusBadRequest || e.Code != wire.CodeCorrupt {
		t.Fatalf("bad CRC: %d %+v", status, e)
	}
	// Nor one without a CRC header, or without an offset.
	if status, _ := a.do("PUT", vmPath("vm1")+"/uploads/c1?offset=0", stream[:10], nil); status != http.StatusBadRequest {
		t.Fatalf("no CRC header: %d", status)
	}
	if status, _ := a.do("PUT", vmPath("vm1")+"/uploads/c1", stream[:10], map[string]string{wire.ChunkCRCHeader: "00000000"}); status != http.StatusBadRequest {
		t.Fatalf("no offset: %d", status)
	}
	var u wire.Upload
	if a.call("GET", vmPath("vm1")+"/uploads/c1", nil, &u); u.Offset != 0 {
		t.Fatalf("rejected chunks staged %d bytes", u.Offset)
	}

	// A chunk at the wrong offset is refused with the offset to resume at.
	if status, u, _ := a.chunk("vm1", "c1", 0, stream[:1000]); status != 200 || u.Offset != 1000 {
		t.Fatalf("first chunk: %d %+v", status, u)
	}
	for _, off := range []int64{0, 999, 1001, 5000} {
		status, _, e := a.chunk("vm1", "c1", off, stream[off:off+100])
		if status != http.StatusConflict || e.Code != wire.CodeOffset || e.Offset != 1000 {
			t.Fatalf("chunk at %d: %d %+v", off, status, e)
		}
	}
	// Resuming from there completes the upload.
	a.upload("vm1", "c1", stream)
	if status, rep, e := a.commit("vm1", "c1"); status != 200 || rep.Applied != 1 {
		t.Fatalf("commit after resume: %d %+v", status, e)
	}
	want := newModel(testDisks)
	copy(want[0], data)
	checkImages(t, vfs.Default, dir, testDisks, want)

	// A chunk larger than MaxChunk is refused.
	big := make([]byte, wire.MaxChunk+1)
	if status, _, e := a.chunk("vm1", "c2", 0, big); status != http.StatusRequestEntityTooLarge || e.Code != wire.CodeBadReq {
		t.Fatalf("huge chunk: %d %+v", status, e)
	}
	// Upload ids are canonical.
	for _, id := range []string{"c0", "c01", "x1", "s1", "s1-", "s0-1", "c1.part", "..%2Fc1"} {
		if status, _, e := a.chunk("vm1", id, 0, []byte("x")); status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
			t.Fatalf("upload id %q: %d %+v", id, status, e)
		}
	}
}

func TestCorruptStreamRejected(t *testing.T) {
	h, a, dir := setup(t, nil)
	ops := []op{{t: wire.FrameData, disk: 0, off: 8192, data: bytes.Repeat([]byte("abcdefgh"), 4096)}}
	good := buildStream(t, cycleHeader("vm1", 1, 0), ops)
	zero := newModel(testDisks)
	for name, bad := range map[string][]byte{
		"flipped":   func() []byte { b := bytes.Clone(good); b[len(b)/2] ^= 0x40; return b }(),
		"truncated": good[:len(good)-10],
		"header":    func() []byte { b := bytes.Clone(good); b[20] ^= 1; return b }(),
		"trailing":  append(bytes.Clone(good), 0),
	} {
		a.upload("vm1", "c1", bad)
		status, _, e := a.commit("vm1", "c1")
		if status != http.StatusUnprocessableEntity || e.Code != wire.CodeCorrupt {
			t.Fatalf("%s: commit %d %+v", name, status, e)
		}
		checkImages(t, vfs.Default, dir, testDisks, zero)
		var u wire.Upload
		if a.call("GET", vmPath("vm1")+"/uploads/c1", nil, &u); u.Offset != 0 {
			t.Fatalf("%s: corrupt upload kept (%d bytes)", name, u.Offset)
		}
		if rep, _ := h.server().Replica("vm1"); rep.Applied != 0 {
			t.Fatalf("%s: applied %d", name, rep.Applied)
		}
	}
	if n := len(h.ev.get(&h.ev.corrupt)); n != 4 {
		t.Fatalf("%d Corrupt events, want 4", n)
	}
	a.send("vm1", "c1", good)
	want := newModel(testDisks)
	want.apply(ops)
	checkImages(t, vfs.Default, dir, testDisks, want)
}

func TestForbidden(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("a.example.com", h.storage, "")
	h.allow("b.example.com", h.storage, "")
	a, b, evil := h.client("a.example.com"), h.client("b.example.com"), h.client("c.other.org")

	// Not on the allow-list: no VM is created.
	if status, e := evil.call("PUT", vmPath("vmx"), wire.Enable{Disks: testDisks}, nil); status != http.StatusForbidden || e.Code != wire.CodeForbidden {
		t.Fatalf("unlisted peer: %d %+v", status, e)
	}
	if _, err := os.Stat(filepath.Join(h.storage, "vmx")); !os.IsNotExist(err) {
		t.Fatalf("unlisted peer made a VM directory: %v", err)
	}

	a.enable("vm1", testDisks)
	ops := []op{{t: wire.FrameData, disk: 0, off: 0, data: []byte("owned by a")}}
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	want := newModel(testDisks)
	want.apply(ops)
	dir, _ := h.server().ImageDir("vm1")
	state := fileBytes(t, vfs.Default, filepath.Join(dir, stateFile))

	// Another allowed primary may not touch a's VM, and neither may the
	// unlisted one; nothing is written.
	c2 := buildStream(t, cycleHeader("vm1", 2, 1), []op{{t: wire.FrameData, disk: 0, off: 0, data: []byte("b was here")}})
	for _, c := range []*client{b, evil} {
		for _, req := range []struct {
			method, path string
			body         []byte
		}{
			{"GET", vmPath("vm1"), nil},
			{"PUT", vmPath("vm1"), []byte(`{"disks":[{"name":"d0","size":1048576},{"name":"d1","size":786432}]}`)},
			{"PUT", vmPath("vm1") + "/uploads/c2?offset=0", c2},
			{"POST", vmPath("vm1") + "/uploads/c2/commit", nil},
			{"POST", vmPath("vm1") + "/sync", []byte(`{"gen":1,"kind":"full","base":1,"piece_size":65536,"pieces":28}`)},
			{"POST", vmPath("vm1") + "/sums", []byte(`{"disk":0,"offset":0,"length":4096,"block_size":4096}`)},
			{"DELETE", vmPath("vm1"), nil},
		} {
			status, body := c.do(req.method, req.path, req.body, map[string]string{wire.ChunkCRCHeader: "00000000"})
			if _, e := c.decode(status, body, nil); status != http.StatusForbidden || e.Code != wire.CodeForbidden {
				t.Fatalf("%s %s %s: %d %+v", c.name, req.method, req.path, status, e)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, stagingDir, "c2.part")); !os.IsNotExist(err) {
		t.Fatalf("forbidden chunk was staged: %v", err)
	}
	if got := fileBytes(t, vfs.Default, filepath.Join(dir, stateFile)); got != state {
		t.Fatal("replica.json changed by forbidden requests")
	}
	checkImages(t, vfs.Default, dir, testDisks, want)
	if len(h.ev.get(&h.ev.rejected)) < 14 {
		t.Fatalf("Rejected events: %v", h.ev.get(&h.ev.rejected))
	}

	// No TLS, or TLS without a verified client certificate: 403.
	for _, r := range []*http.Request{
		httptest.NewRequest("GET", vmPath("vm1"), nil),                        // r.TLS nil
		httptest.NewRequest("GET", "https://"+replicaHost+vmPath("vm1"), nil), // no verified chain
	} {
		w := httptest.NewRecorder()
		h.server().Handler().ServeHTTP(w, r)
		if _, e := a.decode(w.Code, w.Body.Bytes(), nil); w.Code != http.StatusForbidden || e.Code != wire.CodeForbidden {
			t.Fatalf("without a verified certificate: %d %+v", w.Code, e)
		}
	}

	// Removing the allow-list entry locks its primary out.
	if err := h.server().Disallow("a.example.com"); err != nil {
		t.Fatal(err)
	}
	if status, e := a.call("GET", vmPath("vm1"), nil, nil); status != http.StatusForbidden {
		t.Fatalf("disallowed primary: %d %+v", status, e)
	}
	if err := h.server().Disallow("a.example.com"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Disallow twice: %v", err)
	}
}

func TestTrustGroupMove(t *testing.T) {
	h := newHarness(t, nil)
	other := filepath.Join(t.TempDir(), "other-storage")
	h.allow("a.example.com", h.storage, "cluster1")
	h.allow("b.example.com", other, "cluster1")
	h.allow("c.example.com", h.storage, "cluster2")
	h.allow("d.example.com", h.storage, "")
	a, b, c, d := h.client("a.example.com"), h.client("b.example.com"), h.client("c.example.com"), h.client("d.example.com")
	a.enable("vm1", testDisks)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), nil))

	// Another trust group, or none, is refused.
	for _, x := range []*client{c, d} {
		if status, _, e := x.chunk("vm1", "c2", 0, []byte("x")); status != http.StatusForbidden {
			t.Fatalf("%s: %d %+v", x.name, status, e)
		}
		if status, _, e := x.commit("vm1", "c2"); status != http.StatusForbidden {
			t.Fatalf("%s: %d %+v", x.name, status, e)
		}
	}
	// A primary of the same group takes the VM over; the VM stays where it is.
	ops := []op{{t: wire.FrameData, disk: 1, off: 100, data: []byte("moved to b")}}
	rep := b.send("vm1", "c2", buildStream(t, cycleHeader("vm1", 2, 1), ops))
	if rep.Primary != "b.example.com" || rep.Applied != 2 {
		t.Fatalf("after the move: %+v", rep)
	}
	dir, _ := h.server().ImageDir("vm1")
	if dir != filepath.Join(h.storage, "vm1") {
		t.Fatalf("moved VM changed directory to %s", dir)
	}
	want := newModel(testDisks)
	want.apply(ops)
	checkImages(t, vfs.Default, dir, testDisks, want)
	// The move is durable.
	h.restart(nil)
	if rep, _ := h.server().Replica("vm1"); rep.Primary != "b.example.com" {
		t.Fatalf("after restart: %+v", rep)
	}
	// And a reading primary of the group does not take it back.
	if status, _ := a.call("GET", vmPath("vm1"), nil, nil); status != 200 {
		t.Fatalf("GET by a: %d", status)
	}
	if rep, _ := h.server().Replica("vm1"); rep.Primary != "b.example.com" {
		t.Fatalf("a GET moved the VM: %+v", rep)
	}
}

func TestPathEscape(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("*.example.com", h.storage, "")
	a := h.client("a.example.com")
	outside := filepath.Dir(h.storage)
	for _, vm := range []string{"..%2Fx", "..", ".", "%2E%2E", ".hidden", "a%2Fb", "%2Fetc", "x%00y"} {
		status, e := a.call("PUT", vmPath(vm), wire.Enable{Disks: testDisks}, nil)
		if status != http.StatusBadRequest && status != http.StatusNotFound || e.Code != wire.CodeBadReq && e.Code != wire.CodeUnknownVM {
			t.Fatalf("VM %q: %d %+v", vm, status, e)
		}
	}
	for _, disk := range []string{"../../x", "..", "a/b", ""} {
		status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: []wire.Disk{{Name: disk, Size: 4096}}}, nil)
		if status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
			t.Fatalf("disk %q: %d %+v", disk, status, e)
		}
	}
	// A link in the storage directory that leads out of it.
	escape := filepath.Join(t.TempDir(), "elsewhere")
	if err := os.MkdirAll(escape, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(escape, filepath.Join(h.storage, "vmlink")); err != nil {
		t.Fatal(err)
	}
	if status, e := a.call("PUT", vmPath("vmlink"), wire.Enable{Disks: testDisks}, nil); status != http.StatusForbidden {
		t.Fatalf("VM directory linked outside: %d %+v", status, e)
	}
	for _, dir := range []string{outside, escape} {
		names, _ := os.ReadDir(dir)
		for _, n := range names {
			if n.Name() != "storage" {
				t.Fatalf("something was created in %s: %s", dir, n.Name())
			}
		}
	}
	if len(h.server().Replicas()) != 0 {
		t.Fatalf("replicas: %+v", h.server().Replicas())
	}
}

func TestEnable(t *testing.T) {
	h, a, dir := setup(t, nil)
	// Confirming with the same disks answers the VM; other disks are a mismatch.
	a.enable("vm1", testDisks)
	other := slices.Clone(testDisks)
	other[1].Size += 4096
	if status, e := a.call("PUT", vmPath("vm1"), wire.Enable{Disks: other}, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("other disks: %d %+v", status, e)
	}
	if fi, err := os.Stat(filepath.Join(dir, "d1.img")); err != nil || fi.Size() != testDisks[1].Size {
		t.Fatalf("image: %v %v", fi, err)
	}
	// Existing images must be there, with the right sizes.
	ex := wire.Enable{Disks: []wire.Disk{{Name: "root", Size: 64 << 10}}, Existing: true}
	if status, e := a.call("PUT", vmPath("vm2"), ex, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("existing without images: %d %+v", status, e)
	}
	if _, err := os.Stat(filepath.Join(h.storage, "vm2")); !os.IsNotExist(err) {
		t.Fatalf("failed enable left its directory: %v", err)
	}
	if err := os.MkdirAll(filepath.Join(h.storage, "vm2"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(h.storage, "vm2", "root.img"), bytes.Repeat([]byte{1}, 32<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	if status, e := a.call("PUT", vmPath("vm2"), ex, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("existing image of the wrong size: %d %+v", status, e)
	}
	if err := os.Truncate(filepath.Join(h.storage, "vm2", "root.img"), 64<<10); err != nil {
		t.Fatal(err)
	}
	var r wire.Replica
	if status, e := a.call("PUT", vmPath("vm2"), ex, &r); status != 200 || r.State != stateNew {
		t.Fatalf("existing: %d %+v %+v", status, e, r)
	}
	if b, _ := os.ReadFile(filepath.Join(h.storage, "vm2", "root.img")); b[0] != 1 {
		t.Fatal("existing image was overwritten")
	}
	// Existing images follow the primary only after a sync: a cycle does
	// not make them consistent.
	hdr := wire.Header{VM: "vm2", Kind: wire.KindCycle, Disks: ex.Disks, Cycle: 1}
	if rep := a.send("vm2", "c1", buildStream(t, hdr, nil)); rep.Consistent || rep.State != stateNew {
		t.Fatalf("cycle on existing images: %+v", rep)
	}
	// Unknown VMs, unknown endpoints, bad JSON.
	if status, e := a.call("GET", vmPath("nope"), nil, nil); status != http.StatusNotFound || e.Code != wire.CodeUnknownVM {
		t.Fatalf("unknown VM: %d %+v", status, e)
	}
	if status, e := a.call("GET", vmPath("vm1")+"/nothing", nil, nil); status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
		t.Fatalf("unknown endpoint: %d %+v", status, e)
	}
	status, b := a.do("POST", vmPath("vm1")+"/sync", []byte("{not json"), nil)
	if _, e := a.decode(status, b, nil); status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
		t.Fatalf("bad JSON: %d %+v", status, e)
	}
	status, b = a.do("PATCH", vmPath("vm1"), nil, nil)
	if _, e := a.decode(status, b, nil); status != http.StatusMethodNotAllowed || e.Code != wire.CodeBadReq {
		t.Fatalf("PATCH: %d %+v", status, e)
	}
	// DELETE forgets the VM; its images stay.
	if status, _ := a.do("DELETE", vmPath("vm1"), nil, nil); status != http.StatusNoContent {
		t.Fatalf("DELETE: %d", status)
	}
	if _, ok := h.server().Replica("vm1"); ok {
		t.Fatal("removed VM still listed")
	}
	if _, err := os.Stat(filepath.Join(dir, "d0.img")); err != nil {
		t.Fatalf("removing the VM removed its image: %v", err)
	}
	h.restart(nil)
	if got := h.server().Replicas(); len(got) != 1 || got[0].VM != "vm2" {
		t.Fatalf("after restart: %+v", got)
	}
}

// sendPieces uploads and commits sync pieces cut from m.
func sendPieces(t *testing.T, a *client, vm string, disks []wire.Disk, kind string, gen uint64, pieceSize int64, m model, pieces []int64) {
	t.Helper()
	for _, p := range pieces {
		d, off, n, ok := wire.PieceRange(disks, pieceSize, p)
		if !ok {
			t.Fatalf("no piece %d", p)
		}
		h := wire.Header{VM: vm, Kind: kind, Disks: disks, Gen: gen, Piece: p}
		stream := buildStream(t, h, []op{{t: wire.FrameData, disk: d, off: off, data: m[d][off : off+n]}})
		a.send(vm, wire.SyncUploadID(gen, p), stream)
	}
}

func TestFullInitialCopy(t *testing.T) {
	h, a, dir := setup(t, nil)
	const pieceSize = 256 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	start := wire.SyncStart{Gen: 7, Kind: wire.KindFull, Base: 41, PieceSize: pieceSize, Pieces: pieces}
	var st wire.SyncState
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, &st); status != 200 || len(st.Done) != 0 || st.SyncStart != start {
		t.Fatalf("sync start: %d %+v %+v", status, e, st)
	}
	if rep, _ := h.server().Replica("vm1"); rep.State != stateInitialCopy || rep.Sync == nil {
		t.Fatalf("during the copy: %+v", rep)
	}
	// Wrong piece counts, kinds, generations.
	bad := start
	bad.Pieces++
	if status, e := a.call("POST", vmPath("vm1")+"/sync", bad, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("wrong piece count: %d %+v", status, e)
	}
	if status, _, e := a.chunk("vm1", wire.SyncUploadID(6, 0), 0, []byte("x")); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("piece of another generation: %d %+v", status, e)
	}

	primary := newModel(testDisks)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range primary[0] {
		primary[0][i] = byte(rng.Uint32())
	}
	copy(primary[1], bytes.Repeat([]byte("disk one "), 80000))
	sendPieces(t, a, "vm1", testDisks, wire.KindFull, 7, pieceSize, primary, []int64{0, 2, 4})

	// Finishing early is refused and says how many pieces are missing.
	fin := wire.SyncFinish{Gen: 7, Base: 41, ConsistentAt: 43}
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("early finish: %d %+v", status, e)
	}
	// Resuming after a restart lists the pieces done.
	h.restart(nil)
	if status, _ := a.call("POST", vmPath("vm1")+"/sync", start, &st); status != 200 || !slices.Equal(st.Done, []int64{0, 2, 4}) {
		t.Fatalf("resume: %d %+v", status, st)
	}
	var rest []int64
	for p := range pieces {
		if !slices.Contains(st.Done, p) {
			rest = append(rest, p)
		}
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindFull, 7, pieceSize, primary, rest)
	// An upload of a cycle the copy covers (an earlier attempt's) goes
	// with the finish; one of a later cycle stays.
	staging := filepath.Join(dir, stagingDir)
	for _, n := range []string{"c41.part", "c42.part"} {
		if err := os.WriteFile(filepath.Join(staging, n), []byte("ahead"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var rep wire.Replica
	for range 2 { // the second finish is a retry
		if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, &rep); status != 200 {
			t.Fatalf("finish: %d %+v", status, e)
		}
		if rep.State != stateReplicating || rep.Applied != 41 || rep.Consistent || rep.ConsistentAt != 43 || rep.Sync != nil {
			t.Fatalf("after finish: %+v", rep)
		}
	}
	checkImages(t, vfs.Default, dir, testDisks, primary)
	if names, _ := os.ReadDir(staging); len(names) != 1 || names[0].Name() != "c42.part" {
		t.Fatalf("staging after the finish: %v, want only c42.part", names)
	}
	if err := os.Remove(filepath.Join(staging, "c42.part")); err != nil {
		t.Fatal(err)
	}
	// The cycles up to ConsistentAt, sealed after the last piece was read,
	// make it consistent; not before.
	ops := []op{{t: wire.FrameTrim, disk: 0, off: 0, n: 64 << 10}}
	rep = a.send("vm1", "c42", buildStream(t, cycleHeader("vm1", 42, 41), ops))
	primary.apply(ops)
	if rep.Consistent || rep.Applied != 42 {
		t.Fatalf("after cycle 42 (consistent at 43): %+v", rep)
	}
	rep = a.send("vm1", "c43", buildStream(t, cycleHeader("vm1", 43, 42), nil))
	if !rep.Consistent || rep.Applied != 43 || rep.ConsistentAt != 0 {
		t.Fatalf("after cycle 43: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, primary)
	// A finished generation cannot start again.
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, nil); status != http.StatusConflict {
		t.Fatalf("restart a finished sync: %d %+v", status, e)
	}
	h.ev.mu.Lock()
	defer h.ev.mu.Unlock()
	if got := h.ev.synced; !slices.Equal(got, []uint64{7}) {
		t.Fatalf("SyncFinished events %v", got)
	}
}

func TestResyncStagedUntilFinish(t *testing.T) {
	h, a, dir := setup(t, nil)
	r := rand.New(rand.NewPCG(5, 6))
	ops := randomOps(r, testDisks, 30)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	replica := newModel(testDisks)
	replica.apply(ops)

	// The primary diverged; it resyncs with base 5.
	primary := replica.clone()
	primary.apply(randomOps(r, testDisks, 30))
	const pieceSize = 128 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	start := wire.SyncStart{Gen: 2, Kind: wire.KindResync, Base: 5, PieceSize: pieceSize, Pieces: pieces}
	var st wire.SyncState
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, &st); status != 200 {
		t.Fatalf("sync start: %d %+v", status, e)
	}
	all := make([]int64, pieces)
	for i := range all {
		all[i] = int64(i)
	}
	for _, p := range all {
		sendPieces(t, a, "vm1", testDisks, wire.KindResync, 2, pieceSize, primary, []int64{p})
		// The image keeps its consistent point while pieces arrive.
		checkImages(t, vfs.Default, dir, testDisks, replica)
	}
	// Still consistent: at cycle 1's barrier.
	if rep, _ := h.server().Replica("vm1"); rep.State != stateResyncing || rep.Applied != 1 || !rep.Consistent {
		t.Fatalf("during resync: %+v", rep)
	}
	if names, _ := os.ReadDir(filepath.Join(dir, syncDir, "2")); int64(len(names)) != pieces {
		t.Fatalf("%d staged pieces, want %d", len(names), pieces)
	}
	// Even across a restart.
	h.restart(nil)
	checkImages(t, vfs.Default, dir, testDisks, replica)

	// Cycles the primary uploaded ahead before it met the gap and
	// resynced: the finish leaves those at or below the base behind it.
	staging := filepath.Join(dir, stagingDir)
	for _, n := range []string{"c3.part", "c5.part", "c6.part"} {
		if err := os.WriteFile(filepath.Join(staging, n), []byte("ahead"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	fin := wire.SyncFinish{Gen: 2, Base: 5}
	var rep wire.Replica
	for range 2 {
		if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, &rep); status != 200 || rep.Applied != 5 || rep.State != stateReplicating || rep.Consistent {
			t.Fatalf("finish: %d %+v %+v", status, e, rep)
		}
	}
	checkImages(t, vfs.Default, dir, testDisks, primary)
	if _, err := os.Stat(filepath.Join(dir, syncDir, "2")); !os.IsNotExist(err) {
		t.Fatalf("applied pieces kept: %v", err)
	}
	if names, _ := os.ReadDir(staging); len(names) != 1 || names[0].Name() != "c6.part" {
		t.Fatalf("staging after the finish: %v, want only c6.part", names)
	}
}

// A resync finished with ConsistentAt is held: pieces and the cycles up to
// ConsistentAt are applied together, so the images go from one consistent
// point straight to the next (no resync cliff), across a restart too.
func TestResyncHeldUntilConsistent(t *testing.T) {
	h, a, dir := setup(t, nil)
	replica := newModel(testDisks)
	rep := a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), nil))
	if !rep.Consistent {
		t.Fatalf("after cycle 1: %+v", rep)
	}
	const pieceSize = 512 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	primary := newModel(testDisks)
	rng := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 4096; i++ {
		primary[0][rng.IntN(len(primary[0]))] = byte(rng.Uint32())
	}
	start := wire.SyncStart{Gen: 3, Kind: wire.KindResync, Base: 5, PieceSize: pieceSize, Pieces: pieces}
	if status, e := a.call("POST", vmPath("vm1")+"/sync", start, nil); status != 200 {
		t.Fatalf("sync start: %d %+v", status, e)
	}
	all := make([]int64, pieces)
	for i := range all {
		all[i] = int64(i)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindResync, 3, pieceSize, primary, all)
	fin := wire.SyncFinish{Gen: 3, Base: 5, ConsistentAt: 7}
	for range 2 {
		var r wire.Replica
		if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, &r); status != 200 || r.Applied != 1 || !r.Consistent {
			t.Fatalf("held finish: %d %+v %+v", status, e, r)
		}
	}
	checkImages(t, vfs.Default, dir, testDisks, replica)

	ops6 := []op{{t: wire.FrameData, disk: 1, off: 8192, data: randBytes(6, 8192)}}
	ops7 := []op{{t: wire.FrameTrim, disk: 0, off: 0, n: 64 << 10}, {t: wire.FrameData, disk: 0, off: 1 << 16, data: randBytes(7, 4096)}}
	rep = a.send("vm1", "c6", buildStream(t, cycleHeader("vm1", 6, 5), ops6))
	if rep.Applied != 1 || !rep.Consistent {
		t.Fatalf("after staging cycle 6: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, replica)
	h.restart(nil) // the held resync and cycle 6 survive
	checkImages(t, vfs.Default, dir, testDisks, replica)
	rep = a.send("vm1", "c7", buildStream(t, cycleHeader("vm1", 7, 6), ops7))
	primary.apply(ops6)
	primary.apply(ops7)
	if rep.Applied != 7 || !rep.Consistent || rep.State != stateReplicating || rep.Sync != nil {
		t.Fatalf("after cycle 7: %+v", rep)
	}
	checkImages(t, vfs.Default, dir, testDisks, primary)
	if names, _ := os.ReadDir(filepath.Join(dir, stagingDir)); len(names) != 0 {
		t.Fatalf("staging left: %v", names)
	}
	rep = a.send("vm1", "c8", buildStream(t, cycleHeader("vm1", 8, 7), nil))
	if rep.Applied != 8 {
		t.Fatalf("after cycle 8: %+v", rep)
	}
}

func TestResyncLostPieceIsResent(t *testing.T) {
	_, a, dir := setup(t, nil)
	primary := newModel(testDisks)
	primary[0][5] = 5
	const pieceSize = 512 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	start := wire.SyncStart{Gen: 3, Kind: wire.KindResync, Base: 2, PieceSize: pieceSize, Pieces: pieces}
	a.call("POST", vmPath("vm1")+"/sync", start, nil)
	var all []int64
	for p := range pieces {
		all = append(all, p)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindResync, 3, pieceSize, primary, all)
	if err := os.Remove(filepath.Join(dir, syncDir, "3", "1.stream")); err != nil {
		t.Fatal(err)
	}
	fin := wire.SyncFinish{Gen: 3, Base: 2}
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, nil); status != http.StatusConflict || e.Code != wire.CodeMismatch {
		t.Fatalf("finish with a lost piece: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, newModel(testDisks))
	var st wire.SyncState
	a.call("POST", vmPath("vm1")+"/sync", start, &st)
	if !slices.Equal(st.Done, []int64{0, 2, 3}) {
		t.Fatalf("resume after the loss: done %v", st.Done)
	}
	sendPieces(t, a, "vm1", testDisks, wire.KindResync, 3, pieceSize, primary, []int64{1})
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", fin, nil); status != 200 {
		t.Fatalf("finish: %d %+v", status, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, primary)
}

func TestNewSyncDropsOlder(t *testing.T) {
	_, a, dir := setup(t, nil)
	const pieceSize = 512 << 10
	pieces := wire.PieceCount(testDisks, pieceSize)
	primary := newModel(testDisks)
	a.call("POST", vmPath("vm1")+"/sync", wire.SyncStart{Gen: 1, Kind: wire.KindResync, Base: 1, PieceSize: pieceSize, Pieces: pieces}, nil)
	sendPieces(t, a, "vm1", testDisks, wire.KindResync, 1, pieceSize, primary, []int64{0})
	a.upload("vm1", "s1-1", []byte("partial"))
	var st wire.SyncState
	if status, e := a.call("POST", vmPath("vm1")+"/sync", wire.SyncStart{Gen: 2, Kind: wire.KindFull, Base: 3, PieceSize: pieceSize, Pieces: pieces}, &st); status != 200 || len(st.Done) != 0 {
		t.Fatalf("new generation: %d %+v %+v", status, e, st)
	}
	for _, p := range []string{filepath.Join(dir, syncDir, "1"), filepath.Join(dir, stagingDir, "s1-1.part")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s of the abandoned sync kept: %v", p, err)
		}
	}
	if status, e := a.call("POST", vmPath("vm1")+"/sync/finish", wire.SyncFinish{Gen: 1, Base: 1}, nil); status != http.StatusConflict {
		t.Fatalf("finish of the abandoned generation: %d %+v", status, e)
	}
}

func TestSums(t *testing.T) {
	_, a, dir := setup(t, nil)
	r := rand.New(rand.NewPCG(9, 9))
	ops := randomOps(r, testDisks, 20)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops))
	img, err := os.ReadFile(filepath.Join(dir, "d1.img"))
	if err != nil {
		t.Fatal(err)
	}
	size := int64(len(img))
	for _, req := range []wire.SumsRequest{
		{Disk: 1, Offset: 0, Length: size, BlockSize: 4096},
		{Disk: 1, Offset: 64 << 10, Length: 256 << 10, BlockSize: 64 << 10},
		{Disk: 1, Offset: size - 8192, Length: 1 << 20, BlockSize: 1 << 20}, // past the end
		{Disk: 1, Offset: size - 4096, Length: 3 * 4096, BlockSize: 4096},   // blocks past the end are empty
		{Disk: 1, Offset: 100, Length: 5000, BlockSize: 4096},               // cut at the range's end
	} {
		status, b := a.do("POST", vmPath("vm1")+"/sums", mustJSON(t, req), nil)
		if status != 200 {
			t.Fatalf("%+v: %d %s", req, status, b)
		}
		var want []byte
		end := req.Offset + req.Length
		for off := req.Offset; off < end; off += req.BlockSize {
			lo, hi := min(off, size), min(off+req.BlockSize, end, size)
			sum := blake3.Sum256(img[lo:hi])
			want = append(want, sum[:]...)
		}
		if !bytes.Equal(b, want) {
			t.Fatalf("%+v: %d bytes of sums, not the BLAKE3 of the image's blocks", req, len(b))
		}
	}
	for _, req := range []wire.SumsRequest{
		{Disk: 2, Offset: 0, Length: 4096, BlockSize: 4096},
		{Disk: 0, Offset: 0, Length: 4096, BlockSize: 1000},
		{Disk: 0, Offset: 0, Length: 4096, BlockSize: 2048},
		{Disk: 0, Offset: 0, Length: 4096, BlockSize: 32 << 20},
		{Disk: 0, Offset: 0, Length: 512 << 20, BlockSize: 4096},
		{Disk: 0, Offset: -1, Length: 4096, BlockSize: 4096},
		{Disk: 0, Offset: 0, Length: 0, BlockSize: 4096},
	} {
		status, b := a.do("POST", vmPath("vm1")+"/sums", mustJSON(t, req), nil)
		if _, e := a.decode(status, b, nil); status != http.StatusBadRequest || e.Code != wire.CodeBadReq {
			t.Fatalf("%+v: %d %+v", req, status, e)
		}
	}
}

func TestAllowList(t *testing.T) {
	h := newHarness(t, nil)
	s := h.server()
	storage := filepath.Join(t.TempDir(), "new", "storage")
	if err := s.Allow(AllowEntry{Primary: "*.example.com", Storage: storage, TrustGroup: "g1"}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(storage); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("storage directory: %v %v", fi, err)
	}
	for _, e := range []struct {
		entry AllowEntry
		err   error
	}{
		{AllowEntry{Primary: "*.EXAMPLE.com", Storage: storage}, ErrExists},
		{AllowEntry{Primary: "", Storage: storage}, ErrInvalid},
		{AllowEntry{Primary: "a b", Storage: storage}, ErrInvalid},
		{AllowEntry{Primary: "x.example.org", Storage: "relative/dir"}, ErrInvalid},
		{AllowEntry{Primary: "x.example.org", Storage: storage, TrustGroup: "../g"}, ErrInvalid},
	} {
		if err := s.Allow(e.entry); !errors.Is(err, e.err) {
			t.Fatalf("Allow(%+v) = %v, want %v", e.entry, err, e.err)
		}
	}
	if err := s.Allow(AllowEntry{Primary: "*", Storage: h.storage}); err != nil {
		t.Fatal(err)
	}
	want := []AllowEntry{{Primary: "*.example.com", Storage: storage, TrustGroup: "g1"}, {Primary: "*", Storage: h.storage}}
	if got := s.AllowList(); !slices.Equal(got, want) {
		t.Fatalf("AllowList = %+v", got)
	}
	// The first matching entry decides where a new VM goes.
	h.client("a.example.com").enable("vm1", testDisks)
	h.client("z.other.org").enable("vm2", testDisks)
	if d, _ := s.ImageDir("vm1"); d != filepath.Join(storage, "vm1") {
		t.Fatalf("vm1 in %s", d)
	}
	if d, _ := s.ImageDir("vm2"); d != filepath.Join(h.storage, "vm2") {
		t.Fatalf("vm2 in %s", d)
	}
	s = h.restart(nil)
	if got := s.AllowList(); !slices.Equal(got, want) {
		t.Fatalf("AllowList after restart = %+v", got)
	}
}
