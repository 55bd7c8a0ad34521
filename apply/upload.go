package apply

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// uploadID is a parsed upload id: "c<cycle>" or "s<gen>-<piece>".
type uploadID struct {
	id    string
	cycle uint64 // > 0 for a cycle
	gen   uint64 // > 0 for a sync piece
	piece int64
}

func (u uploadID) isCycle() bool { return u.cycle > 0 }

// parseUploadID accepts only the canonical forms the wire package makes, so
// an id is always a safe file name.
func parseUploadID(s string) (uploadID, error) {
	bad := fmt.Errorf("%w: upload id %q: want c<cycle> or s<generation>-<piece>", ErrInvalid, s)
	switch {
	case strings.HasPrefix(s, "c"):
		n, err := strconv.ParseUint(s[1:], 10, 64)
		if err != nil || n == 0 || wire.CycleUploadID(n) != s {
			return uploadID{}, bad
		}
		return uploadID{id: s, cycle: n}, nil
	case strings.HasPrefix(s, "s"):
		g, p, ok := strings.Cut(s[1:], "-")
		gen, err1 := strconv.ParseUint(g, 10, 64)
		piece, err2 := strconv.ParseInt(p, 10, 64)
		if !ok || err1 != nil || err2 != nil || gen == 0 || piece < 0 || wire.SyncUploadID(gen, piece) != s {
			return uploadID{}, bad
		}
		return uploadID{id: s, gen: gen, piece: piece}, nil
	}
	return uploadID{}, bad
}

// chunkBufs recycles chunk buffers (MaxChunk each, and a byte to tell a
// larger body), aligned for O_DIRECT.
var chunkBufs = sync.Pool{New: func() any { b := vfs.AlignedBuffer(wire.MaxChunk + vfs.DirectAlign)[:wire.MaxChunk+1]; return &b }}

// uploadOffset is how much of an upload is staged. A cycle whose commit
// got as far as its intent (the apply failed on I/O, or a commit whose
// primary went away still runs) is staged whole as c<N>.stream: its offset
// is that stream's size, so the primary sends nothing and commits it again,
// which finishes the apply (finishIntent).
func (v *vm) uploadOffset(u uploadID) (wire.Upload, error) {
	fi, err := v.s.fs.Stat(v.staged(u.id))
	if errors.Is(err, fs.ErrNotExist) && u.isCycle() && v.intends(u.cycle) {
		if fi, err := v.s.fs.Stat(v.stagedStream(u.id)); err == nil {
			return wire.Upload{ID: u.id, Offset: fi.Size()}, nil
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return wire.Upload{ID: u.id}, nil
	}
	if err != nil {
		return wire.Upload{}, fmt.Errorf("apply: staged upload: %w", err)
	}
	return wire.Upload{ID: u.id, Offset: fi.Size()}, nil
}

// intends reports whether the intent in replica.json applies cycle c.
func (v *vm) intends(c uint64) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	in := v.st.Intent
	if in == nil {
		return false
	}
	if in.Op == intentCycle {
		return in.Cycle == c
	}
	for _, hc := range in.Cycles {
		if hc.Cycle == c {
			return true
		}
	}
	return false
}

// checkSyncPiece: a sync piece belongs to the running sync.
func (v *vm) checkSyncPiece(u uploadID) error {
	v.mu.Lock()
	sync := v.st.Sync
	var gen uint64
	var pieces int64
	if sync != nil {
		gen, pieces = sync.Gen, sync.Pieces
	}
	v.mu.Unlock()
	if gen != u.gen {
		return fmt.Errorf("%w: upload %s: the replica runs sync generation %d", ErrMismatch, u.id, gen)
	}
	if u.piece >= pieces {
		return fmt.Errorf("%w: upload %s: sync generation %d has %d pieces", ErrInvalid, u.id, gen, pieces)
	}
	return nil
}

// putChunk appends one chunk to an upload. off must be what is staged so
// far; crc is the chunk's CRC32C. Nothing is stored unless the whole chunk
// arrived and matches its checksum. A whole chunk that does not is
// ErrChunkCRC ("corrupt"); one whose body stopped short, its connection
// closed or reset mid-body, is a cutError ("offset": resume), never taken
// for corruption.
//
// A primary may send the next chunk before the answer to the one before
// it came (two requests in flight, on two connections, the second with
// "Expect: 100-continue"). A chunk beyond what is staged waits, before its
// body is read (so before the primary sends it), until the chunks before
// it have been received, so that a connection broken under one costs that
// chunk alone; it is then received while those are checked and staged,
// and waits for them to be staged before it is checked against the staged
// offset (awaitTurn). A chunk below the offset, or one whose predecessor
// failed, is refused (409) before its body is read.
func (v *vm) putChunk(u uploadID, off int64, crc uint32, body io.Reader) (wire.Upload, error) {
	if !u.isCycle() {
		if err := v.checkSyncPiece(u); err != nil {
			return wire.Upload{}, err
		}
	}
	req := v.chunkArriving(u.id)
	defer v.chunkDone(u.id, req)
	if err := v.awaitTurn(u.id, off, req, false); err != nil {
		return wire.Upload{}, err
	}
	bp := chunkBufs.Get().(*[]byte)
	defer chunkBufs.Put(bp)
	n, got, err := readChunk(body, *bp)
	v.chunkReceived(req)
	switch {
	case err == nil:
		return wire.Upload{}, fmt.Errorf("%w: chunk larger than %d bytes", ErrTooLarge, wire.MaxChunk)
	case err == io.EOF:
	case cutReason(err) != "":
		return wire.Upload{}, v.cut(u, off, n, err)
	default:
		return wire.Upload{}, fmt.Errorf("apply: read chunk: %w", err)
	}
	chunk := (*bp)[:n]
	if got != crc {
		return wire.Upload{}, fmt.Errorf("%w: upload %s at %d: CRC32C %08x, header says %08x", ErrChunkCRC, u.id, off, got, crc)
	}
	if err := v.awaitTurn(u.id, off, req, true); err != nil {
		return wire.Upload{}, err
	}
	unlock := v.lockUpload(u.id)
	defer unlock()
	fsys := v.s.fs
	if err := fsys.MkdirAll(join(v.dir, stagingDir), 0o700); err != nil {
		return wire.Upload{}, fmt.Errorf("apply: staging directory: %w", err)
	}
	name := v.staged(u.id)
	f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return wire.Upload{}, fmt.Errorf("apply: open staged upload: %w", err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return wire.Upload{}, fmt.Errorf("apply: staged upload: %w", err)
	}
	if off != size {
		return wire.Upload{}, &OffsetError{Offset: size, Got: off}
	}
	if err := stageChunk(f, chunk, off); err != nil {
		// Leave the staged length where it was, so the primary resumes
		// from a known offset (a failed write may have written part).
		f.Truncate(off)
		v.dropVerifier(u.id)
		return wire.Upload{}, fmt.Errorf("apply: stage chunk of %s: %w", u.id, err)
	}
	v.feedVerifier(u.id, off, chunk)
	req.staged = true
	return wire.Upload{ID: u.id, Offset: off + int64(n)}, nil
}

// chunkFlight counts the chunk requests of one upload being served, so a
// chunk that arrived early can wait for those before it.
type chunkFlight struct {
	n         int           // requests in flight
	receiving int           // of those, requests that have not read their body yet
	failed    int           // requests that ended without staging their chunk
	changed   chan struct{} // closed and replaced when the above change
}

// chunkReq is one chunk request in a chunkFlight.
type chunkReq struct {
	fl       *chunkFlight
	failed   int // fl.failed when it arrived
	received bool
	staged   bool
}

var flights = struct {
	mu sync.Mutex
	m  map[verifierKey]*chunkFlight
}{m: map[verifierKey]*chunkFlight{}}

func (fl *chunkFlight) notify() {
	close(fl.changed)
	fl.changed = make(chan struct{})
}

func (v *vm) chunkArriving(id string) *chunkReq {
	k := verifierKey{v, id}
	flights.mu.Lock()
	defer flights.mu.Unlock()
	fl := flights.m[k]
	if fl == nil {
		fl = &chunkFlight{changed: make(chan struct{})}
		flights.m[k] = fl
	}
	fl.n++
	fl.receiving++
	fl.notify()
	return &chunkReq{fl: fl, failed: fl.failed}
}

// chunkReceived: req's body was read (or failed to be).
func (v *vm) chunkReceived(req *chunkReq) {
	flights.mu.Lock()
	defer flights.mu.Unlock()
	if !req.received {
		req.received = true
		req.fl.receiving--
		req.fl.notify()
	}
}

func (v *vm) chunkDone(id string, req *chunkReq) {
	flights.mu.Lock()
	defer flights.mu.Unlock()
	fl := req.fl
	if !req.received {
		req.received = true
		fl.receiving--
	}
	if !req.staged {
		fl.failed++
	}
	if fl.n--; fl.n == 0 {
		delete(flights.m, verifierKey{v, id})
	}
	fl.notify()
}

// chunkWait bounds how long a chunk that came early waits for those before
// it while they are being received; earlyWait how long it waits for one
// before it to arrive at all (the primary sends them in order, but on two
// connections, so the later one may be here first).
const (
	chunkWait = time.Minute
	earlyWait = 2 * time.Second
)

// awaitTurn returns once the chunk of req at off may go on, or fails with
// an OffsetError. Before its body is read (received false) it may go on
// when off is the staged offset, or when the requests before it have all
// read their bodies; after (received true), when off is the staged
// offset. It fails at once when off is below the staged offset or a
// request of the upload failed since req arrived; when none came before
// it within earlyWait; and after chunkWait in all.
func (v *vm) awaitTurn(id string, off int64, req *chunkReq, received bool) error {
	var deadline, early <-chan time.Time
	for {
		flights.mu.Lock()
		fl := req.fl
		others, receiving, failed, changed := fl.n-1, fl.receiving, fl.failed > req.failed, fl.changed
		if !req.received {
			receiving-- // not counting itself
		}
		flights.mu.Unlock()
		up, err := v.uploadOffset(uploadID{id: id})
		if err != nil {
			return err
		}
		switch {
		case off == up.Offset:
			return nil
		case off < up.Offset, failed:
			return &OffsetError{Offset: up.Offset, Got: off}
		case !received && others > 0 && receiving == 0:
			return nil // receive it while those before it are staged
		}
		if deadline == nil {
			t := time.NewTimer(chunkWait)
			defer t.Stop()
			deadline = t.C
		}
		early = nil
		if others == 0 {
			t := time.NewTimer(earlyWait)
			defer t.Stop()
			early = t.C
		}
		select {
		case <-changed:
		case <-early:
			return &OffsetError{Offset: up.Offset, Got: off}
		case <-deadline:
			return &OffsetError{Offset: up.Offset, Got: off}
		}
	}
}

// stageChunk writes chunk at off of a staged upload: whole blocks at a
// block offset (every chunk but a stream's last, as the primary sends them)
// with O_DIRECT where the file offers it, so the bytes do not pass
// through the page cache on their way to the disk (on a replica at full
// speed that copy was a third of its CPU time); the commit's fsync makes
// them durable like buffered ones.
func stageChunk(f vfs.File, chunk []byte, off int64) error {
	if dw, ok := f.(vfs.DirectWriter); ok && len(chunk) > 0 && len(chunk)%vfs.DirectAlign == 0 && off%vfs.DirectAlign == 0 {
		_, err := dw.WriteDirectAt(chunk, off)
		return err
	}
	_, err := f.WriteAt(chunk, off)
	return err
}

// Verify as staged: every upload this process staged from its first byte
// has a wire.Verifier that checks the chunks as they are written (frame
// CRCs, zstd frames, counts, the BLAKE3 end hash), so a commit need not
// read the whole staged file back to verify it. The verifier covers the
// bytes exactly as they were written to the file; the upload's lock
// serialises its chunks, discards and commit, and a restart (which may
// leave a staged file this process did not write) starts without
// verifiers, so such a commit reads the file and verifies it as before.
// Memory: one frame (MaxStored) per upload being received, at most
// maxVerifiers of them.
const maxVerifiers = 64

type verifierKey struct {
	v  *vm
	id string
}

var verifiers = struct {
	mu sync.Mutex
	m  map[verifierKey]*wire.Verifier
}{m: map[verifierKey]*wire.Verifier{}}

// feedVerifier checks chunk, just staged at off of upload id: a chunk at 0
// starts a new verifier, one that does not follow what the verifier saw
// drops it, and so does one that fails (the commit then verifies the file
// and reports what is wrong). The caller holds the upload's lock.
func (v *vm) feedVerifier(id string, off int64, chunk []byte) {
	key := verifierKey{v, id}
	verifiers.mu.Lock()
	sv := verifiers.m[key]
	if off == 0 {
		if sv == nil && len(verifiers.m) >= maxVerifiers {
			for k := range verifiers.m { // make room: that upload is verified at commit
				delete(verifiers.m, k)
				break
			}
		}
		sv = wire.NewVerifier()
		verifiers.m[key] = sv
	}
	verifiers.mu.Unlock()
	if sv == nil {
		return
	}
	if sv.Written() != off {
		v.dropVerifier(id)
		return
	}
	if _, err := sv.Write(chunk); err != nil {
		v.dropVerifier(id)
	}
}

func (v *vm) dropVerifier(id string) {
	verifiers.mu.Lock()
	delete(verifiers.m, verifierKey{v, id})
	verifiers.mu.Unlock()
}

// verifyStaged verifies staged upload id in file name like verifyStream:
// from its verifier when that saw every byte of the file and the whole
// stream verified, else by reading the file. The caller holds the upload's
// lock.
func (v *vm) verifyStaged(id, name string, check func(wire.Header) error) (wire.Header, error) {
	verifiers.mu.Lock()
	sv := verifiers.m[verifierKey{v, id}]
	verifiers.mu.Unlock()
	if sv != nil {
		fi, err := v.s.fs.Stat(name)
		if err == nil && fi.Size() == sv.Written() {
			if h, err := sv.Done(); err == nil {
				return h, check(h)
			}
		}
	}
	return v.verifyStream(name, check)
}

// discard drops an upload.
func (v *vm) discard(u uploadID) error {
	unlock := v.lockUpload(u.id)
	defer unlock()
	v.dropVerifier(u.id)
	if err := v.s.fs.Remove(v.staged(u.id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("apply: discard upload: %w", err)
	}
	return nil
}

// removeStaged removes a staged file that is no longer needed. A failure
// only leaves a file that recovery or the next upload tidies.
func (v *vm) removeStaged(name string) {
	if err := v.s.fs.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		v.s.log.Warn("remove staged file", "vm", v.name, "path", name, "err", err)
	}
}

// dropStaleParts removes the uploads of cycles at or below applied. A cycle
// uploaded ahead whose commit never came (the primary met a gap and resynced
// past it, or crashed mid-upload and then resynced) would otherwise stay in
// staging for good; a repeated commit of an applied cycle needs no data.
// An upload's lock is not taken: the caller may hold v.apply, which a commit
// takes inside its upload's lock, and a chunk still being written to the
// removed file only lands in an unlinked file of a cycle that is done.
func (v *vm) dropStaleParts(applied uint64) {
	staging := join(v.dir, stagingDir)
	names, err := v.s.fs.ReadDir(staging)
	if err != nil {
		return
	}
	for _, n := range names {
		id, ok := strings.CutSuffix(n, partExt)
		if u, err := parseUploadID(id); ok && err == nil && u.isCycle() && u.cycle <= applied {
			v.dropVerifier(id)
			v.removeStaged(join(staging, n))
		}
	}
}

// corrupt discards an upload that failed verification.
func (v *vm) corrupt(u uploadID, err error) error {
	v.dropVerifier(u.id)
	v.removeStaged(v.staged(u.id))
	v.s.log.Warn("corrupt upload discarded", "vm", v.name, "upload", u.id, "err", err)
	if f := v.s.ev.Corrupt; f != nil {
		f(v.name, u.id, err)
	}
	return err
}

// commit verifies an upload, makes it durable and applies it (see the
// package documentation).
func (v *vm) commit(u uploadID) (wire.Replica, error) {
	v.apply.Lock()
	defer v.apply.Unlock()
	unlock := v.lockUpload(u.id)
	defer unlock()
	if err := v.finishIntent(true); err != nil {
		return wire.Replica{}, err
	}
	var err error
	if u.isCycle() {
		err = v.commitCycle(u)
	} else {
		err = v.commitPiece(u)
	}
	return v.replica(), err
}

func (v *vm) commitCycle(u uploadID) error {
	cur := v.snapshot()
	applied := cur.Applied
	if cur.Held != nil {
		applied = cur.Held.last() // cycles follow the held resync's base
	}
	part := v.staged(u.id)
	if u.cycle <= applied {
		v.dropVerifier(u.id)
		v.removeStaged(part) // a retry of a commit that succeeded
		return nil
	}
	if err := syncFile(v, part); err != nil {
		return err
	}
	h, err := v.verifyStaged(u.id, part, func(h wire.Header) error {
		if err := v.checkHeader(h, wire.KindCycle); err != nil {
			return err
		}
		if h.Cycle != u.cycle {
			return fmt.Errorf("%w: upload %s holds cycle %d", ErrMismatch, u.id, h.Cycle)
		}
		// Prev is normally Cycle-1; cycles folded into a sync make it
		// less (wire.Header), so the order is checked on Prev.
		if h.Prev != applied || h.Cycle <= h.Prev {
			return &GapError{Applied: applied, Cycle: h.Cycle, Prev: h.Prev}
		}
		return nil
	})
	var gap *GapError
	switch {
	case errors.As(err, &gap):
		return err // keep the upload: it may fit once the gap is filled
	case err != nil:
		return v.corrupt(u, err)
	}
	stream := v.stagedStream(u.id)
	v.dropVerifier(u.id) // the upload is a stream now (or, put back, verified again)
	if err := v.s.fs.Rename(part, stream); err != nil {
		return fmt.Errorf("apply: stage cycle %d: %w", u.cycle, err)
	}
	if err := v.s.fs.SyncDir(join(v.dir, stagingDir)); err != nil {
		v.s.fs.Rename(stream, part)
		return fmt.Errorf("apply: stage cycle %d: %w", u.cycle, err)
	}
	if held := cur.Held; held != nil {
		// Staged durably; applied with the resync once the cycle that
		// makes it exact is here too.
		err = v.update(func(st *replicaState) error {
			st.Held.Cycles = append(st.Held.Cycles, heldCycle{Cycle: u.cycle, Sealed: h.Sealed, App: h.AppConsistent, Point: h.Point})
			if u.cycle >= st.Held.ConsistentAt {
				st.Intent = &intent{Op: intentResync, Gen: st.Held.Gen, Base: st.Held.Base,
					ConsistentAt: st.Held.ConsistentAt, Cycles: append([]heldCycle(nil), st.Held.Cycles...)}
			}
			return nil
		})
		if err != nil {
			v.s.fs.Rename(stream, part)
			return err
		}
		return v.finishIntent(false)
	}
	err = v.update(func(st *replicaState) error {
		st.Intent = &intent{Op: intentCycle, Cycle: u.cycle, Sealed: h.Sealed, App: h.AppConsistent, Point: h.Point}
		return nil
	})
	if err != nil {
		// Nothing was applied: put the upload back, so a retried commit
		// finds it.
		v.s.fs.Rename(stream, part)
		return err
	}
	return v.finishIntent(false)
}

func (v *vm) exists(name string) bool {
	ok, _ := v.present(name)
	return ok
}

// present tells whether a file exists; an error is one other than its
// absence.
func (v *vm) present(name string) (bool, error) {
	_, err := v.s.fs.Stat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("apply: %w", err)
	}
	return true, nil
}

// syncFile makes a staged upload durable before it is verified.
func syncFile(v *vm, name string) error {
	f, err := v.s.fs.OpenFile(name, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // verification says what is missing
	}
	if err != nil {
		return fmt.Errorf("apply: open staged upload: %w", err)
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("apply: sync staged upload %s: %w", name, err)
	}
	return nil
}

// finishIntent carries out the apply recorded in replica.json, if any, and
// clears it. recovering: the apply was interrupted (a crash, or an error
// earlier), so the staged streams are verified again before anything is
// written. The caller holds v.apply.
func (v *vm) finishIntent(recovering bool) error {
	st := v.snapshot()
	in := st.Intent
	if in == nil {
		return nil
	}
	var streams []string
	switch in.Op {
	case intentCycle:
		streams = []string{v.stagedStream(wire.CycleUploadID(in.Cycle))}
		ok, err := v.present(streams[0])
		if err != nil {
			return err
		}
		if !ok {
			// The stream is removed only after applied=N is durable, so
			// an intent without it is one whose write failed and was
			// undone in memory (the stream went back to being an upload)
			// but reached the disk: the images were never touched.
			v.s.log.Warn("apply intent without its stream: the apply never began", "vm", v.name, "intent", in.String())
			return v.update(func(st *replicaState) error {
				st.Intent = nil
				return nil
			})
		}
	case intentResync:
		if st.Sync == nil || st.Sync.Gen != in.Gen {
			return fmt.Errorf("%w: %s: resync intent for generation %d without that sync", ErrState, join(v.dir, stateFile), in.Gen)
		}
		for p := int64(0); p < st.Sync.Pieces; p++ {
			streams = append(streams, v.syncPiece(in.Gen, p))
		}
		for _, hc := range in.Cycles {
			streams = append(streams, v.stagedStream(wire.CycleUploadID(hc.Cycle)))
		}
	default:
		return fmt.Errorf("%w: %s: unknown intent %q", ErrState, join(v.dir, stateFile), in.Op)
	}
	if recovering {
		v.s.log.Info("finishing an interrupted apply", "vm", v.name, "intent", in.String())
		for _, name := range streams {
			if _, err := v.verifyStream(name, func(h wire.Header) error { return nil }); err != nil {
				if in.Op == intentCycle && errors.Is(err, ErrCorrupt) {
					v.dropDamagedCycle(in, streams[0], err)
					return nil // the primary sends the cycle again
				}
				return fmt.Errorf("apply: replica VM %q: cannot finish %s: %w", v.name, in, err)
			}
		}
	}
	last, err := v.applyFiles(streams...)
	if err != nil {
		if in.Op == intentCycle && errors.Is(err, ErrCorrupt) {
			return v.dropDamagedCycle(in, streams[0], err)
		}
		return err
	}
	next := v.snapshot()
	applied(&next, in)
	if err := v.recordCycles(&next, in); err != nil {
		return err
	}
	// The roots are compared only where the images are at the cycle's
	// barrier: the cycles after a sync up to ConsistentAt leave them
	// between two points of the primary's. Recovery redoes the check, as
	// the roots travel in the staged stream.
	var diverged []string
	checked, check := false, next.Consistent && last.Kind == wire.KindCycle && len(last.Roots) > 0
	if check {
		diverged, checked = v.checkRoots(last)
	}
	now := v.s.now().UTC()
	err = v.update(func(st *replicaState) error {
		applied(st, in)
		st.PointRoots = next.PointRoots // recordCycles noted the new point's
		if checked {
			noteRoots(st, last.Cycle, diverged, now)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if checked {
		v.reportRoots(last.Cycle, diverged)
	} else if check && v.tree != nil {
		// The tree is being built (after a crash, a failover, a new
		// VM): the check waits for it, if the images are still at
		// this cycle by then.
		v.pendingCheck = &last
	}
	switch in.Op {
	case intentCycle:
		v.removeStaged(streams[0])
		v.s.log.Info("cycle applied", "vm", v.name, "cycle", in.Cycle)
	case intentResync:
		if err := removeAll(v.s.fs, v.syncDir(in.Gen)); err != nil {
			v.s.log.Warn("remove applied resync pieces", "vm", v.name, "gen", in.Gen, "err", err)
		}
		for _, hc := range in.Cycles {
			v.removeStaged(v.stagedStream(wire.CycleUploadID(hc.Cycle)))
		}
		v.dropStaleParts(next.Applied)
		v.s.log.Info("resync applied", "vm", v.name, "gen", in.Gen, "base", in.Base)
	}
	if recovering {
		if f := v.s.ev.Recovered; f != nil {
			f(v.name, in.String())
		}
	}
	switch {
	case in.Op == intentCycle && v.s.ev.CycleApplied != nil:
		v.s.ev.CycleApplied(v.name, in.Cycle)
	case in.Op == intentResync && v.s.ev.SyncFinished != nil:
		v.s.ev.SyncFinished(v.name, in.Gen)
	}
	return nil
}

// dropDamagedCycle gives up a cycle intent whose staged stream was damaged
// at rest after it was verified (a frame fails its CRC while applied): the
// primary still has the cycle (it releases it only on our answer) and
// sends it again on the "corrupt" answer. The images may hold part of it,
// so the VM is marked not consistent until that cycle is applied;
// recovery points stay exact (their undo data was saved before any image
// write). Caller holds v.apply.
func (v *vm) dropDamagedCycle(in *intent, stream string, cause error) error {
	err := v.update(func(st *replicaState) error {
		st.Intent = nil
		st.Consistent = false
		st.ConsistentAt = max(st.ConsistentAt, in.Cycle)
		return nil
	})
	if err != nil {
		return err
	}
	v.removeStaged(stream)
	v.s.log.Error("staged cycle damaged at rest, dropped: the primary sends it again; the images are not consistent until then",
		"vm", v.name, "cycle", in.Cycle, "err", cause)
	if f := v.s.ev.Corrupt; f != nil {
		f(v.name, wire.CycleUploadID(in.Cycle), cause)
	}
	return fmt.Errorf("%w: cycle %d damaged in staging after it was received: %v", ErrCorrupt, in.Cycle, cause)
}

// applied is the state after intent in was carried out.
func applied(st *replicaState, in *intent) {
	switch in.Op {
	case intentCycle:
		st.Applied, st.AppliedAt = in.Cycle, in.Sealed
		if st.State == stateNew && !st.NeedsSync {
			st.State = stateReplicating
		}
		// After a sync the image is exact once the cycles that follow
		// it are applied; while one runs, it is not (wire.Replica).
		st.Consistent = st.State == stateReplicating && st.Applied >= st.ConsistentAt
	case intentResync:
		finishSync(st, in.Gen, in.Base, in.ConsistentAt)
		if n := len(in.Cycles); n > 0 {
			last := in.Cycles[n-1]
			st.Applied, st.AppliedAt = last.Cycle, last.Sealed
			st.Consistent = st.Applied >= st.ConsistentAt
		}
		st.Held = nil
	}
	st.Intent = nil
}

// finishSync is the state after a sync of generation gen completed: the
// images follow cycle base.
func finishSync(st *replicaState, gen, base, consistentAt uint64) {
	st.Applied, st.AppliedAt = base, time.Time{}
	st.State = stateReplicating
	// The pieces were read from the primary while its guest kept writing,
	// so the images hold a mix of the disks as they were at Base and
	// later. The cycles after Base carry every write since Base's barrier;
	// once those up to ConsistentAt (sealed after the last piece was read)
	// are applied, the images equal the primary's at that barrier.
	st.Consistent = false
	st.ConsistentAt = max(consistentAt, base+1)
	st.NeedsSync = false
	st.Sync = nil
	st.LastSync = gen
	// The sync rewrote whatever differed: a divergence found before is
	// repaired (the cycles that follow check it again).
	st.Diverged = nil
}

// noteRoots records the outcome of the root check of cycle: verified, or
// diverged on disks. A divergence already recorded keeps its cycle and
// time (when the replica was first found different) and gains the disks.
func noteRoots(st *replicaState, cycle uint64, disks []string, now time.Time) {
	if len(disks) == 0 {
		st.Verified = cycle
		return
	}
	if st.Diverged == nil {
		st.Diverged = &wire.Divergence{Cycle: cycle, Disks: slices.Clone(disks), At: now}
		return
	}
	for _, d := range disks {
		if !slices.Contains(st.Diverged.Disks, d) {
			st.Diverged.Disks = append(st.Diverged.Disks, d)
		}
	}
}

func (v *vm) commitPiece(u uploadID) error {
	st := v.snapshot()
	if err := v.checkSyncPiece(u); err != nil {
		return err
	}
	part := v.staged(u.id)
	if st.Sync.isDone(u.piece) {
		v.dropVerifier(u.id)
		v.removeStaged(part) // a retry of a commit that succeeded
		return nil
	}
	kind := st.Sync.Kind
	src, staged := part, false
	if kind == wire.KindResync && !v.exists(part) && v.exists(v.syncPiece(u.gen, u.piece)) {
		// A commit that failed after the piece was moved into the sync
		// directory: only marking it done is left.
		src, staged = v.syncPiece(u.gen, u.piece), true
	}
	if err := syncFile(v, src); err != nil {
		return err
	}
	verify := v.verifyStream
	if !staged {
		verify = func(name string, check func(wire.Header) error) (wire.Header, error) {
			return v.verifyStaged(u.id, name, check)
		}
	}
	_, err := verify(src, func(h wire.Header) error {
		if err := v.checkHeader(h, kind); err != nil {
			return err
		}
		if h.Gen != u.gen || h.Piece != u.piece {
			return fmt.Errorf("%w: upload %s holds piece %d of generation %d", ErrMismatch, u.id, h.Piece, h.Gen)
		}
		return nil
	})
	if err != nil {
		if staged {
			v.removeStaged(src)
		}
		return v.corrupt(u, err)
	}
	v.dropVerifier(u.id)
	switch {
	case staged:
	case kind == wire.KindFull:
		// An initial copy has no consistent point to keep: write the
		// piece straight to the images.
		if _, err := v.applyFiles(part); err != nil {
			return err
		}
	default:
		// A resync must leave the images at their last consistent point
		// until every piece is here: keep the piece for finish.
		dir := v.syncDir(u.gen)
		if err := v.s.fs.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("apply: sync directory: %w", err)
		}
		if err := v.s.fs.Rename(part, v.syncPiece(u.gen, u.piece)); err != nil {
			return fmt.Errorf("apply: stage piece %s: %w", u.id, err)
		}
		if err := v.s.fs.SyncDir(dir); err != nil {
			return fmt.Errorf("apply: stage piece %s: %w", u.id, err)
		}
		if err := v.s.fs.SyncDir(join(v.dir, stagingDir)); err != nil {
			return fmt.Errorf("apply: stage piece %s: %w", u.id, err)
		}
	}
	err = v.update(func(st *replicaState) error {
		st.Sync.markDone(u.piece)
		return nil
	})
	if err != nil {
		return err
	}
	if kind == wire.KindFull {
		v.removeStaged(part)
	}
	return nil
}
