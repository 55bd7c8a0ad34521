package ship

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// A cycle's stream is not spooled: it is made in memory, a block of
// s.chunk bytes at a time, while the blocks before it are being uploaded
// (at most three blocks exist: one being filled or waiting, one being sent
// and the one sent before it). This is possible because a closed cycle's stream is a function of
// the journal alone (its extents, read in order, and the same encoder), so
// a resumed upload makes the stream again and skips what the replica has
// staged; should the bytes differ after all (another vdrepl version
// between the attempts), the replica finds the stream corrupt at commit,
// discards it and the cycle is sent again whole (committed). Compared with
// a spool, every byte is neither written to nor read back from a file and
// no fsync competes with the replica's writes.

// errPastEnd: the replica holds more of the upload than the stream has.
var errPastEnd = errors.New("ship: replica staged more than the stream holds")

// streamSource makes a stream in a goroutine and hands it out in pieces.
type streamSource struct {
	cancel context.CancelFunc
	blocks chan block // full blocks, the last one shorter; closed at the end
	free   chan []byte
	done   chan struct{}
	// set before done is closed
	err        error
	size, data int64

	blk  block  // the block being handed out
	prev []byte // the block before it, recycled at the next block: an
	// HTTP transport may still read a request body after the answer
	// (a 409 sent before the body was read)
	cur []byte // what is left of blk
	pos int64  // stream offset of cur[0]
	eof bool
}

// newStreamSource starts writing the stream with header h (fill writes its
// frames) in blocks of size bytes.
func newStreamSource(ctx context.Context, h wire.Header, compress bool, size int64, fill func(context.Context, *wire.Writer) error) *streamSource {
	ctx, cancel := context.WithCancel(ctx)
	src := &streamSource{
		cancel: cancel,
		blocks: make(chan block),
		free:   make(chan []byte, 3),
		done:   make(chan struct{}),
	}
	go func() {
		defer close(src.done)
		defer close(src.blocks)
		bw := &blockWriter{ctx: ctx, src: src, size: int(size)}
		w, err := wire.NewWriter(bw, h, compress)
		if err == nil {
			err = fill(ctx, w)
		}
		if err == nil {
			err = ctx.Err()
		}
		if err == nil {
			err = w.Close()
		}
		if err == nil {
			err = bw.flush()
		}
		if err != nil {
			src.err = err
			return
		}
		_, src.data, _, src.size = w.Stats()
	}()
	return src
}

// A block is a piece of the stream and its CRC32C, computed as the block
// is filled (while its bytes are in the CPU's cache: computed as it is
// sent, on a block written a while before, the checksum cost twice as
// much).
type block struct {
	b   []byte
	crc uint32
}

// blockWriter cuts what the wire writer writes into blocks.
type blockWriter struct {
	ctx  context.Context
	src  *streamSource
	size int
	buf  []byte
	crc  uint32
}

func (w *blockWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if w.buf == nil {
			select {
			case w.buf = <-w.src.free:
				w.buf = w.buf[:0]
			default:
				w.buf = make([]byte, 0, w.size)
			}
		}
		k := copy(w.buf[len(w.buf):cap(w.buf)], p)
		w.crc = wire.UpdateCRC(w.crc, w.buf[len(w.buf):len(w.buf)+k])
		w.buf = w.buf[:len(w.buf)+k]
		p = p[k:]
		if len(w.buf) == cap(w.buf) {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *blockWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	select {
	case w.src.blocks <- block{b: w.buf, crc: w.crc}:
		w.buf, w.crc = nil, 0
		return nil
	case <-w.ctx.Done():
		return w.ctx.Err()
	}
}

// next returns the next at most max bytes of the stream (fewer at the end
// of a block) and their CRC32C, io.EOF after the last. The bytes stay
// valid until a block after theirs has been handed out whole.
func (src *streamSource) next(max int64) ([]byte, uint32, error) {
	for len(src.cur) == 0 {
		if src.eof {
			return nil, 0, io.EOF
		}
		if src.prev != nil {
			select {
			case src.free <- src.prev:
			default:
			}
		}
		src.prev, src.blk = src.blk.b, block{}
		b, ok := <-src.blocks
		if !ok {
			src.eof = true
			<-src.done
			if src.err != nil {
				return nil, 0, src.err
			}
			src.cur = nil
			return nil, 0, io.EOF
		}
		src.blk, src.cur = b, b.b
	}
	n := min(int64(len(src.cur)), max)
	p := src.cur[:n]
	crc := src.blk.crc
	if len(p) != len(src.blk.b) {
		crc = wire.CRC(p) // a part of the block
	}
	src.cur = src.cur[n:]
	src.pos += n
	return p, crc, nil
}

// skip drops the bytes before offset to (>= pos); errPastEnd if the stream
// ends first.
func (src *streamSource) skip(to int64) error {
	for src.pos < to {
		_, _, err := src.next(to - src.pos)
		if err == io.EOF {
			return errPastEnd
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// finish waits for the writer and returns its error.
func (src *streamSource) finish() error {
	<-src.done
	return src.err
}

// stop ends the writer and waits for it.
func (src *streamSource) stop() {
	src.cancel()
	for range src.blocks {
	}
	<-src.done
}

// inFlight bounds the chunk requests of one upload in flight at once: the
// next chunk travels (and the replica receives it) while the one before
// is being staged. The replica holds an early chunk until the one before
// it is staged (apply's putChunk); two is what the transport's idle
// connections per host keep open.
const inFlight = 2

// chunkPut is one chunk request in flight.
type chunkPut struct {
	off  int64
	n    int64
	next int64 // the replica's staged offset after it
	err  error
	done chan struct{}
}

// uploadStream sends the stream newSrc makes as upload id, resuming from
// what the replica staged, and returns the stream's size once the replica
// staged all of it; the caller commits it (cycle.go). Up to inFlight
// chunks are in flight; when one fails, the others are waited for and the
// upload goes on from where the replica says (a 409 names it; after a
// damaged chunk it is asked).
func (s *Shipper) uploadStream(ctx context.Context, id string, newSrc func() *streamSource, lims []*Limiter) (int64, error) {
	off, err := s.c.offset(ctx, id)
	if err != nil {
		return 0, err
	}
	src := newSrc()
	defer func() { src.stop() }()
	var queue []*chunkPut
	drain := func() {
		for _, p := range queue {
			<-p.done
		}
		queue = nil
	}
	defer drain()
	corrupt := 0
	eof := false
	for {
		// Fill the window.
		for !eof && len(queue) < inFlight {
			if off < src.pos || off < 0 {
				// The replica wants bytes already sent (or makes no
				// sense): make the stream again.
				src.stop()
				src = newSrc()
				off = max(off, 0)
			}
			switch err := src.skip(off); {
			case errors.Is(err, errPastEnd):
				// The replica staged another stream of this id: start over.
				drain()
				if err := s.c.discard(ctx, id); err != nil {
					return 0, err
				}
				off = 0
				continue
			case err != nil:
				return 0, fmt.Errorf("ship: make stream %s: %w", id, err)
			}
			chunk, crc, err := src.next(chunkFor(s.chunk, lims, s.now()))
			if err == io.EOF {
				eof = true
				break
			}
			if err != nil {
				return 0, fmt.Errorf("ship: make stream %s: %w", id, err)
			}
			p := &chunkPut{off: off, n: int64(len(chunk)), done: make(chan struct{})}
			go func() {
				defer close(p.done)
				body := &pacedReader{ctx: ctx, r: bytes.NewReader(chunk), lims: lims}
				p.next, p.err = s.c.put(ctx, id, p.off, chunk, crc, body)
			}()
			queue = append(queue, p)
			off += p.n
		}
		if len(queue) == 0 {
			break // everything sent and staged
		}
		p := queue[0]
		<-p.done
		queue = queue[1:]
		var re *ReplicaError
		switch err := p.err; {
		case err == nil:
			if p.next != p.off+p.n {
				drain()
				return 0, fmt.Errorf("%w: upload %s: offset %d after a chunk at %d of %d bytes", ErrProtocol, id, p.next, p.off, p.n)
			}
			continue
		case isCode(err, wire.CodeOffset) && errors.As(err, &re):
			drain()
			s.log.Debug("resuming upload", "upload", id, "offset", re.Wire.Offset)
			off = re.Wire.Offset
		case isCode(err, wire.CodeCorrupt) && corrupt < 3:
			// The chunk was damaged on the way; ask where to go on.
			drain()
			corrupt++
			s.log.Warn("chunk rejected as corrupt, sending it again", "upload", id, "offset", p.off)
			if off, err = s.c.offset(ctx, id); err != nil {
				return 0, err
			}
		default:
			return 0, err
		}
		// The stream goes on from off: what follows may have to be made
		// again.
		eof = false
		if off < src.pos {
			src.stop()
			src = newSrc()
		}
	}
	if err := src.finish(); err != nil {
		return 0, fmt.Errorf("ship: make stream %s: %w", id, err)
	}
	return src.size, nil
}
