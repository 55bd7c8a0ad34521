package snapshot

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// ErrNotLatest: Revert needs the newest point to be the latest cycle
// recorded (the images hold it, plus only changes saved since).
var ErrNotLatest = errors.New("snapshot: the newest point is not the latest cycle")

// revertBatch is how many blocks Revert saves before one Sync and then
// writes.
const revertBatch = 256

// Revert writes point id's content into the images, as Rollback does, but
// keeps every point: each block it changes is first saved, like any other
// write, as undo data of the newest point. So afterwards every point is
// still exact, and Rollback to the newest point undoes the revert (and
// every write made since through BeforeWrite or GuardFS).
//
// This is what an unplanned failover to an older point needs: the images
// become the point, and until the failover is completed it can be
// cancelled back to the latest state. The newest point must be the newest
// cycle recorded (Cycle with takePoint for the latest cycle first), or
// ErrNotLatest. Reverting to the newest point itself writes back whatever
// changed since it.
//
// Every record it reads is verified before the images are touched. A crash
// or error midway leaves the images partly reverted but every point exact:
// calling Revert again finishes it. The caller must not write the images
// while Revert runs (apply is stopped, the failed-over disks not served).
func (s *Store) Revert(id string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	s.mu.RLock()
	k, n := s.find(id), len(s.points)
	s.mu.RUnlock()
	switch {
	case k < 0:
		return fmt.Errorf("%w: %q", ErrNotFound, id)
	case s.points[n-1].cycle != s.last:
		return fmt.Errorf("%w: newest point %d, latest cycle %d", ErrNotLatest, s.points[n-1].cycle, s.last)
	}
	// The plan is fixed before anything is saved: saving adds records to
	// the open segment, whose index the plan reads.
	type move struct {
		key uint64
		seg *segment
		loc int64
	}
	var plan []move
	for j := k; j < n; j++ {
		seg := s.points[j].seg
		err := seg.idx.each(func(key uint64, loc int64) error {
			for _, older := range s.points[k:j] {
				if _, ok := older.seg.idx.get(key); ok {
					return nil // an older segment has the content at k
				}
			}
			plan = append(plan, move{key, seg, loc})
			return nil
		})
		if err != nil {
			return err
		}
	}
	rec := make([]byte, dataRecordSize)
	for _, m := range plan { // verify everything before writing anything
		if _, err := m.seg.readBlock(m.key, m.loc, rec); err != nil {
			return err
		}
	}
	imgs, err := s.openImages()
	if err != nil {
		return err
	}
	defer closeFiles(imgs)
	open := s.open()
	for len(plan) > 0 {
		batch := plan[:min(revertBatch, len(plan))]
		plan = plan[len(batch):]
		for _, m := range batch {
			if _, held := open.idx.get(m.key); held {
				continue
			}
			disk, block := splitKey(m.key)
			if err := s.save(open, disk, block, block+1, false); err != nil {
				return err
			}
		}
		if err := s.syncOpen(); err != nil {
			return err
		}
		for _, m := range batch {
			buf, err := m.seg.readBlock(m.key, m.loc, rec)
			if err != nil {
				return err
			}
			disk, block := splitKey(m.key)
			off := block * BlockSize
			size := min(BlockSize, s.disks[disk].Size-off)
			if isZeroLoc(m.loc) {
				err = imgs[disk].PunchHole(off, size)
			} else {
				_, err = imgs[disk].WriteAt(buf[:size], off)
			}
			if err != nil {
				return fmt.Errorf("snapshot: write image of disk %q: %w", s.disks[disk].Name, err)
			}
		}
	}
	for i, f := range imgs {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("snapshot: sync image of disk %q: %w", s.disks[i].Name, err)
		}
	}
	s.log.Info("images reverted to a recovery point, newer points kept", "cycle", s.points[k].cycle)
	return nil
}

func (s *Store) openImages() ([]vfs.File, error) {
	var imgs []vfs.File
	for _, d := range s.disks {
		f, err := s.fs.OpenFile(d.Path, os.O_RDWR, 0)
		if err != nil {
			closeFiles(imgs)
			return nil, fmt.Errorf("snapshot: open image of disk %q: %w", d.Name, err)
		}
		imgs = append(imgs, f)
	}
	return imgs, nil
}

func closeFiles(files []vfs.File) {
	for _, f := range files {
		f.Close()
	}
}

// GuardFS returns base with one difference: a file opened at the path of
// one of the Store's images saves undo data before every change (WriteAt,
// PunchHole, ZeroRange: BeforeWrite or BeforeZero, then Sync), so the
// points stay exact while something other than apply writes the images —
// the journal of a failed-over VM. A change of an image's size is refused.
// With no points the guard costs a map lookup per write; once the Store
// is closed with no points it passes every write through.
func (s *Store) GuardFS(base vfs.FS) vfs.FS {
	paths := make(map[string]int, len(s.disks))
	for i, d := range s.disks {
		paths[filepath.Clean(d.Path)] = i
	}
	return guardFS{FS: base, s: s, paths: paths}
}

type guardFS struct {
	vfs.FS
	s     *Store
	paths map[string]int
}

func (g guardFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := g.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	disk, ok := g.paths[filepath.Clean(name)]
	if !ok {
		return f, nil
	}
	return guardFile{File: f, s: g.s, disk: disk}, nil
}

// released: the Store was closed with no points left (a completed
// failover), so nothing depends on the images' old content any more.
func (s *Store) released() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.closed && len(s.points) == 0
}

// guardFile is an image whose changes are saved first. It deliberately
// lacks vfs.DirectWriter, so every write comes through WriteAt.
type guardFile struct {
	vfs.File
	s    *Store
	disk int
}

func (f guardFile) guard(off, n int64, zeroing bool) error {
	if f.s.released() {
		return nil
	}
	err := f.s.before(f.disk, off, n, zeroing)
	if err == nil {
		err = f.s.Sync()
	}
	if errors.Is(err, ErrClosed) && f.s.released() {
		return nil // closed meanwhile, its points gone: a completed failover
	}
	return err
}

func (f guardFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.guard(off, int64(len(p)), false); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f guardFile) PunchHole(off, n int64) error {
	if err := f.guard(off, n, true); err != nil {
		return err
	}
	return f.File.PunchHole(off, n)
}

func (f guardFile) ZeroRange(off, n int64) error {
	if err := f.guard(off, n, true); err != nil {
		return err
	}
	return f.File.ZeroRange(off, n)
}

func (f guardFile) Truncate(size int64) error {
	if cur, err := f.File.Size(); err != nil || cur != size {
		return fmt.Errorf("%w: image of disk %d cannot change size while recovery points depend on it", ErrOutOfRange, f.disk)
	}
	return nil
}
