package ship

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// WriteOffline makes the initial copy on external media instead of the
// network: one stream file per piece (SyncUploadID(gen, piece).vdws) and
// wire.OfflineManifestFile in dir, for the replica's
// `vdrepl replication import-initial`. Run then waits for the replica to
// report the import (state replicating, Applied >= the manifest's Base) and
// ships the cycles written since. A WriteOffline cut short continues where
// it stopped when called again with the same dir.
func (s *Shipper) WriteOffline(ctx context.Context, dir string) error {
	s.opMu.Lock()
	defer s.opMu.Unlock()
	return s.writeOffline(ctx, dir)
}

func (s *Shipper) writeOffline(ctx context.Context, dir string) error {
	s.mu.Lock()
	rec := s.st.Sync
	s.mu.Unlock()
	if rec != nil && rec.Offline != dir {
		return fmt.Errorf("%w: %s generation %d", ErrSyncRunning, syncWhat(rec.Kind), rec.Gen)
	}
	if rec == nil {
		if err := s.startSync(wire.KindFull, "offline initial copy to "+dir, dir); err != nil {
			return err
		}
		s.mu.Lock()
		rec = s.st.Sync
		s.mu.Unlock()
	}
	if rec.Written {
		return nil
	}
	if err := s.fs.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ship: offline directory: %w", err)
	}
	s.startProgress(rec, nil)
	for p := int64(0); p < rec.Pieces; p++ {
		wd, off, n, _ := wire.PieceRange(s.cfg.Disks, rec.PieceSize, p)
		name := filepath.Join(dir, wire.SyncUploadID(rec.Gen, p)+".vdws")
		// A piece file appears by rename once whole: one that is there is done.
		if _, err := s.fs.Stat(name); err != nil {
			h := wire.Header{VM: s.cfg.VM, Kind: wire.KindFull, Disks: s.cfg.Disks, Gen: rec.Gen, Piece: p}
			fill := func(w *wire.Writer) error { return s.fillFull(ctx, w, wd, off, n) }
			sp, err := writeStreamFile(ctx, s.fs, name, h, s.cfg.Compress, fill, &spool{})
			if err != nil {
				return fmt.Errorf("ship: offline piece %d: %w", p, err)
			}
			sp.close()
		}
		s.advance(n)
	}
	consistentAt, err := s.sealConsistent()
	if err != nil {
		return err
	}
	m := wire.OfflineManifest{
		Version: 1, VM: s.cfg.VM, Primary: s.primaryName(), Disks: s.cfg.Disks,
		Gen: rec.Gen, Base: rec.Base, PieceSize: rec.PieceSize, Pieces: rec.Pieces,
		Created: s.now().UTC(), ConsistentAt: consistentAt,
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("ship: offline manifest: %w", err)
	}
	if err := vfs.WriteFileAtomic(s.fs, filepath.Join(dir, wire.OfflineManifestFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("ship: write offline manifest: %w", err)
	}
	s.log.Info("offline initial copy written", "dir", dir, "gen", rec.Gen, "base", rec.Base, "pieces", rec.Pieces)
	return s.update(func(st *persisted) {
		r := *st.Sync
		r.Written = true
		st.Sync = &r
	})
}

// waitImport polls the replica, with the retry back-off, until it has
// imported the offline copy.
func (s *Shipper) waitImport(ctx context.Context, rec *syncRecord) (bool, time.Time, error) {
	if !rec.Written {
		return true, time.Time{}, s.writeOffline(ctx, rec.Offline)
	}
	rep, err := s.c.get(ctx)
	if err != nil {
		return false, time.Time{}, err
	}
	if rep.State == "replicating" && rep.Applied >= rec.Base {
		return true, time.Time{}, s.finishSync(rec, rep)
	}
	s.mu.Lock()
	s.polls++
	next := s.now().Add(backoff(s.polls, s.cfg.RetryScale))
	s.mu.Unlock()
	s.setWaiting("import", next)
	return false, next, nil
}
