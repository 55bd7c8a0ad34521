package snapshot

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Rollback writes point id back into the images, for an unplanned failover:
// afterwards the images equal the point, byte for byte, and the point and
// every newer one are gone (the images are now the latest state). Older
// points stay valid as long as every later write of the images goes through
// BeforeWrite; otherwise Prune(0) them first.
//
// The caller must not write the images while Rollback runs, and there must
// be no open views (ErrBusy). Every record it needs is verified before the
// images are touched, so a damaged point is ErrCorrupt and changes nothing.
// Then an intent is made durable: from there a crash, or an I/O error
// (ErrBroken), leaves a rollback that the next Open finishes. So a Rollback
// that returned an error may still complete at Open; look at Points.
func (s *Store) Rollback(id string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	s.mu.Lock()
	k := s.find(id)
	open := 0
	for _, n := range s.views {
		open += n
	}
	switch {
	case k < 0:
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNotFound, id)
	case open > 0:
		s.mu.Unlock()
		return fmt.Errorf("%w: %d views open", ErrBusy, open)
	}
	s.busy = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.busy = false
		s.mu.Unlock()
	}()
	if err := s.restore(k, false); err != nil {
		return err // nothing written
	}
	if err := s.syncOpen(); err != nil {
		return err
	}
	p := s.points[k]
	in := intent{Seq: s.man.Seq, Seg: p.seg.no, Cycle: p.cycle}
	if err := vfs.WriteFileAtomic(s.fs, join(s.dir, intentFile), encodeIntent(in), 0o600); err != nil {
		return s.broken(fmt.Errorf("snapshot: write rollback intent: %w", err))
	}
	s.log.Info("rolling back to a recovery point", "cycle", p.cycle)
	if err := s.finishRollback(k); err != nil {
		return s.broken(err)
	}
	return nil
}

// find returns the index of point id, or -1. Caller holds mu or writeMu.
func (s *Store) find(id string) int {
	for i, p := range s.points {
		if p.id() == id {
			return i
		}
	}
	return -1
}

// recoverRollback finishes, at Open, a rollback whose intent is durable. An
// intent older than the manifest is one whose rollback completed: only the
// file is left to remove.
func (s *Store) recoverRollback() error {
	path := join(s.dir, intentFile)
	b, err := vfs.ReadFile(s.fs, path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	in, err := decodeIntent(b)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrCorrupt, path, err)
	}
	switch {
	case in.Seq < s.man.Seq:
		return s.removeIntent()
	case in.Seq > s.man.Seq:
		return fmt.Errorf("%w: %s: rollback intent for manifest %d, the manifest is at %d", ErrCorrupt, path, in.Seq, s.man.Seq)
	}
	k := slices.IndexFunc(s.points, func(p *point) bool { return p.seg.no == in.Seg && p.cycle == in.Cycle })
	if k < 0 {
		return fmt.Errorf("%w: %s: rollback to cycle %d (segment %d), not a point", ErrCorrupt, path, in.Cycle, in.Seg)
	}
	s.log.Info("finishing an interrupted rollback", "cycle", in.Cycle)
	if err := s.restore(k, false); err != nil {
		return err
	}
	return s.finishRollback(k)
}

// finishRollback writes point k into the images and drops it and the newer
// points. Every step can be redone: the segments it reads are removed only
// after the manifest without them is durable. Caller holds writeMu.
func (s *Store) finishRollback(k int) error {
	if err := s.restore(k, true); err != nil {
		return err
	}
	m := s.man
	m.Seq++
	m.Points = slices.Clone(m.Points[:k])
	var prev *segment
	if k > 0 {
		// The previous point's segment is open again: the images are at
		// the barrier it was closed at, so it goes on from there. Bytes
		// past its closed size, if any, must not be read as records.
		prev = s.points[k-1].seg
		m.Points[k-1].Closed = 0
		if err := prev.f.Truncate(prev.size); err != nil {
			return fmt.Errorf("snapshot: reopen %s: %w", prev.path, err)
		}
		if err := prev.f.Sync(); err != nil {
			return fmt.Errorf("snapshot: reopen %s: %w", prev.path, err)
		}
	}
	if err := s.writeManifest(&m); err != nil {
		return err
	}
	s.man = m
	cycle := s.points[k].cycle
	s.mu.Lock()
	gone := slices.Clone(s.points[k:])
	s.points = s.points[:k]
	s.mu.Unlock()
	s.synced = 0
	if prev != nil {
		s.synced = prev.size
	}
	s.last = cycle
	s.removeSegments(gone)
	if err := s.removeIntent(); err != nil {
		// The manifest is newer than the intent: Open removes it.
		s.log.Warn("remove rollback intent", "err", err)
	}
	s.log.Info("rolled back to a recovery point", "cycle", cycle)
	return nil
}

func (s *Store) removeIntent() error {
	if err := s.fs.Remove(join(s.dir, intentFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("snapshot: remove rollback intent: %w", err)
	}
	if err := s.fs.SyncDir(s.dir); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	return nil
}

// restore goes over every block point k differs in from the images: for
// each, the record of the oldest segment at or after k that holds it. It
// reads and verifies each record and, with write, writes it into the
// images and syncs them. Caller holds writeMu.
func (s *Store) restore(k int, write bool) error {
	var imgs []vfs.File
	if write {
		defer func() {
			for _, f := range imgs {
				f.Close()
			}
		}()
		for _, d := range s.disks {
			f, err := s.fs.OpenFile(d.Path, os.O_RDWR, 0)
			if err != nil {
				return fmt.Errorf("snapshot: open image of disk %q: %w", d.Name, err)
			}
			imgs = append(imgs, f)
		}
	}
	rec := make([]byte, dataRecordSize)
	for j := k; j < len(s.points); j++ {
		seg := s.points[j].seg
		err := seg.idx.each(func(key uint64, loc int64) error {
			for _, older := range s.points[k:j] {
				if _, ok := older.seg.idx.get(key); ok {
					return nil // the older segment has the content at k
				}
			}
			buf, err := seg.readBlock(key, loc, rec)
			if err != nil {
				return err
			}
			if !write {
				return nil
			}
			disk, block := splitKey(key)
			off := block * BlockSize
			n := min(BlockSize, s.disks[disk].Size-off)
			if isZeroLoc(loc) {
				err = imgs[disk].PunchHole(off, n)
			} else {
				_, err = imgs[disk].WriteAt(buf[:n], off)
			}
			if err != nil {
				return fmt.Errorf("snapshot: write image of disk %q: %w", s.disks[disk].Name, err)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	for i, f := range imgs {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("snapshot: sync image of disk %q: %w", s.disks[i].Name, err)
		}
	}
	return nil
}
