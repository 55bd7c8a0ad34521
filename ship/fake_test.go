package ship

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
	"lukechampine.com/blake3"
)

// fakeReplica is a replica that follows the protocol of internal/wire/doc.go
// on a real TLS listener, keeping images in memory, with knobs to fail,
// corrupt and observe. It stays small on purpose: the real one is package
// apply, which ship never imports.
type fakeReplica struct {
	mu sync.Mutex
	// inflight counts the chunk requests per upload id being served;
	// turn is signalled when one ends (a chunk that came early waits for
	// those before it, as apply's putChunk does).
	inflight map[string]int
	turn     *sync.Cond
	allow    map[string]bool // primaries (certificate names) allowed
	vms      map[string]*fakeVM
	// fail, if set, may answer a request instead of the replica: it returns
	// the status and wire code, or 0 to let the request through.
	fail func(r *http.Request) (int, string)
	// corruptChunks flips one byte of that many chunk bodies as read (as
	// if damaged above TLS, by a broken proxy).
	corruptChunks int
	// afterCommit runs (unlocked) after a successful commit of upload id.
	afterCommit func(id string)

	requests     int
	chunkMax     int
	uploadBytes  map[string]int64 // body bytes received per upload id
	streamSize   map[string]int64 // size of each stream committed
	syncBytes    int64            // body bytes of sync piece chunks
	corruptSeen  int
	commits      []string // ids committed successfully, in order
	dataBytes    map[string]int64
	zeroRanges   map[string]int64
	resyncBlocks int64 // data bytes applied by resync pieces
	enables      []wire.Enable
	headers      []wire.Header // of the cycles applied, in order

	// t closes the replica's block trees when the test ends.
	t *testing.T
	// treeSums is how /sums answers a request with a Kind: "" from a
	// real block tree of the images (built at the first such request,
	// then kept by every apply), "old" as a replica that predates kinds
	// (BLAKE3 sums, no kind header), "unavailable" with that code.
	// treeUnknown, if set, makes the hash of a leaf or block (kind, wire
	// disk, offset) unknown in answers.
	treeSums    string
	treeUnknown func(kind string, disk int, off int64) bool
	sumsKinds   map[string]int // /sums requests per kind ("" BLAKE3)
}

func (f *fakeReplica) lastEnable() wire.Enable {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.enables) == 0 {
		return wire.Enable{}
	}
	return f.enables[len(f.enables)-1]
}

func (f *fakeReplica) cycleHeaders() []wire.Header {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]wire.Header(nil), f.headers...)
}

type fakeVM struct {
	primary   string
	disks     []wire.Disk
	images    [][]byte
	state     string
	applied   uint64
	appliedAt time.Time
	sync      *wire.SyncState
	staged    map[string][]byte
	pending   []wire.Frame // frames of committed resync pieces, applied at finish
	held      *fakeHeld    // a finished resync held until its ConsistentAt
	tree      *blocktree.Tree
	// diverged and verified are the answers' Diverged and Verified; a
	// resync's finish clears diverged.
	diverged *wire.Divergence
	verified uint64
}

// fakeHeld is a resync whose finish named a ConsistentAt past its base: as
// apply does, the replica keeps its pieces and the cycles that follow
// staged, its images at their last consistent point, and applies all of
// it with the commit of cycle ConsistentAt.
type fakeHeld struct {
	consistentAt uint64
	last         uint64 // the newest cycle staged (the base at first)
	frames       []wire.Frame
	headers      []wire.Header
}

func newFakeReplica(allow ...string) *fakeReplica {
	f := &fakeReplica{
		allow: map[string]bool{}, vms: map[string]*fakeVM{},
		uploadBytes: map[string]int64{}, streamSize: map[string]int64{},
		dataBytes: map[string]int64{}, zeroRanges: map[string]int64{},
		sumsKinds: map[string]int{},
	}
	for _, a := range allow {
		f.allow[a] = true
	}
	return f
}

func (f *fakeReplica) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/replicas/{vm}", f.getVM)
	mux.HandleFunc("PUT /v1/replicas/{vm}", f.enable)
	mux.HandleFunc("GET /v1/replicas/{vm}/uploads/{id}", f.uploadOffset)
	mux.HandleFunc("PUT /v1/replicas/{vm}/uploads/{id}", f.putChunk)
	mux.HandleFunc("POST /v1/replicas/{vm}/uploads/{id}/commit", f.commit)
	mux.HandleFunc("DELETE /v1/replicas/{vm}/uploads/{id}", f.discard)
	mux.HandleFunc("POST /v1/replicas/{vm}/sync", f.syncStart)
	mux.HandleFunc("POST /v1/replicas/{vm}/sums", f.sums)
	mux.HandleFunc("POST /v1/replicas/{vm}/sync/finish", f.syncFinish)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests++
		fail := f.fail
		f.mu.Unlock()
		if fail != nil {
			if status, code := fail(r); status != 0 {
				io.Copy(io.Discard, r.Body)
				writeErr(w, status, wire.Error{Code: code, Message: "injected"})
				return
			}
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, e wire.Error) { writeJSON(w, status, e) }

// vm finds the VM of a request and checks the peer may use it; it answers
// the request itself when not.
func (f *fakeReplica) vm(w http.ResponseWriter, r *http.Request) (*fakeVM, bool) {
	peer := pki.PeerName(r.TLS)
	if !f.allow[peer] {
		writeErr(w, http.StatusForbidden, wire.Error{Code: wire.CodeForbidden, Message: "primary " + peer + " is not allowed"})
		return nil, false
	}
	vm := f.vms[r.PathValue("vm")]
	if vm == nil {
		writeErr(w, http.StatusNotFound, wire.Error{Code: wire.CodeUnknownVM, Message: "no such VM"})
		return nil, false
	}
	if vm.primary != peer {
		writeErr(w, http.StatusForbidden, wire.Error{Code: wire.CodeForbidden, Message: "VM belongs to " + vm.primary})
		return nil, false
	}
	return vm, true
}

func (vm *fakeVM) view(name string) wire.Replica {
	return wire.Replica{VM: name, Primary: vm.primary, Disks: vm.disks, State: vm.state,
		Applied: vm.applied, AppliedAt: vm.appliedAt, Consistent: vm.sync == nil && vm.held == nil && vm.state == "replicating", Sync: vm.sync,
		Diverged: vm.diverged, Verified: vm.verified}
}

func (f *fakeReplica) getVM(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, vm.view(r.PathValue("vm")))
}

func (f *fakeReplica) enable(w http.ResponseWriter, r *http.Request) {
	var e wire.Enable
	if err := json.NewDecoder(r.Body).Decode(&e); err != nil {
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enables = append(f.enables, e)
	peer := pki.PeerName(r.TLS)
	if !f.allow[peer] {
		writeErr(w, http.StatusForbidden, wire.Error{Code: wire.CodeForbidden, Message: "primary " + peer + " is not allowed"})
		return
	}
	name := r.PathValue("vm")
	vm := f.vms[name]
	if vm == nil {
		vm = &fakeVM{primary: peer, disks: e.Disks, state: "new", staged: map[string][]byte{}}
		for _, d := range e.Disks {
			vm.images = append(vm.images, make([]byte, d.Size))
		}
		f.vms[name] = vm
	} else if vm.primary != peer {
		writeErr(w, http.StatusForbidden, wire.Error{Code: wire.CodeForbidden, Message: "VM belongs to " + vm.primary})
		return
	} else if !slices.Equal(vm.disks, e.Disks) {
		writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeMismatch, Message: "disks differ"})
		return
	}
	writeJSON(w, http.StatusOK, vm.view(name))
}

func (f *fakeReplica) uploadOffset(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	id := r.PathValue("id")
	writeJSON(w, http.StatusOK, wire.Upload{ID: id, Offset: int64(len(vm.staged[id]))})
}

func (f *fakeReplica) putChunk(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f.mu.Lock()
	if f.inflight == nil {
		f.inflight, f.turn = map[string]int{}, sync.NewCond(&f.mu)
	}
	f.inflight[id]++
	f.turn.Broadcast()
	f.mu.Unlock()
	body, err := io.ReadAll(io.LimitReader(r.Body, wire.MaxChunk+1))
	f.mu.Lock()
	defer f.mu.Unlock()
	defer func() {
		f.inflight[id]--
		f.turn.Broadcast()
	}()
	// Wait for the chunks before it, as apply's awaitTurn does: while one
	// is in flight, or for a moment for one to come.
	if off, perr := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64); perr == nil {
		expired := false
		t := time.AfterFunc(200*time.Millisecond, func() {
			f.mu.Lock()
			expired = true
			f.turn.Broadcast()
			f.mu.Unlock()
		})
		defer t.Stop()
		for vm := f.vms[r.PathValue("vm")]; vm != nil && off > int64(len(vm.staged[id])) && (f.inflight[id] > 1 || !expired); {
			f.turn.Wait()
		}
	}
	f.uploadBytes[id] += int64(len(body))
	if id[0] == 's' {
		f.syncBytes += int64(len(body))
	}
	f.chunkMax = max(f.chunkMax, len(body))
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	if err != nil || int64(len(body)) != r.ContentLength {
		// Cut: nothing is staged, and the answer (if it gets through)
		// says where to resume, as apply's does.
		writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeOffset, Message: "chunk cut short", Offset: int64(len(vm.staged[id]))})
		return
	}
	if len(body) > wire.MaxChunk {
		writeErr(w, http.StatusRequestEntityTooLarge, wire.Error{Code: wire.CodeBadReq, Message: "chunk too large"})
		return
	}
	if f.corruptChunks > 0 && len(body) > 0 {
		f.corruptChunks--
		body[len(body)/2] ^= 0x40
	}
	want, err := strconv.ParseUint(r.Header.Get(wire.ChunkCRCHeader), 16, 32)
	if err != nil || uint32(want) != wire.CRC(body) {
		f.corruptSeen++
		writeErr(w, http.StatusUnprocessableEntity, wire.Error{Code: wire.CodeCorrupt, Message: "chunk checksum mismatch"})
		return
	}
	off, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
	if err != nil || off != int64(len(vm.staged[id])) {
		writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeOffset, Message: "wrong offset", Offset: int64(len(vm.staged[id]))})
		return
	}
	vm.staged[id] = append(vm.staged[id], body...)
	writeJSON(w, http.StatusOK, wire.Upload{ID: id, Offset: int64(len(vm.staged[id]))})
}

func (f *fakeReplica) discard(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	delete(vm.staged, r.PathValue("id"))
	w.WriteHeader(http.StatusNoContent)
}

// readStream verifies a whole stream and returns its header and frames.
func readStream(b []byte) (wire.Header, []wire.Frame, error) {
	rd, err := wire.NewReader(bytes.NewReader(b))
	if err != nil {
		return wire.Header{}, nil, err
	}
	var frames []wire.Frame
	for {
		fr, err := rd.Next()
		if err == io.EOF {
			return rd.Header(), frames, nil
		}
		if err != nil {
			return wire.Header{}, nil, err
		}
		fr.Data = slices.Clone(fr.Data)
		frames = append(frames, fr)
	}
}

func (vm *fakeVM) apply(frames []wire.Frame) {
	var b *blocktree.Batch
	if vm.tree != nil {
		b = vm.tree.Batch()
	}
	for _, fr := range frames {
		img := vm.images[fr.Disk][fr.Offset : fr.Offset+fr.Length]
		if fr.Type == wire.FrameData {
			copy(img, fr.Data)
			if b != nil {
				b.Data(fr.Disk, fr.Offset, fr.Data)
			}
		} else {
			clear(img)
			if b != nil {
				b.Zero(fr.Disk, fr.Offset, fr.Length)
			}
		}
	}
	if b != nil {
		if err := b.Commit(); err != nil {
			panic(err)
		}
	}
}

// checkRoots compares the VM's tree roots after applying the cycle of hdr
// with the primary's in hdr, as apply does: equal, the cycle is verified;
// different, the VM diverged, naming the disks.
func (f *fakeReplica) checkRoots(vm *fakeVM, hdr wire.Header) {
	if len(hdr.Roots) == 0 {
		return
	}
	if vm.tree == nil {
		t, err := memTree(f.t, vm.images)
		if err != nil {
			panic(err)
		}
		vm.tree = t
	}
	var bad []string
	for d, r := range vm.tree.Roots() {
		if r.String() != hdr.Roots[d] {
			bad = append(bad, vm.disks[d].Name)
		}
	}
	if bad == nil {
		vm.verified = hdr.Cycle
	} else if vm.diverged == nil {
		vm.diverged = &wire.Divergence{Cycle: hdr.Cycle, Disks: bad, At: time.Now()}
	}
}

// treeAnswer answers a sums request with a Kind from the VM's block tree.
func (f *fakeReplica) treeAnswer(w http.ResponseWriter, vm *fakeVM, q wire.SumsRequest) {
	if vm.tree == nil {
		t, err := memTree(f.t, vm.images)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, wire.Error{Code: wire.CodeInternal, Message: err.Error()})
			return
		}
		vm.tree = t
	}
	var hs []uint64
	unit := int64(blocktree.BlockSize)
	switch q.Kind {
	case wire.SumsLeaves:
		if q.Offset%blocktree.LeafSize != 0 {
			writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: "unaligned leaves"})
			return
		}
		unit = blocktree.LeafSize
		var err error
		hs, err = vm.tree.Leaves(q.Disk, q.Offset/unit, (q.Length+unit-1)/unit)
		if err != nil {
			panic(err)
		}
	case wire.SumsBlocks:
		if q.Offset%blocktree.BlockSize != 0 {
			writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: "unaligned blocks"})
			return
		}
		b, err := vm.tree.Blocks(q.Disk, q.Offset, q.Length)
		if err != nil {
			panic(err)
		}
		for _, h := range b {
			hs = append(hs, uint64(h))
		}
	default:
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: "unknown kind"})
		return
	}
	out := make([]byte, 0, 8*len(hs))
	for i, h := range hs {
		if f.treeUnknown != nil && f.treeUnknown(q.Kind, q.Disk, q.Offset+int64(i)*unit) {
			h = 0
		}
		out = binary.LittleEndian.AppendUint64(out, h)
	}
	w.Header().Set(wire.SumsKindHeader, q.Kind)
	w.Write(out)
}

func (f *fakeReplica) commit(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f.mu.Lock()
	vm, ok := f.vm(w, r)
	if !ok {
		f.mu.Unlock()
		return
	}
	name := r.PathValue("vm")
	staged := vm.staged[id]
	hdr, frames, err := readStream(staged)
	delete(vm.staged, id)
	if err == nil && (hdr.VM != name || !slices.Equal(hdr.Disks, vm.disks)) {
		err = errors.New("stream of another VM or disks")
	}
	if err != nil {
		f.mu.Unlock()
		writeErr(w, http.StatusUnprocessableEntity, wire.Error{Code: wire.CodeCorrupt, Message: err.Error()})
		return
	}
	for _, fr := range frames {
		if fr.Type == wire.FrameData {
			f.dataBytes[hdr.Kind] += fr.Length
		} else {
			f.zeroRanges[hdr.Kind]++
		}
	}
	switch hdr.Kind {
	case wire.KindCycle:
		if hdr.Cycle <= vm.applied {
			break
		}
		if h := vm.held; h != nil {
			if hdr.Cycle <= h.last {
				break // staged before: a repeated commit
			}
			if hdr.Prev != h.last || vm.sync != nil {
				f.mu.Unlock()
				writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeGap, Message: "cycle does not follow", Applied: vm.applied})
				return
			}
			h.frames = append(h.frames, frames...)
			h.headers = append(h.headers, hdr)
			h.last = hdr.Cycle
			if hdr.Cycle >= h.consistentAt {
				vm.apply(h.frames)
				vm.applied, vm.appliedAt = hdr.Cycle, time.Now()
				vm.state = "replicating"
				f.headers = append(f.headers, h.headers...)
				vm.held = nil
				f.checkRoots(vm, hdr)
			}
			break
		}
		if hdr.Prev != vm.applied || vm.sync != nil {
			f.mu.Unlock()
			writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeGap, Message: "cycle does not follow", Applied: vm.applied})
			return
		}
		vm.apply(frames)
		vm.applied, vm.appliedAt = hdr.Cycle, time.Now()
		f.headers = append(f.headers, hdr)
		f.checkRoots(vm, hdr)
	default:
		s := vm.sync
		if s == nil || s.Gen != hdr.Gen || s.Kind != hdr.Kind || hdr.Piece < 0 || hdr.Piece >= s.Pieces {
			f.mu.Unlock()
			writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeMismatch, Message: "no such sync piece"})
			return
		}
		if hdr.Kind == wire.KindFull {
			vm.apply(frames)
		} else {
			vm.pending = append(vm.pending, frames...)
			for _, fr := range frames {
				if fr.Type == wire.FrameData {
					f.resyncBlocks += fr.Length
				}
			}
		}
		if !slices.Contains(s.Done, hdr.Piece) {
			s.Done = append(s.Done, hdr.Piece)
			slices.Sort(s.Done)
		}
	}
	f.commits = append(f.commits, id)
	f.streamSize[id] = int64(len(staged))
	view := vm.view(name)
	after := f.afterCommit
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, view)
	if after != nil {
		after(id)
	}
}

func (f *fakeReplica) syncStart(w http.ResponseWriter, r *http.Request) {
	var s wire.SyncStart
	if err := json.NewDecoder(r.Body).Decode(&s); err != nil {
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	if vm.sync != nil && vm.sync.Gen == s.Gen {
		writeJSON(w, http.StatusOK, vm.sync)
		return
	}
	if s.PieceSize <= 0 || s.Pieces != wire.PieceCount(vm.disks, s.PieceSize) || (s.Kind != wire.KindFull && s.Kind != wire.KindResync) {
		writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeMismatch, Message: "bad sync"})
		return
	}
	vm.sync = &wire.SyncState{SyncStart: s, Done: []int64{}}
	vm.pending = nil
	vm.held = nil
	vm.state = "initial-copy"
	if s.Kind == wire.KindResync {
		vm.state = "resyncing"
	}
	writeJSON(w, http.StatusOK, vm.sync)
}

func (f *fakeReplica) sums(w http.ResponseWriter, r *http.Request) {
	var q wire.SumsRequest
	if err := json.NewDecoder(r.Body).Decode(&q); err != nil {
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	f.sumsKinds[q.Kind]++
	if f.treeSums == "old" {
		q.Kind = ""
	}
	if q.Disk < 0 || q.Disk >= len(vm.images) || q.BlockSize <= 0 || q.Offset < 0 || q.Offset+q.Length > vm.disks[q.Disk].Size {
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: "bad range"})
		return
	}
	if q.Kind != "" {
		if f.treeSums == "unavailable" {
			writeErr(w, http.StatusServiceUnavailable, wire.Error{Code: wire.CodeUnavailable, Message: "block tree being built"})
			return
		}
		f.treeAnswer(w, vm, q)
		return
	}
	if vm.sync == nil && vm.held == nil && vm.state == "replicating" {
		w.Header().Set(wire.SumsCycleHeader, strconv.FormatUint(vm.applied, 10))
	}
	img := vm.images[q.Disk]
	var out []byte
	for off := q.Offset; off < q.Offset+q.Length; off += q.BlockSize {
		sum := blake3.Sum256(img[off:min(off+q.BlockSize, int64(len(img)))])
		out = append(out, sum[:]...)
	}
	w.Write(out)
}

func (f *fakeReplica) syncFinish(w http.ResponseWriter, r *http.Request) {
	var s wire.SyncFinish
	if err := json.NewDecoder(r.Body).Decode(&s); err != nil {
		writeErr(w, http.StatusBadRequest, wire.Error{Code: wire.CodeBadReq, Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vm(w, r)
	if !ok {
		return
	}
	if vm.sync == nil || vm.sync.Gen != s.Gen || vm.sync.Base != s.Base || int64(len(vm.sync.Done)) != vm.sync.Pieces {
		writeErr(w, http.StatusConflict, wire.Error{Code: wire.CodeMismatch, Message: "sync not complete"})
		return
	}
	vm.diverged = nil
	if vm.sync.Kind == wire.KindResync && s.ConsistentAt > s.Base {
		// Held: the answer names the images' cycle, not the base.
		vm.held = &fakeHeld{consistentAt: s.ConsistentAt, last: s.Base, frames: vm.pending}
		vm.pending = nil
		vm.sync = nil
		writeJSON(w, http.StatusOK, vm.view(r.PathValue("vm")))
		return
	}
	vm.apply(vm.pending)
	vm.pending = nil
	vm.sync = nil
	vm.state = "replicating"
	vm.applied, vm.appliedAt = s.Base, time.Now()
	writeJSON(w, http.StatusOK, vm.view(r.PathValue("vm")))
}

// importOffline is `vdrepl replication import-initial VM DIR`.
func (f *fakeReplica) importOffline(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, wire.OfflineManifestFile))
	if err != nil {
		return err
	}
	var m wire.OfflineManifest
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	if m.Version != 1 || m.Pieces != wire.PieceCount(m.Disks, m.PieceSize) {
		return fmt.Errorf("bad manifest %+v", m)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vm := f.vms[m.VM]
	if vm == nil {
		vm = &fakeVM{primary: m.Primary, disks: m.Disks, staged: map[string][]byte{}}
		for _, d := range m.Disks {
			vm.images = append(vm.images, make([]byte, d.Size))
		}
		f.vms[m.VM] = vm
	}
	if vm.primary != m.Primary {
		return fmt.Errorf("manifest of primary %q for a VM of %q", m.Primary, vm.primary)
	}
	for p := int64(0); p < m.Pieces; p++ {
		b, err := os.ReadFile(filepath.Join(dir, wire.SyncUploadID(m.Gen, p)+".vdws"))
		if err != nil {
			return err
		}
		hdr, frames, err := readStream(b)
		if err != nil {
			return fmt.Errorf("piece %d: %w", p, err)
		}
		if hdr.Kind != wire.KindFull || hdr.Gen != m.Gen || hdr.Piece != p || hdr.VM != m.VM {
			return fmt.Errorf("piece %d: header %+v", p, hdr)
		}
		vm.apply(frames)
	}
	vm.sync, vm.state, vm.applied, vm.appliedAt = nil, "replicating", m.Base, time.Now()
	return nil
}

func (f *fakeReplica) image(vm string, disk int) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := f.vms[vm]
	if v == nil {
		return nil
	}
	return slices.Clone(v.images[disk])
}

func (f *fakeReplica) applied(vm string) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v := f.vms[vm]; v != nil {
		return v.applied
	}
	return 0
}

// proxy is a TCP relay in front of the fake replica that can cut the
// connection after a number of client bytes, or flip one byte on the way
// (below TLS, which must notice).
type proxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	budget  int64 // client bytes until the cut or flip; <0 off
	flip    bool  // at the budget flip a byte instead of cutting
	tripped int
	conns   []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, budget: -1}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

// down takes the replica off the network: the connections through the
// proxy are closed, and new ones refused.
func (p *proxy) down() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// arm cuts (or with flip, damages) the traffic after n more client bytes,
// once.
func (p *proxy) arm(n int64, flip bool) {
	p.mu.Lock()
	p.budget, p.flip = n, flip
	p.mu.Unlock()
}

func (p *proxy) trips() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tripped
}

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		go func() {
			io.Copy(c, s)
			c.Close()
		}()
		go p.upstream(c, s)
	}
}

func (p *proxy) upstream(c, s net.Conn) {
	defer s.Close()
	defer c.Close()
	buf := make([]byte, 16<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			b := buf[:n]
			p.mu.Lock()
			cut := false
			if p.budget >= 0 && int64(n) > p.budget {
				if p.flip {
					b[p.budget] ^= 0x01
				} else {
					b = b[:p.budget]
					cut = true
				}
				p.budget = -1
				p.tripped++
			} else if p.budget >= 0 {
				p.budget -= int64(n)
			}
			p.mu.Unlock()
			if _, werr := s.Write(b); werr != nil || cut {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
