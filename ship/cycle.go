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

// shipCycle sends closed cycle info (the oldest the journal keeps), and
// releases it once the replica committed it.
func (s *Shipper) shipCycle(ctx context.Context, info journal.CycleInfo) error {
	id := wire.CycleUploadID(info.Cycle)
	log := s.log.With("cycle", info.Cycle)
	for attempt := 0; ; attempt++ {
		start := s.now()
		// A spool of the cycle (left by an older vdrepl) is sent as it is;
		// otherwise the stream is made while it is sent (stream.go).
		sp, err := s.openSpool(id)
		if err != nil {
			return err
		}
		var rep wire.Replica
		var size int64
		if sp != nil {
			rep, err = s.upload(ctx, sp, []*Limiter{s.cfg.Limit, s.cfg.HostLimit})
			size = sp.size
			if err == nil || isCode(err, wire.CodeCorrupt) {
				s.removeSpool(sp)
			} else {
				sp.close()
			}
		} else {
			h := wire.Header{
				VM: s.cfg.VM, Kind: wire.KindCycle, Disks: s.cfg.Disks,
				Cycle: info.Cycle, Prev: info.Cycle - 1,
				Sealed: info.Sealed, AppConsistent: info.AppConsistent, Point: info.Point,
			}
			newSrc := func() *streamSource {
				return newStreamSource(ctx, h, s.cfg.Compress, s.chunk, func(ctx context.Context, w *wire.Writer) error {
					return s.fillCycle(ctx, w, info)
				})
			}
			rep, size, err = s.uploadStream(ctx, id, newSrc, []*Limiter{s.cfg.Limit, s.cfg.HostLimit})
		}
		switch {
		case isCode(err, wire.CodeCorrupt) && attempt == 0:
			// The replica discarded the stream; make it anew and send it
			// once more before backing off.
			log.Warn("replica rejected cycle as corrupt, sending it again", "err", err)
			continue
		case isCode(err, wire.CodeCorrupt):
			return err
		case isCode(err, wire.CodeGap):
			return s.gap(info, err)
		case err != nil:
			return err
		}
		return s.shipped(info, rep, size, s.now().Sub(start))
	}
}

// shipped records a cycle the replica committed and releases it.
func (s *Shipper) shipped(info journal.CycleInfo, rep wire.Replica, size int64, latency time.Duration) error {
	if err := s.j.Release(info.Cycle); err != nil {
		return fmt.Errorf("ship: release cycle %d: %w", info.Cycle, err)
	}
	appliedAt := s.now() // when the replica answered; rep.AppliedAt is the barrier
	s.succeeded()
	err := s.update(func(st *persisted) {
		if info.Cycle > st.Applied {
			st.Applied, st.AppliedSealed, st.AppliedAt = info.Cycle, info.Sealed, appliedAt
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
