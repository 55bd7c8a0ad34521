package apply

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"lukechampine.com/blake3"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// Limits of sync requests.
const (
	maxPieces     = 1 << 20
	maxPieceSize  = 1 << 40
	maxSumsLength = 256 << 20 // bounds the disk bytes one sums request reads
	minSumsBlock  = 4 << 10
	maxSumsBlock  = 16 << 20
)

// syncStart begins a sync, or resumes the one of the same generation.
func (v *vm) syncStart(req wire.SyncStart) (wire.SyncState, error) {
	if req.Kind != wire.KindFull && req.Kind != wire.KindResync {
		return wire.SyncState{}, fmt.Errorf("%w: sync kind %q: want %q or %q", ErrInvalid, req.Kind, wire.KindFull, wire.KindResync)
	}
	if req.Gen == 0 || req.PieceSize <= 0 || req.PieceSize > maxPieceSize || req.Pieces <= 0 || req.Pieces > maxPieces {
		return wire.SyncState{}, fmt.Errorf("%w: sync generation %d, %d pieces of %d bytes", ErrInvalid, req.Gen, req.Pieces, req.PieceSize)
	}
	if n := wire.PieceCount(v.disks, req.PieceSize); n != req.Pieces {
		return wire.SyncState{}, fmt.Errorf("%w: the replica's disks make %d pieces of %d bytes, not %d", ErrMismatch, n, req.PieceSize, req.Pieces)
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.finishIntent(true); err != nil {
		return wire.SyncState{}, err
	}
	st := v.snapshot()
	if st.Sync != nil && st.Sync.Gen == req.Gen {
		if st.Sync.SyncStart != req {
			return wire.SyncState{}, fmt.Errorf("%w: sync generation %d runs as %+v, not %+v", ErrMismatch, req.Gen, st.Sync.SyncStart, req)
		}
		return *st.Sync.wire(), nil
	}
	if st.Sync == nil && st.LastSync == req.Gen {
		return wire.SyncState{}, fmt.Errorf("%w: sync generation %d already finished", ErrMismatch, req.Gen)
	}
	if req.Kind == wire.KindResync {
		if err := v.s.fs.MkdirAll(v.syncDir(req.Gen), 0o700); err != nil {
			return wire.SyncState{}, fmt.Errorf("apply: sync directory: %w", err)
		}
		for _, d := range []string{join(v.dir, syncDir), v.dir} {
			if err := v.s.fs.SyncDir(d); err != nil {
				return wire.SyncState{}, fmt.Errorf("apply: sync directory: %w", err)
			}
		}
	}
	old := st.Sync
	err := v.update(func(st *replicaState) error {
		st.Sync = &syncRecord{SyncStart: req, Done: [][2]int64{}, Started: v.s.now().UTC()}
		st.State = stateInitialCopy
		if req.Kind == wire.KindResync {
			// The images stay at their last consistent point until the
			// resync is applied, all at once.
			st.State = stateResyncing
		} else {
			st.Consistent = false
		}
		st.Held = nil
		return nil
	})
	if err != nil {
		return wire.SyncState{}, err
	}
	if old != nil {
		v.dropSync(old.Gen)
	}
	if held := st.Held; held != nil {
		for _, hc := range held.Cycles {
			v.removeStaged(v.stagedStream(wire.CycleUploadID(hc.Cycle)))
		}
	}
	v.s.log.Info("sync started", "vm", v.name, "gen", req.Gen, "kind", req.Kind, "base", req.Base, "pieces", req.Pieces)
	return *v.snapshot().Sync.wire(), nil
}

// dropSync removes what an abandoned sync generation staged. A failure
// leaves files that recovery removes.
func (v *vm) dropSync(gen uint64) {
	if err := removeAll(v.s.fs, v.syncDir(gen)); err != nil {
		v.s.log.Warn("remove abandoned sync pieces", "vm", v.name, "gen", gen, "err", err)
	}
	names, err := v.s.fs.ReadDir(join(v.dir, stagingDir))
	if err != nil {
		return
	}
	for _, n := range names {
		id, ok := strings.CutSuffix(n, partExt)
		if u, err := parseUploadID(id); ok && err == nil && u.gen == gen {
			v.removeStaged(join(v.dir, stagingDir, n))
		}
	}
}

// syncFinish completes a sync whose pieces are all committed.
func (v *vm) syncFinish(req wire.SyncFinish) (wire.Replica, error) {
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.finishIntent(true); err != nil {
		return wire.Replica{}, err
	}
	st := v.snapshot()
	if st.Sync == nil {
		if req.Gen != 0 && st.LastSync == req.Gen {
			return v.replica(), nil // a repeated finish
		}
		return wire.Replica{}, fmt.Errorf("%w: no sync of generation %d runs", ErrMismatch, req.Gen)
	}
	if st.Sync.Gen != req.Gen {
		return wire.Replica{}, fmt.Errorf("%w: the replica runs sync generation %d, not %d", ErrMismatch, st.Sync.Gen, req.Gen)
	}
	if req.Base != st.Sync.Base {
		return wire.Replica{}, fmt.Errorf("%w: sync generation %d began at cycle %d, not %d", ErrMismatch, req.Gen, st.Sync.Base, req.Base)
	}
	if missing := st.Sync.Pieces - st.Sync.doneCount(); missing > 0 {
		return wire.Replica{}, fmt.Errorf("%w: sync generation %d: %d of %d pieces missing", ErrMismatch, req.Gen, missing, st.Sync.Pieces)
	}
	if st.Sync.Kind == wire.KindFull {
		// Every piece is already in the images, synced.
		if err := v.update(func(st *replicaState) error {
			finishSync(st, req.Gen, req.Base, req.ConsistentAt)
			return nil
		}); err != nil {
			return wire.Replica{}, err
		}
		v.dropStaleParts(req.Base)
		v.s.log.Info("initial copy finished", "vm", v.name, "gen", req.Gen, "base", req.Base)
		if f := v.s.ev.SyncFinished; f != nil {
			f(v.name, req.Gen)
		}
		return v.replica(), nil
	}
	// Check every staged piece before the first is applied: the images
	// must not leave their consistent point for a resync that cannot end.
	for p := int64(0); p < st.Sync.Pieces; p++ {
		_, err := v.verifyStream(v.syncPiece(req.Gen, p), func(h wire.Header) error { return nil })
		if errors.Is(err, ErrCorrupt) {
			// Lost or damaged since its commit: take it off the done
			// list, so the primary's resume sends it again.
			v.s.log.Warn("staged resync piece lost", "vm", v.name, "gen", req.Gen, "piece", p, "err", err)
			if uerr := v.update(func(st *replicaState) error {
				st.Sync.unmark(p)
				return nil
			}); uerr != nil {
				return wire.Replica{}, uerr
			}
			return wire.Replica{}, fmt.Errorf("%w: sync generation %d: staged piece %d was lost (%v); resume the sync", ErrMismatch, req.Gen, p, err)
		}
		if err != nil {
			return wire.Replica{}, err
		}
	}
	if req.ConsistentAt > req.Base {
		// Hold the pieces until the cycles up to ConsistentAt are staged
		// too; then all of it is applied at once (commitCycle).
		if st.Held == nil {
			err := v.update(func(st *replicaState) error {
				st.Held = &heldResync{Gen: req.Gen, Base: req.Base, ConsistentAt: req.ConsistentAt}
				return nil
			})
			if err != nil {
				return wire.Replica{}, err
			}
			v.s.log.Info("resync pieces held until the cycle that makes them exact", "vm", v.name, "gen", req.Gen, "base", req.Base, "consistent_at", req.ConsistentAt)
		}
		return v.replica(), nil
	}
	err := v.update(func(st *replicaState) error {
		st.Intent = &intent{Op: intentResync, Gen: req.Gen, Base: req.Base, ConsistentAt: req.ConsistentAt}
		return nil
	})
	if err != nil {
		return wire.Replica{}, err
	}
	if err := v.finishIntent(false); err != nil {
		return wire.Replica{}, err
	}
	return v.replica(), nil
}

// unmark takes piece p off the done list.
func (r *syncRecord) unmark(p int64) {
	var out [][2]int64
	for _, d := range r.Done {
		if p < d[0] || p >= d[1] {
			out = append(out, d)
			continue
		}
		if d[0] < p {
			out = append(out, [2]int64{d[0], p})
		}
		if p+1 < d[1] {
			out = append(out, [2]int64{p + 1, d[1]})
		}
	}
	r.Done = out
}

// sums answers a SumsRequest: the BLAKE3-256 of each block of the range of
// the replica image. A block is cut at the end of the range and at the end
// of the disk (past it, it is empty). at is the applied cycle the images
// were at while they were hashed, 0 when they are not at one (imagesAt).
//
// A request with a Kind is answered from the block tree instead
// (treeSums).
func (v *vm) sums(req wire.SumsRequest) (sums []byte, at uint64, err error) {
	if req.Kind != "" {
		return v.treeSums(req)
	}
	if req.Disk < 0 || req.Disk >= len(v.disks) {
		return nil, 0, fmt.Errorf("%w: disk %d: the VM has %d", ErrInvalid, req.Disk, len(v.disks))
	}
	bs := req.BlockSize
	if bs < minSumsBlock || bs > maxSumsBlock || bs&(bs-1) != 0 {
		return nil, 0, fmt.Errorf("%w: block size %d: want a power of two from %d to %d", ErrInvalid, bs, minSumsBlock, maxSumsBlock)
	}
	if req.Offset < 0 || req.Length <= 0 || req.Length > maxSumsLength || req.Offset > 1<<62 {
		return nil, 0, fmt.Errorf("%w: range [%d, +%d): want a length from 1 to %d bytes", ErrInvalid, req.Offset, req.Length, maxSumsLength)
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.finishIntent(true); err != nil {
		return nil, 0, err
	}
	// Images change only under v.apply, held until every block is hashed.
	at = imagesAt(v.snapshot())
	f, err := v.s.fs.OpenFile(v.image(req.Disk), os.O_RDONLY, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("apply: open image: %w", err)
	}
	defer f.Close()
	size := v.disks[req.Disk].Size
	end := req.Offset + req.Length
	out := make([]byte, 0, (req.Length+bs-1)/bs*wire.HashSize)
	buf := make([]byte, bs)
	for off := req.Offset; off < end; off += bs {
		n := max(0, min(off+bs, end, size)-off)
		if n > 0 {
			if m, err := f.ReadAt(buf[:n], off); err != nil && !(err == io.EOF && int64(m) == n) {
				return nil, 0, fmt.Errorf("apply: read image %s at %d: %w", f.Name(), off, err)
			}
		}
		sum := blake3.Sum256(buf[:n])
		out = append(out, sum[:]...)
	}
	return out, at, nil
}
