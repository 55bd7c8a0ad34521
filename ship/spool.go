package ship

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// A spool is the stream of one sync piece written to a file as it is
// uploaded: a piece is read from the live disks, so reading it again would
// make other bytes, and a resumed upload must send exactly the bytes the
// replica staged a part of. Spools live in the spool directory as
// ID.vdws; they appear by rename once complete (and synced), so one found
// after a restart is whole and is uploaded as it is. One that is not what
// the replica expects fails its commit as corrupt and is written again.
type spool struct {
	id   string
	name string
	f    vfs.File
	size int64
	data int64 // disk bytes its data frames carry
	// prog is set while the spool is being written (writeSpool); the
	// fields above but id and f are valid only once wait returned.
	prog *spoolProgress
}

func (sp *spool) close() {
	if sp != nil && sp.f != nil {
		sp.f.Close()
		sp.f = nil
	}
}

// wait waits until the spool is written and returns the writer's error.
func (sp *spool) wait() error {
	p := sp.prog
	if p == nil {
		return nil
	}
	<-p.done
	sp.prog = nil
	if p.err != nil {
		return fmt.Errorf("ship: write spool %s: %w", sp.id, p.err)
	}
	sp.name, sp.size, sp.data = p.name, p.size, p.data
	return nil
}

// spoolProgress is how much of a spool being written is in its file, so an
// upload can send it while the rest is being written.
type spoolProgress struct {
	mu       sync.Mutex
	written  int64
	complete bool          // every byte is written; written is the size
	changed  chan struct{} // closed and replaced when the above change
	err      error         // the writer failed (set before done closes)
	done     chan struct{} // closed when the writer returned
	// set before done closes, on success
	name       string
	size, data int64
}

func newSpoolProgress() *spoolProgress {
	return &spoolProgress{changed: make(chan struct{}), done: make(chan struct{})}
}

func (p *spoolProgress) set(written int64, complete bool) {
	p.mu.Lock()
	p.written, p.complete = written, p.complete || complete
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// avail waits until the file holds want bytes or all of the stream, and
// returns how much it holds and whether that is all.
func (p *spoolProgress) avail(ctx context.Context, want int64) (int64, bool, error) {
	for {
		p.mu.Lock()
		written, complete, ch := p.written, p.complete, p.changed
		p.mu.Unlock()
		if written >= want || complete {
			return written, complete, nil
		}
		select {
		case <-ch:
		case <-p.done:
			if p.err != nil {
				return 0, false, fmt.Errorf("ship: write spool: %w", p.err)
			}
		case <-ctx.Done():
			return 0, false, ctx.Err()
		}
	}
}

// offsetWriter turns a File into an io.Writer; prog, if set, hears of
// every write.
type offsetWriter struct {
	f    vfs.File
	off  int64
	prog *spoolProgress
}

func (w *offsetWriter) Write(p []byte) (int, error) {
	n, err := w.f.WriteAt(p, w.off)
	w.off += int64(n)
	if w.prog != nil && err == nil {
		w.prog.set(w.off, false)
	}
	return n, err
}

func (s *Shipper) spoolName(id string) string { return filepath.Join(s.spoolDir, id+".vdws") }

// openSpool opens the complete spool of id, if there is one.
func (s *Shipper) openSpool(id string) (*spool, error) {
	name := s.spoolName(id)
	f, err := s.fs.OpenFile(name, os.O_RDONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ship: open spool: %w", err)
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ship: spool size: %w", err)
	}
	return &spool{id: id, name: name, f: f, size: size}, nil
}

// writeSpool starts writing the stream of id with header h (fill writes
// its frames) and returns at once: upload sends the spool while it is
// being written, the part the writer has handed to the file so far, and
// commits only once the writer finished (synced and renamed the file).
// So spooling and uploading overlap instead of taking turns. The caller
// must call upload (which waits for the writer) or sp.wait.
func (s *Shipper) writeSpool(ctx context.Context, id string, h wire.Header, fill func(*wire.Writer) error) (*spool, error) {
	if err := s.fs.MkdirAll(s.spoolDir, 0o700); err != nil {
		return nil, fmt.Errorf("ship: spool directory: %w", err)
	}
	name := s.spoolName(id)
	tmp := name + ".tmp"
	f, err := s.fs.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ship: create %s: %w", tmp, err)
	}
	p := newSpoolProgress()
	sp := &spool{id: id, name: tmp, f: f, prog: p}
	go func() {
		defer close(p.done)
		size, data, err := fillStreamFile(ctx, s.fs, f, name, h, s.cfg.Compress, fill, p)
		if err != nil {
			p.err = err
			return
		}
		p.name, p.size, p.data = name, size, data
	}()
	return sp, nil
}

// writeStreamFile writes a stream to name.tmp, syncs it and renames it to
// name: name appears complete or not at all.
func writeStreamFile(ctx context.Context, fsys vfs.FS, name string, h wire.Header, compress bool, fill func(*wire.Writer) error, sp *spool) (*spool, error) {
	tmp := name + ".tmp"
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ship: create %s: %w", tmp, err)
	}
	size, data, err := fillStreamFile(ctx, fsys, f, name, h, compress, fill, nil)
	if err != nil {
		f.Close()
		return nil, err
	}
	sp.name, sp.f, sp.size, sp.data = name, f, size, data
	return sp, nil
}

// fillStreamFile writes a stream to f, open on name.tmp, syncs it and
// renames it to name; on failure it removes name.tmp. It returns the
// stream's size and the disk bytes its data frames carry. prog, if set,
// hears how much is written.
func fillStreamFile(ctx context.Context, fsys vfs.FS, f vfs.File, name string, h wire.Header, compress bool, fill func(*wire.Writer) error, prog *spoolProgress) (int64, int64, error) {
	tmp := name + ".tmp"
	fail := func(err error) (int64, int64, error) {
		fsys.Remove(tmp)
		return 0, 0, err
	}
	bw := bufio.NewWriterSize(&offsetWriter{f: f, prog: prog}, 1<<20)
	w, err := wire.NewWriter(bw, h, compress)
	if err != nil {
		return fail(err)
	}
	if err := fill(w); err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if err := w.Close(); err != nil {
		return fail(err)
	}
	if err := bw.Flush(); err != nil {
		return fail(fmt.Errorf("ship: write %s: %w", tmp, err))
	}
	_, data, _, written := w.Stats()
	if prog != nil {
		prog.set(written, true)
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("ship: sync %s: %w", tmp, err))
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return fail(fmt.Errorf("ship: rename %s: %w", tmp, err))
	}
	if err := fsys.SyncDir(filepath.Dir(name)); err != nil {
		return fail(fmt.Errorf("ship: sync %s: %w", filepath.Dir(name), err))
	}
	return written, data, nil
}

// removeSpool drops a spool once the replica committed it (or rejected it).
func (s *Shipper) removeSpool(sp *spool) {
	if sp == nil {
		return
	}
	sp.close()
	if err := s.fs.Remove(sp.name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("remove spool", "file", sp.name, "err", err)
	}
}

// cleanSpools removes spools nothing will upload: all but the pieces of
// the running sync generation gen (cycles are never spooled), and
// unfinished temporary files.
func (s *Shipper) cleanSpools(gen uint64) {
	names, err := s.fs.ReadDir(s.spoolDir)
	if err != nil {
		return
	}
	genPrefix := fmt.Sprintf("s%d-", gen)
	for _, n := range names {
		id, ok := strings.CutSuffix(n, ".vdws")
		if ok && gen != 0 && strings.HasPrefix(id, genPrefix) {
			continue
		}
		if err := s.fs.Remove(filepath.Join(s.spoolDir, n)); err != nil {
			s.log.Warn("remove stale spool", "file", n, "err", err)
		}
	}
}
