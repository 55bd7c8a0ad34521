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

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// A spool is one stream written to a file before it is uploaded, so a cycle
// of gigabytes never sits in memory and a resumed upload sends exactly the
// bytes the replica staged a part of. Spools live in the spool directory as
// ID.vdws; they appear by rename once complete (and synced), so one found
// after a restart is whole and is uploaded as it is. One that is not what
// the replica expects fails its commit as corrupt and is written again.
type spool struct {
	id   string
	name string
	f    vfs.File
	size int64
	data int64 // disk bytes its data frames carry
}

func (sp *spool) close() {
	if sp != nil && sp.f != nil {
		sp.f.Close()
		sp.f = nil
	}
}

// offsetWriter turns a File into an io.Writer.
type offsetWriter struct {
	f   vfs.File
	off int64
}

func (w *offsetWriter) Write(p []byte) (int, error) {
	n, err := w.f.WriteAt(p, w.off)
	w.off += int64(n)
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

// writeSpool writes the stream of id with header h; fill writes its frames.
func (s *Shipper) writeSpool(ctx context.Context, id string, h wire.Header, fill func(*wire.Writer) error) (*spool, error) {
	if err := s.fs.MkdirAll(s.spoolDir, 0o700); err != nil {
		return nil, fmt.Errorf("ship: spool directory: %w", err)
	}
	return writeStreamFile(ctx, s.fs, s.spoolName(id), h, s.cfg.Compress, fill, &spool{id: id})
}

// writeStreamFile writes a stream to name.tmp, syncs it and renames it to
// name: name appears complete or not at all.
func writeStreamFile(ctx context.Context, fsys vfs.FS, name string, h wire.Header, compress bool, fill func(*wire.Writer) error, sp *spool) (*spool, error) {
	tmp := name + ".tmp"
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ship: create %s: %w", tmp, err)
	}
	fail := func(err error) (*spool, error) {
		f.Close()
		fsys.Remove(tmp)
		return nil, err
	}
	bw := bufio.NewWriterSize(&offsetWriter{f: f}, 1<<20)
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
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("ship: sync %s: %w", tmp, err))
	}
	if err := fsys.Rename(tmp, name); err != nil {
		return fail(fmt.Errorf("ship: rename %s: %w", tmp, err))
	}
	if err := fsys.SyncDir(filepath.Dir(name)); err != nil {
		return fail(fmt.Errorf("ship: sync %s: %w", filepath.Dir(name), err))
	}
	_, data, _, written := w.Stats()
	sp.name, sp.f, sp.size, sp.data = name, f, written, data
	return sp, nil
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

// cleanSpools removes spools nothing will upload: those of cycles no longer
// in the journal, of sync generations other than the running one, and
// unfinished temporary files.
func (s *Shipper) cleanSpools(keepCycles map[string]bool, gen uint64) {
	names, err := s.fs.ReadDir(s.spoolDir)
	if err != nil {
		return
	}
	genPrefix := fmt.Sprintf("s%d-", gen)
	for _, n := range names {
		id, ok := strings.CutSuffix(n, ".vdws")
		if ok && (keepCycles[id] || (gen != 0 && strings.HasPrefix(id, genPrefix))) {
			continue
		}
		if err := s.fs.Remove(filepath.Join(s.spoolDir, n)); err != nil {
			s.log.Warn("remove stale spool", "file", n, "err", err)
		}
	}
}
