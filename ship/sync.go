package ship

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"lukechampine.com/blake3"
)

// DefaultBlockSize is the resync checksum block. BenchmarkResyncBlockSize
// (ship/blocksize_test.go) on the 2-CPU dev VM (AMD EPYC, one core hashing),
// for a 1 GiB disk with 1% of its 4 KiB blocks changed at random:
//
//	block    BLAKE3-256   hashes sent   changed data sent   total sent
//	4 KiB    221 MB/s     8.0 MiB        10.2 MiB            18.2 MiB
//	16 KiB   451 MB/s     2.0 MiB        40.3 MiB            42.3 MiB
//	64 KiB   885 MB/s     0.5 MiB       151.9 MiB           152.4 MiB
//	256 KiB  1241 MB/s    0.1 MiB       488.0 MiB           488.1 MiB
//
// The hash parallelises over 1 KiB chunks, so small blocks leave the SIMD
// lanes idle: hashing a GiB takes 4.9 s at 4 KiB, 2.4 s at 16 KiB (both
// ends hash every block). Hash time plus transfer per GiB, which is what a
// resync costs: at 100 Mbit/s 6.4 s (4K), 5.9 s (16K), 14.0 s (64K); at
// 1 Gbit/s 5.0 s, 2.7 s, 2.5 s; at 10 Mbit/s 20 s, 38 s, 129 s. 16 KiB is
// best or close to it from 100 Mbit/s up, and costs 2 MiB of hashes per GiB;
// on links much slower than 50 Mbit/s set BlockSize to 4 KiB.
const DefaultBlockSize = 16 << 10

// zeros is compared against to find zero blocks.
var zeros = make([]byte, wire.MaxFrameData)

func isZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }

// One /sums request covers at most maxSumBlocks blocks (a 512 KiB answer)
// and maxSumLength bytes of disk (what a replica reads for one answer).
const (
	maxSumBlocks = 16384
	maxSumLength = 256 << 20
)

// ErrSyncRunning is returned by WriteOffline when another initial copy or
// resync is under way.
var ErrSyncRunning = errors.New("ship: another sync is under way")

func syncWhat(kind string) string {
	if kind == wire.KindFull {
		return "initial copy"
	}
	return "resync"
}

// startSync begins a sync of kind: a barrier B from the journal (cycles up to
// B released, cycles after B kept), then a new generation in the state file.
// The replica hears of it in runSync.
func (s *Shipper) startSync(kind, reason, offline string) error {
	return s.startSyncFor(kind, reason, offline, nil)
}

// startSyncFor is startSync of the resync pending asks for (nil: none in
// particular): the divergence it repairs, how it compares.
func (s *Shipper) startSyncFor(kind, reason, offline string, pending *pendingResync) error {
	var div *wire.Divergence
	full := false
	if pending != nil {
		div, full = pending.Divergence, pending.FullCompare
	}
	info, err := s.j.BeginResync()
	if err != nil {
		return fmt.Errorf("ship: begin %s: %w", syncWhat(kind), err)
	}
	var rec syncRecord
	err = s.update(func(st *persisted) {
		// Generations count up from the clock, not from 1: the replica
		// refuses a generation it already finished, and a primary whose state
		// file was lost must not reuse one.
		st.Gen = max(st.Gen+1, uint64(s.now().Unix()))
		rec = syncRecord{
			Gen: st.Gen, Kind: kind, Base: info.Cycle, BaseSealed: info.Sealed,
			PieceSize: s.cfg.PieceSize, Pieces: wire.PieceCount(s.cfg.Disks, s.cfg.PieceSize),
			Offline: offline, Reason: reason, Started: s.now(), Divergence: div,
			FullCompare: full,
		}
		if kind == wire.KindResync {
			rec.BlockSize = s.cfg.BlockSize
		}
		st.Sync = &rec
		st.Resync = nil
	})
	s.log.Info("sync started", "kind", kind, "gen", rec.Gen, "base", rec.Base, "reason", reason)
	// Spools of an abandoned generation and of released cycles are dead.
	s.cleanSpools(rec.Gen)
	return err
}

// lostBase says whether the journal no longer keeps every cycle after the
// sync's base (it passed its cap, or another resync began): finishing the
// sync would then not make the replica complete.
func lostBase(js journal.Stats, rec *syncRecord) bool {
	return js.ResyncRequired || (js.ResyncBase != 0 && js.ResyncBase != rec.Base)
}

// runSync carries the sync under way forward: every piece the replica does
// not hold, then finish.
func (s *Shipper) runSync(ctx context.Context) (bool, time.Time, error) {
	s.mu.Lock()
	rec := s.st.Sync
	s.mu.Unlock()
	if rec.Offline != "" {
		return s.waitImport(ctx, rec)
	}
	if !rec.Finishing && lostBase(s.j.Stats(), rec) {
		// The cycles after the base are gone: start again. A resync keeps
		// whatever already reached the replica.
		s.log.Warn("journal lost the cycles after the sync base, starting again", "gen", rec.Gen, "base", rec.Base)
		return true, time.Time{}, s.startSync(wire.KindResync, "the journal passed its cap during the "+syncWhat(rec.Kind), "")
	}
	if rec.Finishing {
		rep, err := s.c.get(ctx)
		if err != nil {
			return false, time.Time{}, err
		}
		if err := s.noteReplica(rep); err != nil {
			return false, time.Time{}, err
		}
		if (rep.Sync == nil || rep.Sync.Gen != rec.Gen) && rep.Applied >= rec.Base {
			return true, time.Time{}, s.finishSync(rec, rep)
		}
	}
	state, err := s.c.syncStart(ctx, rec.start())
	if err != nil {
		return false, time.Time{}, err
	}
	if state.Gen != rec.Gen || state.Kind != rec.Kind || state.Base != rec.Base || state.PieceSize != rec.PieceSize || state.Pieces != rec.Pieces {
		return false, time.Time{}, fmt.Errorf("%w: replica runs sync %+v, we asked for %+v", ErrProtocol, state.SyncStart, rec.start())
	}
	done := make(map[int64]bool, len(state.Done))
	for _, p := range state.Done {
		done[p] = true
	}
	s.startProgress(rec, done)
	for p := int64(0); p < rec.Pieces; p++ {
		if done[p] {
			continue
		}
		if err := s.shipPiece(ctx, rec, p); err != nil {
			return false, time.Time{}, err
		}
		s.succeeded()
	}
	s.logRepairs(rec)
	consistentAt, err := s.sealConsistent()
	if err != nil {
		return false, time.Time{}, err
	}
	if err := s.update(func(st *persisted) {
		r := *st.Sync
		r.Finishing = true
		st.Sync = &r
	}); err != nil {
		return false, time.Time{}, err
	}
	rep, err := s.c.syncFinish(ctx, wire.SyncFinish{Gen: rec.Gen, Base: rec.Base, ConsistentAt: consistentAt})
	if err != nil {
		return false, time.Time{}, err
	}
	return true, time.Time{}, s.finishSync(rec, rep)
}

// sealConsistent seals the cycle that makes a sync exact, once per sync:
// every piece was read before its barrier, and every write since the base
// lies in a cycle up to it, so the replica equals the primary at its
// barrier once it applied it. Taking it here, after the reads, keeps that
// true even if another seal slipped in right after the base.
func (s *Shipper) sealConsistent() (uint64, error) {
	s.mu.Lock()
	c := s.st.Sync.ConsistentAt
	s.mu.Unlock()
	if c != 0 {
		return c, nil
	}
	info, err := s.j.Seal(0)
	if err != nil {
		return 0, fmt.Errorf("ship: seal after the last piece: %w", err)
	}
	err = s.update(func(st *persisted) {
		r := *st.Sync
		r.ConsistentAt = info.Cycle
		st.Sync = &r
	})
	return info.Cycle, err
}

// finishSync records a sync the replica finished: it follows cycle Base now.
// Applied moves only as far as rep, the replica's answer, says: a resync
// the replica holds is applied only with the commit of cycle ConsistentAt.
func (s *Shipper) finishSync(rec *syncRecord, rep wire.Replica) error {
	lost := lostBase(s.j.Stats(), rec)
	if err := s.j.EndResync(rec.Base); err != nil {
		return fmt.Errorf("ship: end %s: %w", syncWhat(rec.Kind), err)
	}
	at := s.now()
	applied, sealed := confirmedApplied(rec.Base, rec.BaseSealed, rep)
	s.mu.Lock()
	s.prog = progress{}
	s.polls = 0
	s.mu.Unlock()
	s.succeeded()
	err := s.update(func(st *persisted) {
		st.Sync = nil
		st.InitialDone = true
		if applied > st.Applied {
			st.Applied, st.AppliedSealed, st.AppliedAt = applied, sealed, at
		}
		if lost {
			st.Resync = &pendingResync{Reason: "the journal passed its cap during the " + syncWhat(rec.Kind), Manual: true}
		}
		if rec.Divergence != nil {
			st.Repaired = rec.Divergence
		}
	})
	s.log.Info("sync finished", "kind", rec.Kind, "gen", rec.Gen, "base", rec.Base)
	if err != nil {
		return err
	}
	return s.noteReplica(rep)
}

// shipPiece sends piece p of the sync and waits for its commit.
func (s *Shipper) shipPiece(ctx context.Context, rec *syncRecord, p int64) error {
	id := wire.SyncUploadID(rec.Gen, p)
	wd, off, n, ok := wire.PieceRange(s.cfg.Disks, rec.PieceSize, p)
	if !ok {
		return fmt.Errorf("ship: piece %d of %d", p, rec.Pieces)
	}
	sp, err := s.openSpool(id)
	if err != nil {
		return err
	}
	if sp == nil {
		h := wire.Header{VM: s.cfg.VM, Kind: rec.Kind, Disks: s.cfg.Disks, Gen: rec.Gen, Piece: p}
		var fill func(*wire.Writer) error
		if rec.Kind == wire.KindFull {
			fill = func(w *wire.Writer) error { return s.fillFull(ctx, w, wd, off, n) }
		} else {
			m, err := s.resyncMode(ctx, rec)
			if err != nil {
				return err
			}
			runs, why, err := s.treePiece(ctx, m, wd, off, n)
			if err != nil {
				return err
			}
			s.logPath(m, rec, why == "", why)
			if why == "" {
				for _, r := range runs {
					m.note(s, wd, r[0], r[1])
				}
				fill = func(w *wire.Writer) error { return s.fillRuns(ctx, w, wd, runs) }
			} else {
				sums, err := s.remoteSums(ctx, wd, off, n, rec.BlockSize)
				if err != nil {
					return err
				}
				note := func(from, to int64) { m.note(s, wd, from, to) }
				fill = func(w *wire.Writer) error { return s.fillResync(ctx, w, wd, off, n, rec.BlockSize, sums, note) }
			}
		}
		if sp, err = s.writeSpool(ctx, id, h, fill); err != nil {
			return fmt.Errorf("ship: piece %d: %w", p, err)
		}
	}
	_, err = s.upload(ctx, sp, []*Limiter{s.cfg.Limit, s.cfg.HostLimit, s.cfg.SyncLimit})
	if isCode(err, wire.CodeCorrupt) {
		s.removeSpool(sp) // written anew at the next attempt
		return err
	}
	if err != nil {
		sp.close()
		return err
	}
	s.removeSpool(sp)
	s.log.Debug("sync piece committed", "gen", rec.Gen, "piece", p, "bytes", sp.size, "data", sp.data)
	s.mu.Lock()
	s.st.Counters.SyncBytes += sp.size
	s.mu.Unlock()
	s.advance(n)
	return nil
}

// fillFull writes disk range [off, off+n) as data frames for its non-zero
// 4 KiB blocks and zero ranges for runs of zero blocks: a sparse disk costs
// next to nothing on the wire.
func (s *Shipper) fillFull(ctx context.Context, w *wire.Writer, wd int, off, n int64) error {
	return s.fillResync(ctx, w, wd, off, n, journal.BlockSize, nil, nil)
}

// same says whether blk hashes to sum.
func same(blk, sum []byte) bool {
	h := blake3.Sum256(blk)
	return bytes.Equal(h[:], sum)
}

// remoteSums asks the replica for the hashes of its blocks of a range.
func (s *Shipper) remoteSums(ctx context.Context, wd int, off, n, bs int64) ([]byte, error) {
	sums := make([]byte, 0, (n+bs-1)/bs*wire.HashSize)
	for pos := off; pos < off+n; {
		m := min(off+n-pos, maxSumBlocks*bs, maxSumLength)
		b, _, err := s.c.sumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: pos, Length: m, BlockSize: bs})
		if err != nil {
			return nil, err
		}
		sums = append(sums, b...)
		pos += m
	}
	return sums, nil
}

// fillResync writes the blocks of [off, off+n) whose BLAKE3-256 differs from
// the replica's (sums; nil: every block differs): data frames, or zero
// ranges for zero blocks. note, if set, hears of every block that differs
// from the sums.
func (s *Shipper) fillResync(ctx context.Context, w *wire.Writer, wd int, off, n, bs int64, sums []byte, note func(from, to int64)) error {
	jd := s.cfg.DiskIndex[wd]
	buf := make([]byte, min(n, max(bs, wire.MaxFrameData)))
	zeroAt := int64(-1)
	flushZero := func(end int64) error {
		if zeroAt < 0 {
			return nil
		}
		err := w.Range(wire.FrameZero, wd, zeroAt, end-zeroAt)
		zeroAt = -1
		return err
	}
	for pos := off; pos < off+n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := buf[:min(int64(len(buf)), off+n-pos)]
		if err := s.j.ReadAt(jd, p, pos); err != nil {
			return fmt.Errorf("ship: read disk %d at %d: %w", jd, pos, err)
		}
		s.mu.Lock()
		s.st.Counters.SyncReadBytes += int64(len(p))
		s.mu.Unlock()
		data := int64(-1)
		flushData := func(end int64) error {
			if data < 0 {
				return nil
			}
			err := w.Data(wd, pos+data, p[data:end])
			data = -1
			return err
		}
		for b := int64(0); b < int64(len(p)); b += bs {
			e := min(b+bs, int64(len(p)))
			blk := p[b:e]
			i := (pos + b - off) / bs * wire.HashSize
			if sums != nil && same(blk, sums[i:i+wire.HashSize]) {
				if err := flushData(b); err != nil {
					return err
				}
				if err := flushZero(pos + b); err != nil {
					return err
				}
				continue
			}
			if sums != nil && note != nil {
				note(pos+b, pos+e)
			}
			if isZero(blk) {
				if err := flushData(b); err != nil {
					return err
				}
				if zeroAt < 0 {
					zeroAt = pos + b
				}
				continue
			}
			if err := flushZero(pos + b); err != nil {
				return err
			}
			if data < 0 {
				data = b
			}
		}
		if err := flushData(int64(len(p))); err != nil {
			return err
		}
		pos += int64(len(p))
	}
	return flushZero(off + n)
}

// startProgress sets the progress figures of a sync from the pieces done.
func (s *Shipper) startProgress(rec *syncRecord, done map[int64]bool) {
	var total, have int64
	for p := int64(0); p < rec.Pieces; p++ {
		_, _, n, _ := wire.PieceRange(s.cfg.Disks, rec.PieceSize, p)
		total += n
		if done[p] {
			have += n
		}
	}
	s.mu.Lock()
	s.prog = progress{kind: rec.Kind, total: total, done: have, started: s.now(), startDone: have,
		pieces: rec.Pieces, doneCount: int64(len(done))}
	s.mu.Unlock()
	s.reportProgress()
}

// advance adds a piece of n disk bytes to the progress.
func (s *Shipper) advance(n int64) {
	s.mu.Lock()
	s.prog.done += n
	s.prog.doneCount++
	s.mu.Unlock()
	s.reportProgress()
}

func (s *Shipper) reportProgress() {
	s.mu.Lock()
	done, total := s.prog.done, s.prog.total
	s.signalLocked()
	s.mu.Unlock()
	if f := s.cfg.Progress; f != nil {
		f(done, total)
	}
}
