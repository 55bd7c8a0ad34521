package apply

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// streamErr classifies an error of the wire reader: a stream that fails its
// checks is ErrCorrupt, one of a version this replica cannot read is
// ErrMismatch (sending it again would not help), anything else is I/O.
func streamErr(name string, err error) error {
	switch {
	case errors.Is(err, wire.ErrVersion):
		return fmt.Errorf("%w: %s: %w", ErrMismatch, name, err)
	case errors.Is(err, wire.ErrCorrupt), errors.Is(err, wire.ErrTruncated):
		return fmt.Errorf("%w: %s: %w", ErrCorrupt, name, err)
	}
	return fmt.Errorf("apply: read %s: %w", name, err)
}

// openStream opens a staged stream and reads its header. A missing file
// is an empty, so truncated, stream.
func (v *vm) openStream(name string) (vfs.File, *wire.Reader, error) {
	f, err := v.s.fs.OpenFile(name, os.O_RDONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("%w: %s: nothing staged: %w", ErrCorrupt, name, wire.ErrTruncated)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("apply: open %s: %w", name, err)
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("apply: %s: %w", name, err)
	}
	var src io.Reader = io.NewSectionReader(f, 0, size)
	if _, ok := v.s.fs.(vfs.OS); ok {
		if d, err := openDirect(name, size); err == nil {
			f, src = &withCloser{File: f, also: d}, d
		}
	}
	r, err := wire.NewReader(src)
	if err != nil {
		f.Close()
		return nil, nil, streamErr(name, err)
	}
	return f, r, nil
}

// withCloser is a File that closes another file with it.
type withCloser struct {
	vfs.File
	also io.Closer
}

func (w *withCloser) Close() error {
	w.also.Close()
	return w.File.Close()
}

// directBlock is what a directReader reads at a time.
const directBlock = 8 << 20

// directReader reads a file from its start with O_DIRECT, bypassing the
// page cache: a staged stream was written with O_DIRECT (stageChunk) and
// is read once, so a buffered read would only fill the page cache with
// pages nobody reads again. The kernel writes back cached dirty pages of
// the range before a direct read, so it sees every write. A goroutine
// reads the next block while the caller uses this one, so reading the
// stream overlaps writing the images.
type directReader struct {
	f     *os.File
	full  chan directRead // blocks read, in order
	empty chan []byte
	stop  chan struct{}
	done  chan struct{}
	cur   directRead
	r     int
}

type directRead struct {
	buf []byte
	n   int
	err error // after the n bytes
}

func openDirect(name string, size int64) (*directReader, error) {
	f, err := os.OpenFile(name, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	d := &directReader{
		f:     f,
		full:  make(chan directRead, 1),
		empty: make(chan []byte, 2),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	d.empty <- vfs.AlignedBuffer(directBlock)
	d.empty <- vfs.AlignedBuffer(directBlock)
	go d.readAhead(size)
	return d, nil
}

// readAhead reads the file's blocks in order until size, an error or stop.
func (d *directReader) readAhead(size int64) {
	defer close(d.done)
	defer close(d.full)
	for off := int64(0); ; {
		var buf []byte
		select {
		case buf = <-d.empty:
		case <-d.stop:
			return
		}
		rd := directRead{buf: buf}
		if off >= size {
			rd.err = io.EOF
		} else {
			// One pread: os.File.ReadAt would go on at an unaligned
			// offset after a short read, which O_DIRECT refuses.
			n, err := unix.Pread(int(d.f.Fd()), buf, off)
			switch {
			case err != nil:
				rd.err = fmt.Errorf("apply: read %s: %w", d.f.Name(), err)
			case n == 0:
				rd.err = io.EOF
			default:
				rd.n = int(min(int64(n), size-off))
				off += int64(rd.n)
				if off < size && rd.n%vfs.DirectAlign != 0 {
					// The next pread would be at an unaligned offset.
					rd.err = fmt.Errorf("apply: read %s: short read of %d bytes", d.f.Name(), n)
				}
			}
		}
		select {
		case d.full <- rd:
		case <-d.stop:
			return
		}
		if rd.err != nil {
			return
		}
	}
}

func (d *directReader) Read(p []byte) (int, error) {
	for d.r == d.cur.n {
		if d.cur.err != nil {
			return 0, d.cur.err
		}
		if d.cur.buf != nil {
			d.empty <- d.cur.buf
		}
		rd, ok := <-d.full
		if !ok {
			return 0, io.ErrUnexpectedEOF // closed
		}
		d.cur, d.r = rd, 0
	}
	k := copy(p, d.cur.buf[d.r:d.cur.n])
	d.r += k
	return k, nil
}

// Close stops the read-ahead and closes the file.
func (d *directReader) Close() error {
	close(d.stop)
	<-d.done
	return d.f.Close()
}

// verifyStream reads a whole staged stream: check vets its header (an
// error from it is returned as it is), then every frame and the end frame
// must verify.
func (v *vm) verifyStream(name string, check func(wire.Header) error) (wire.Header, error) {
	f, r, err := v.openStream(name)
	if err != nil {
		return wire.Header{}, err
	}
	defer f.Close()
	h := r.Header()
	if err := check(h); err != nil {
		return h, err
	}
	return h, forEachFrame(r, readErrOf(name), func(wire.Frame) error { return nil })
}

// forEachFrame is the one loop over the frames of a staged stream, which
// every pass over it shares: verification (verifyStream), undo data
// (saveStreamUndo), apply (applyStream) and relay (relayStreams). It calls
// fn with each frame of r, in order, and returns nil after the end frame.
// An error from fn stops it and is returned as it is; an error reading a
// frame (a failed check, a truncated stream, I/O) is returned through
// readErr (nil: as it is).
func forEachFrame(r *wire.Reader, readErr func(error) error, fn func(wire.Frame) error) error {
	for {
		fr, err := r.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if readErr != nil {
				err = readErr(err)
			}
			return err
		}
		if err := fn(fr); err != nil {
			return err
		}
	}
}

// readErrOf classifies the read errors of staged stream name (streamErr).
func readErrOf(name string) func(error) error {
	return func(err error) error { return streamErr(name, err) }
}

// checkHeader is the part of a header check common to every stream.
func (v *vm) checkHeader(h wire.Header, kind string) error {
	if h.VM != v.name {
		return fmt.Errorf("%w: stream of VM %q sent for %q", ErrMismatch, h.VM, v.name)
	}
	if h.Kind != kind {
		return fmt.Errorf("%w: a %q stream where a %q stream belongs", ErrMismatch, h.Kind, kind)
	}
	if !slices.Equal(h.Disks, v.disks) {
		return fmt.Errorf("%w: stream disks %v, replica VM %q has %v", ErrMismatch, h.Disks, v.name, v.disks)
	}
	return nil
}

// applyStream writes the frames of a verified stream to the images, in
// order. Every frame holds final content (data, or a range that reads as
// zeroes), so applying a stream again, whole or after a partial apply,
// yields the same images.
//
// The stream was verified whole before (commit, recovery, import), so the
// reader skips the BLAKE3 end hash (it would be known only after every
// frame was written) and checks each frame's CRC32C before its write.
// Data frames of whole 4 KiB blocks go to the image with O_DIRECT where the
// file offers it, gathered into writes of up to 8 MiB where they follow
// each other: they bypass the page cache (one copy less per byte, and no
// dirty pages for the image's fsync to write back), and the kernel keeps
// the page cache coherent for readers of the image. tw (nil: none) gets
// every frame for the block tree. It returns the stream's header.
func (v *vm) applyStream(name string, imgs []vfs.File, tw *treeWriter) (wire.Header, error) {
	f, r, err := v.openStream(name)
	if err != nil {
		return wire.Header{}, err
	}
	defer f.Close()
	h := r.Header()
	if !slices.Equal(h.Disks, v.disks) {
		return h, fmt.Errorf("%w: %s: stream disks %v, replica VM has %v", ErrMismatch, name, h.Disks, v.disks)
	}
	r.SkipHash()
	var g gather
	err = forEachFrame(r, readErrOf(name), func(fr wire.Frame) error {
		img := imgs[fr.Disk] // the reader checked the index against the header's disks
		tw.note(fr)
		if fr.Type == wire.FrameData {
			took, err := g.add(img, fr.Data, fr.Offset)
			if err != nil {
				return err
			}
			if took {
				return tw.flushIfLarge(&g, imgs)
			}
		}
		if err := g.flush(); err != nil {
			return err
		}
		var err error
		switch fr.Type {
		case wire.FrameData:
			_, err = img.WriteAt(fr.Data, fr.Offset)
		case wire.FrameTrim, wire.FrameZero:
			// A hole reads as zeroes; vfs falls back to writing zeroes
			// where the filesystem cannot punch holes.
			err = img.PunchHole(fr.Offset, fr.Length)
		case wire.FrameZeroAlloc:
			err = img.ZeroRange(fr.Offset, fr.Length)
		default:
			err = fmt.Errorf("%w: %s: frame type %s", ErrCorrupt, name, fr.Type)
		}
		if err != nil {
			return fmt.Errorf("apply: %s frame to %s [%d, +%d): %w", fr.Type, img.Name(), fr.Offset, fr.Length, err)
		}
		return tw.flushIfLarge(&g, imgs)
	})
	if err != nil {
		return h, err
	}
	return h, g.flush()
}

// directMin is the smallest data frame written with O_DIRECT: below it the
// page cache's copy costs less than a synchronous device write.
const directMin = 64 << 10

// gatherMax is the most a gather writes at once: with O_DIRECT each write
// waits for the device, and 8 MiB writes of a GiB took a third of the time
// 1 MiB ones (the frames' size) did on the benchmark machine.
const gatherMax = 8 << 20

// gather collects data frames that follow each other on one image into
// one O_DIRECT write (frames of whole blocks at block offsets, of at least
// directMin bytes, on a file that offers O_DIRECT). Frames are applied in
// order: the caller flushes before any frame gather does not take.
type gather struct {
	img vfs.File
	dw  vfs.DirectWriter
	off int64
	buf []byte // aligned, gatherMax; buf[:n] pending at off
	n   int
}

// add takes data p at off of img if it can be written with O_DIRECT,
// flushing what it held first when p does not follow it. False: the caller
// writes p itself (after a flush).
func (g *gather) add(img vfs.File, p []byte, off int64) (bool, error) {
	dw, ok := img.(vfs.DirectWriter)
	if !ok || len(p) < directMin || len(p)%vfs.DirectAlign != 0 || off%vfs.DirectAlign != 0 || len(p) > gatherMax {
		return false, nil
	}
	if g.n > 0 && (img != g.img || off != g.off+int64(g.n) || g.n+len(p) > gatherMax) {
		if err := g.flush(); err != nil {
			return false, err
		}
	}
	if g.buf == nil {
		g.buf = vfs.AlignedBuffer(gatherMax)
	}
	if g.n == 0 {
		g.img, g.dw, g.off = img, dw, off
	}
	g.n += copy(g.buf[g.n:], p)
	return true, nil
}

// flush writes what the gather holds.
func (g *gather) flush() error {
	if g.n == 0 {
		return nil
	}
	n := g.n
	g.n = 0
	if _, err := g.dw.WriteDirectAt(g.buf[:n], g.off); err != nil {
		return fmt.Errorf("apply: data to %s [%d, +%d): %w", g.img.Name(), g.off, n, err)
	}
	return nil
}

// applyFiles applies streams to the images, in order, and makes the images
// durable. The recovery points' undo data of every range they change is
// saved first (points.go). It is the one place where streams reach the
// images, so it keeps the block tree (treeWriter): marked dirty before the
// first write, committed and synced after the images are, before the
// caller records the streams as applied. It returns the last stream's
// header.
func (v *vm) applyFiles(names ...string) (wire.Header, error) {
	if err := v.saveUndo(names); err != nil {
		return wire.Header{}, err
	}
	tw, err := v.treeBegin()
	if err != nil {
		return wire.Header{}, err
	}
	v.pendingCheck = nil // the images leave the cycle it was for
	imgs, err := v.openImages(os.O_RDWR)
	if err != nil {
		tw.fail()
		return wire.Header{}, err
	}
	var last wire.Header
	for _, name := range names {
		if last, err = v.applyStream(name, imgs, tw); err != nil {
			closeImages(imgs)
			tw.fail()
			return wire.Header{}, err
		}
	}
	if err := tw.hashPartial(imgs); err != nil {
		closeImages(imgs)
		tw.fail()
		return wire.Header{}, err
	}
	if err := syncImages(imgs); err != nil {
		tw.fail()
		return wire.Header{}, err
	}
	if err := tw.finish(); err != nil {
		return wire.Header{}, err
	}
	v.kickBuildIfNeeded()
	if v.relay == nil {
		return last, nil
	}
	v.relay.Begin()
	return last, v.relay.End(v.relayStreams(names))
}
