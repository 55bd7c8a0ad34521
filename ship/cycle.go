package ship

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// Cycles go through a two-stage pipeline: the replica answers a cycle's
// commit only once it has applied the cycle (apply/doc.go), which for a
// large cycle takes as long as its upload, so while the commit of cycle N
// is in flight the chunks of N+1 are sent; the replica stages them beside
// N while it applies N. N+1 is committed only after N's answer came, so
// commits stay strictly in order, and a cycle is released from the journal
// only after its own commit answered success. When N's commit fails, N+1
// stays staged on the replica and its upload resumes there (nothing is
// sent twice); when a resync or a pause becomes due, the pipeline drains
// (the commit in flight is answered) and the loop's step decides.

// cycleUpload is one cycle whose stream the replica holds whole, and its
// commit.
type cycleUpload struct {
	info  journal.CycleInfo
	size  int64     // stream bytes
	start time.Time // when its upload began
	// resent: the cycle is sent again after a commit answered "corrupt"
	resent bool
	// answered: rep and err hold the answer already (a cycle the replica
	// had applied); no commit is sent
	answered bool
	// recorded: a success was recorded (shipped) as soon as it came; err
	// is then shipped's error
	recorded bool
	// set before done is closed
	rep  wire.Replica
	err  error
	done chan struct{}
}

// shipCycles ships the closed cycles from first (the oldest the journal
// keeps) in order, each uploaded while the commit of the one before it is
// in flight, and releases each once the replica committed it. It returns
// when no cycle is left to upload once the commit in flight was answered,
// or when something else is due (nextCycle), always after that commit was
// answered and recorded.
func (s *Shipper) shipCycles(ctx context.Context, first journal.CycleInfo) error {
	var cur *cycleUpload // its commit is in flight
	// settle waits for the commit in flight and records its answer; it
	// fails with errNotNext when the cycle after it must not be committed.
	settle := func() error {
		if cur == nil {
			return nil
		}
		u := cur
		cur = nil
		<-u.done
		if err := s.committed(ctx, u); err != nil {
			return err
		}
		if !s.mayCommit(u.info.Cycle) {
			return errNotNext
		}
		return nil
	}
	next := first
	for {
		u, err := s.sendCycle(ctx, next)
		if serr := settle(); serr != nil {
			// next (if sent) stays staged on the replica and is resumed.
			return notNext(serr)
		}
		if err != nil {
			return notNext(err)
		}
		cur = u
		s.startCommit(ctx, u)
		info, ok := s.nextCycle(ctx, u)
		if !ok {
			return notNext(settle())
		}
		next = info
	}
}

// errNotNext: the cycle after the one just committed must not be committed
// now: it was not recorded applied (a "gap" answer made a resync due) or
// something else is due; the loop's step decides what comes next.
var errNotNext = errors.New("ship: not the next cycle's turn")

func notNext(err error) error {
	if errors.Is(err, errNotNext) {
		return nil
	}
	return err
}

// mayCommit says whether the cycle after c may be committed now that c's
// commit was answered: c is recorded as applied and no resync is due.
func (s *Shipper) mayCommit(c uint64) bool {
	js := s.j.Stats()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Applied >= c && s.st.Resync == nil && s.st.Sync == nil && !js.ResyncRequired && js.ResyncBase == 0
}

// nextCycle returns the closed cycle to upload while u's commit is in
// flight: the one after u if the journal has it, else the first one sealed
// before u's commit is answered. ok is false when the commit was answered
// first, or when something else is due: a resync, a pause or stop (ctx).
func (s *Shipper) nextCycle(ctx context.Context, u *cycleUpload) (info journal.CycleInfo, ok bool) {
	for {
		js := s.j.Stats()
		s.mu.Lock()
		ch := s.changed
		due := s.st.Resync != nil || s.st.Sync != nil || s.st.Paused || s.closed || js.ResyncRequired || js.ResyncBase != 0
		s.mu.Unlock()
		if due || ctx.Err() != nil {
			return journal.CycleInfo{}, false
		}
		for _, c := range s.j.Cycles() {
			if c.Cycle > u.info.Cycle {
				return c, true
			}
		}
		select {
		case <-u.done:
			return journal.CycleInfo{}, false
		case <-ch: // a cycle sealed, or the state changed
		case <-ctx.Done():
			return journal.CycleInfo{}, false
		}
	}
}

// sendCycle uploads closed cycle info whole, resuming from what the
// replica staged, and returns it ready to commit. The stream is made while
// it is sent (stream.go).
func (s *Shipper) sendCycle(ctx context.Context, info journal.CycleInfo) (*cycleUpload, error) {
	id := wire.CycleUploadID(info.Cycle)
	u := &cycleUpload{info: info, start: s.now(), done: make(chan struct{})}
	lims := []*Limiter{s.cfg.Limit, s.cfg.HostLimit}
	if info.Cycle == s.unanswered {
		// Its last commit got no answer: the replica may have applied it
		// and dropped its upload, so ask before sending it again.
		rep, err := s.c.get(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.noteReplica(rep); err != nil {
			return nil, err
		}
		s.unanswered = 0
		if rep.Applied >= info.Cycle {
			u.rep, u.answered = rep, true
			close(u.done)
			return u, nil
		}
	}
	roots, err := s.cycleRoots(ctx, info.Cycle)
	if err != nil {
		return nil, err
	}
	h := wire.Header{
		VM: s.cfg.VM, Kind: wire.KindCycle, Disks: s.cfg.Disks,
		Cycle: info.Cycle, Prev: info.Cycle - 1,
		Sealed: info.Sealed, AppConsistent: info.AppConsistent, Point: info.Point,
		Roots: roots,
	}
	newSrc := func() *streamSource {
		return newStreamSource(ctx, h, s.cfg.Compress, s.chunk, func(ctx context.Context, w *wire.Writer) error {
			return s.fillCycle(ctx, w, info)
		})
	}
	if u.size, err = s.uploadStream(ctx, id, newSrc, lims); err != nil {
		return nil, err
	}
	return u, nil
}

// startCommit sends u's commit in the background; u.done is closed with
// the answer, a success recorded already (shipped).
func (s *Shipper) startCommit(ctx context.Context, u *cycleUpload) {
	if u.answered {
		return
	}
	s.mu.Lock()
	s.committing = u.info.Cycle
	s.mu.Unlock()
	go func() {
		defer close(u.done)
		u.rep, u.err = s.c.commit(ctx, wire.CycleUploadID(u.info.Cycle))
		if u.err == nil {
			// Record it now, not once the loop is done uploading the
			// next cycle: Sync, the lag and the journal's space wait for
			// it.
			u.err, u.recorded = s.shipped(u.info, u.rep, u.size, s.now().Sub(u.start)), true
			if u.err == nil {
				u.err = s.noteReplica(u.rep)
			}
		}
		s.mu.Lock()
		s.committing = 0
		s.mu.Unlock()
	}()
}

// committed records the answer to u's commit: the cycle is released, sent
// once more when the replica found it corrupt (then an error if it does
// again), or the error is returned.
func (s *Shipper) committed(ctx context.Context, u *cycleUpload) error {
	err := u.err
	if u.recorded {
		return err
	}
	switch {
	case isCode(err, wire.CodeCorrupt) && !u.resent:
		// The replica discarded the stream; make it anew and send it
		// once more before backing off.
		s.log.Warn("replica rejected cycle as corrupt, sending it again", "cycle", u.info.Cycle, "err", err)
		again, err := s.sendCycle(ctx, u.info)
		if err != nil {
			return err
		}
		again.resent = true
		s.startCommit(ctx, again)
		<-again.done
		return s.committed(ctx, again)
	case isCode(err, wire.CodeCorrupt):
		return err
	case isCode(err, wire.CodeGap):
		return s.gap(u.info, err)
	case err != nil && code(err) == "":
		// No answer (the connection broke, a pause or stop cut the
		// request short): the replica may apply the cycle all the same.
		s.unanswered = u.info.Cycle
		return err
	case err != nil:
		return err
	}
	return s.shipped(u.info, u.rep, u.size, s.now().Sub(u.start))
}

// shipped records a cycle the replica committed and releases it.
func (s *Shipper) shipped(info journal.CycleInfo, rep wire.Replica, size int64, latency time.Duration) error {
	if err := s.j.Release(info.Cycle); err != nil {
		return fmt.Errorf("ship: release cycle %d: %w", info.Cycle, err)
	}
	appliedAt := s.now() // when the replica answered; rep.AppliedAt is the barrier
	s.succeeded()
	applied, sealed := confirmedApplied(info.Cycle, info.Sealed, rep)
	err := s.update(func(st *persisted) {
		if applied > st.Applied {
			st.Applied, st.AppliedSealed, st.AppliedAt = applied, sealed, appliedAt
		}
		if size > 0 {
			c := &st.Counters
			c.Shipped++
			c.WireBytes += size
			c.MaxCycleWire = max(c.MaxCycleWire, size)
			c.Latency += latency
			c.MaxLatency = max(c.MaxLatency, latency)
		}
	})
	s.log.Debug("cycle shipped", "cycle", info.Cycle, "bytes", size, "latency", latency)
	if f := s.cfg.Events.CycleShipped; f != nil && size > 0 {
		f(info, size, latency)
	}
	return err
}

// gap handles a commit the replica refused because the cycle does not follow
// the one it applied last.
func (s *Shipper) gap(info journal.CycleInfo, err error) error {
	var re *ReplicaError
	errors.As(err, &re)
	applied := re.Wire.Applied
	if applied >= info.Cycle {
		// It has the cycle already (the answer to an earlier commit was lost).
		return s.shipped(info, wire.Replica{Applied: applied}, 0, 0)
	}
	// The replica lacks cycles the journal released (shipped to a replica
	// that lost them, or a replica restored from an older backup). Nothing
	// here proves it complete: resync (DESIGN invariant 2).
	reason := fmt.Sprintf("replica is at cycle %d but the journal starts at cycle %d", applied, info.Cycle)
	s.log.Warn("replica incomplete, resync required", "cycle", info.Cycle, "applied", applied)
	return s.update(func(st *persisted) { st.Resync = &pendingResync{Reason: reason} })
}

// fillCycle writes the coalesced content of a closed cycle: its trim/zero
// ranges in journal order, then its data by disk and offset, for the
// replicated disks only.
//
// A write extent is read whole (ReadExtent takes no sub-range). An extent
// is at most one journal record's data (records have headers between
// them, so runs never merge across records), which bounds the buffer by the
// largest single guest write (32 MiB for NBD).
func (s *Shipper) fillCycle(ctx context.Context, w *wire.Writer, info journal.CycleInfo) error {
	var buf []byte
	return s.j.Extents(info.Cycle, func(e journal.Extent) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		wd, ok := s.wireOf[e.Disk]
		if !ok {
			return nil // excluded disk
		}
		// The journal tracks whole 4 KiB blocks; a disk whose size is not a
		// multiple of that has a last block that overhangs its end.
		n := min(e.Length, s.sizes[wd]-e.Offset)
		if n <= 0 {
			return nil
		}
		switch e.Kind {
		case journal.KindWrite:
			if int64(cap(buf)) < e.Length {
				buf = make([]byte, e.Length)
			}
			p := buf[:e.Length]
			if err := s.j.ReadExtent(e, p); err != nil {
				return fmt.Errorf("ship: read cycle %d: %w", info.Cycle, err)
			}
			return w.Data(wd, e.Offset, p[:n])
		case journal.KindTrim, journal.KindZero, journal.KindZeroAlloc:
			return w.Range(wire.FrameType(e.Kind), wd, e.Offset, n)
		}
		return fmt.Errorf("ship: cycle %d: extent of unknown kind %d", info.Cycle, e.Kind)
	})
}

// upload sends a spool in chunks, resuming from what the replica staged,
// and commits it. A spool still being written (writeSpool) is sent as it
// grows and committed once the writer finished; upload always waits for
// the writer before it returns, and returns the writer's error if it
// failed.
func (s *Shipper) upload(ctx context.Context, sp *spool, lims []*Limiter) (rep wire.Replica, err error) {
	// On a failed upload the writer goes on (it stops only with ctx): the
	// spool is then complete for the next attempt.
	defer func() {
		if werr := sp.wait(); err == nil {
			err = werr
		}
	}()
	if rep, err = s.sendChunks(ctx, sp, lims); err != nil {
		return rep, err
	}
	if err := sp.wait(); err != nil {
		return wire.Replica{}, err
	}
	return s.c.commit(ctx, sp.id)
}

// sendChunks sends every chunk of sp the replica does not hold.
func (s *Shipper) sendChunks(ctx context.Context, sp *spool, lims []*Limiter) (wire.Replica, error) {
	off, err := s.c.offset(ctx, sp.id)
	if err != nil {
		return wire.Replica{}, err
	}
	if s.buf == nil {
		s.buf = make([]byte, s.chunk)
	}
	corrupt := 0
	for {
		size, complete := sp.size, true
		if sp.prog != nil {
			if size, complete, err = sp.prog.avail(ctx, max(off, 0)+s.chunk); err != nil {
				return wire.Replica{}, err
			}
		}
		if complete && (off > size || off < 0) {
			// The replica staged another stream of this id (a spool written
			// anew since): start over.
			if err := s.c.discard(ctx, sp.id); err != nil {
				return wire.Replica{}, err
			}
			off = 0
		}
		if complete && off == size {
			return wire.Replica{}, nil
		}
		chunk := s.buf[:min(chunkFor(s.chunk, lims, s.now()), size-off)]
		if _, err := sp.f.ReadAt(chunk, off); err != nil && !errors.Is(err, io.EOF) {
			return wire.Replica{}, fmt.Errorf("ship: read spool %s: %w", sp.id, err)
		}
		body := &pacedReader{ctx: ctx, r: bytes.NewReader(chunk), lims: lims}
		next, err := s.c.put(ctx, sp.id, off, chunk, wire.CRC(chunk), body)
		var re *ReplicaError
		switch {
		case err == nil:
			if next <= off || complete && next > size {
				return wire.Replica{}, fmt.Errorf("%w: upload %s: offset %d after a chunk at %d of %d", ErrProtocol, sp.id, next, off, size)
			}
			off = next
		case isCode(err, wire.CodeOffset) && errors.As(err, &re):
			s.log.Debug("resuming upload", "upload", sp.id, "offset", re.Wire.Offset)
			off = re.Wire.Offset
		case isCode(err, wire.CodeCorrupt) && corrupt < 3:
			// The chunk was damaged on the way; ask where to go on.
			corrupt++
			s.log.Warn("chunk rejected as corrupt, sending it again", "upload", sp.id, "offset", off)
			if off, err = s.c.offset(ctx, sp.id); err != nil {
				return wire.Replica{}, err
			}
		default:
			return wire.Replica{}, err
		}
	}
}

// chunkFor is the chunk size to send now: at most max, and no more than two
// minutes' worth under the slowest limiter, so a chunk finishes well inside
// its request timeout on a slow link and a cut costs little.
func chunkFor(limit int64, lims []*Limiter, now time.Time) int64 {
	n := limit
	for _, l := range lims {
		if r := l.Rate(now); r < float64(n)/120 {
			n = int64(r * 120)
		}
	}
	return min(limit, max(n&^4095, 64<<10))
}

// pacedReader is an upload body that waits for the bandwidth limiters.
type pacedReader struct {
	ctx  context.Context
	r    io.Reader
	lims []*Limiter
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if len(b) > 32<<10 {
		b = b[:32<<10]
	}
	n, err := p.r.Read(b)
	for _, l := range p.lims {
		if werr := l.WaitN(p.ctx, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}
