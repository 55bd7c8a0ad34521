package snapshot

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Errors. Every error of this package wraps one of them, a decoder error
// (ErrInvalid, ErrZeroed, ErrVersion) or an I/O error.
var (
	// ErrCorrupt is damage no crash explains: a record that fails its
	// checksum inside the synced part of a segment, a manifest or intent
	// that does not decode, a segment the manifest lists that is missing.
	ErrCorrupt = errors.New("snapshot: corrupt recovery point data")
	// ErrBroken is returned by every call after a write or sync of the
	// Store's files failed: what is on disk may differ from what the Store
	// holds in memory. Close the Store and Open it again; Open recovers.
	ErrBroken = errors.New("snapshot: store broken by an earlier I/O error")
	ErrClosed = errors.New("snapshot: store closed")
	// ErrNotFound is a point ID the Store does not hold.
	ErrNotFound = errors.New("snapshot: no such recovery point")
	// ErrBusy: a Rollback while views are open, or a view during a Rollback.
	ErrBusy = errors.New("snapshot: busy")
	// ErrOutOfRange is a range beyond the end of a disk.
	ErrOutOfRange = errors.New("snapshot: range beyond the end of the disk")
	// ErrMismatch: the configured disks are not those the points were
	// taken of.
	ErrMismatch = errors.New("snapshot: disks differ from the recovery points'")
	// ErrConfig is an invalid Config.
	ErrConfig = errors.New("snapshot: invalid configuration")
)

const (
	manifestFile = "manifest"
	intentFile   = "rollback"
	// batchBlocks is how many blocks BeforeWrite reads and appends at once.
	batchBlocks = 64
)

func join(elem ...string) string { return filepath.Join(elem...) }

// Disk is one disk of the VM.
type Disk struct {
	Name string
	Size int64  // bytes; fixed for the life of the points
	Path string // the replica image
}

// Config configures a Store.
type Config struct {
	// FS does all file I/O; nil is the real filesystem.
	FS vfs.FS
	// Dir holds the VM's recovery points (manifest, segments, intent).
	Dir string
	// Disks are the VM's disks, in the order the disk indexes refer to.
	Disks []Disk
	// Logger; nil discards.
	Logger *slog.Logger
}

// Point is a recovery point: the VM's disks as they were at a cycle's
// barrier.
type Point struct {
	ID            string // the cycle number in decimal
	Cycle         uint64
	Time          time.Time // the barrier's time (when the cycle was sealed)
	AppConsistent bool
	// Bytes is the undo data recovering the point needs: its segment and
	// every newer one.
	Bytes int64
	// OwnBytes is its own segment: what pruning it frees once it is the
	// oldest.
	OwnBytes int64
}

// point is a Point in memory, with the segment that starts at it.
type point struct {
	cycle  uint64
	sealed time.Time
	app    bool
	seg    *segment
}

func (p *point) id() string { return strconv.FormatUint(p.cycle, 10) }

// Store holds the recovery points of one VM. See the package documentation.
type Store struct {
	fs    vfs.FS
	dir   string
	disks []Disk
	log   *slog.Logger

	// writeMu serialises everything that writes the Store's files or the
	// images: BeforeWrite, BeforeZero, Sync, Cycle, Prune, Rollback, Close.
	writeMu sync.Mutex
	// Guarded by writeMu.
	man    manifest // as last written
	synced int64    // bytes of the open segment known durable
	last   uint64   // the newest cycle recorded
	images []vfs.File

	// mu guards the fields below and the segments' size and idx; writers
	// of those hold writeMu too, so holders of writeMu may read them
	// without mu.
	mu     sync.RWMutex
	points []*point // oldest first; the newest one's segment is open
	views  map[uint64]int
	busy   bool  // a Rollback runs: no new views
	err    error // set once broken
	closed bool
}

// Open opens the recovery points in cfg.Dir, creating the directory if
// needed. It recovers from a crash: a rollback whose intent is durable is
// finished, the torn tail of the open segment is cut, files no manifest
// names are removed, and every record is verified while the index is
// rebuilt.
func Open(cfg Config) (*Store, error) {
	if cfg.Dir == "" || len(cfg.Disks) == 0 || len(cfg.Disks) > maxDisks {
		return nil, fmt.Errorf("%w: need a directory and 1 to %d disks", ErrConfig, maxDisks)
	}
	sizes := make([]int64, len(cfg.Disks))
	for i, d := range cfg.Disks {
		if d.Size < 0 || blocks(d.Size) > maxBlock || d.Path == "" {
			return nil, fmt.Errorf("%w: disk %d (%q): size %d, path %q", ErrConfig, i, d.Name, d.Size, d.Path)
		}
		sizes[i] = d.Size
	}
	s := &Store{
		fs:    cfg.FS,
		dir:   cfg.Dir,
		disks: slices.Clone(cfg.Disks),
		log:   cfg.Logger,
		views: map[uint64]int{},
	}
	if s.fs == nil {
		s.fs = vfs.Default
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := mkdirDurable(s.fs, s.dir); err != nil {
		return nil, fmt.Errorf("snapshot: %s: %w", s.dir, err)
	}
	if err := s.load(sizes); err != nil {
		s.closeFiles()
		return nil, err
	}
	return s, nil
}

func (s *Store) load(sizes []int64) error {
	b, err := vfs.ReadFile(s.fs, join(s.dir, manifestFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		s.man = manifest{NextSeg: 1, Disks: sizes}
	case err != nil:
		return fmt.Errorf("snapshot: %w", err)
	default:
		m, err := decodeManifest(b)
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrCorrupt, join(s.dir, manifestFile), err)
		}
		if !slices.Equal(m.Disks, sizes) {
			if len(m.Points) > 0 {
				return fmt.Errorf("%w: points taken of disks of sizes %v, configured %v", ErrMismatch, m.Disks, sizes)
			}
			m.Disks = sizes // no point depends on them; the next manifest says the new ones
		}
		s.man = *m
	}
	for _, d := range s.disks {
		f, err := s.fs.OpenFile(d.Path, os.O_RDONLY, 0)
		if err != nil {
			return fmt.Errorf("snapshot: image of disk %q: %w", d.Name, err)
		}
		s.images = append(s.images, f)
	}
	for _, mp := range s.man.Points {
		seg, err := s.loadSegment(mp.Seg, mp.Cycle, mp.Closed)
		if err != nil {
			return err
		}
		s.points = append(s.points, &point{cycle: mp.Cycle, sealed: mp.Sealed, app: mp.App, seg: seg})
	}
	if n := len(s.points); n > 0 {
		s.synced = s.points[n-1].seg.size
		s.last = s.points[n-1].cycle
	}
	if err := s.removeOrphans(); err != nil {
		return err
	}
	return s.recoverRollback()
}

// removeOrphans removes what a crash left behind: segment files no manifest
// names (created for a point whose manifest was never written, or pruned
// before their removal) and temporary files. Other names are left alone.
func (s *Store) removeOrphans() error {
	names, err := s.fs.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	keep := map[uint64]bool{}
	for _, p := range s.man.Points {
		keep[p.Seg] = true
	}
	removed := 0
	for _, name := range names {
		no, isSeg := parseSegName(name)
		if (!isSeg || keep[no]) && !strings.HasSuffix(name, ".tmp") {
			continue
		}
		if err := s.fs.Remove(join(s.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("snapshot: remove leftover %s: %w", name, err)
		}
		s.log.Info("removed a leftover recovery point file", "file", join(s.dir, name))
		removed++
	}
	if removed > 0 {
		if err := s.fs.SyncDir(s.dir); err != nil {
			return fmt.Errorf("snapshot: %w", err)
		}
	}
	return nil
}

// check returns the error a call gets on a closed or broken Store. Caller
// holds writeMu or mu.
func (s *Store) check() error {
	switch {
	case s.closed:
		return ErrClosed
	case s.err != nil:
		return fmt.Errorf("%w: %w", ErrBroken, s.err)
	}
	return nil
}

// broken records an I/O error after which disk and memory may disagree and
// returns it. Caller holds writeMu.
func (s *Store) broken(err error) error {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	return err
}

// open returns the open segment, nil when there are no points. Caller
// holds writeMu or mu.
func (s *Store) open() *segment {
	if len(s.points) == 0 {
		return nil
	}
	return s.points[len(s.points)-1].seg
}

// BeforeWrite saves, for the newest point, the current content of every
// block of [off, off+n) of disk that changes for the first time since that
// point. It must be called, and must return nil, before anything overwrites
// that range of the image (data, trim or zero); the saved data is durable
// at the next Sync, which must come before the image is written. With no
// points it does nothing.
func (s *Store) BeforeWrite(disk int, off, n int64) error {
	return s.before(disk, off, n, false)
}

// BeforeZero is BeforeWrite for a range about to be trimmed or zeroed: a
// block that already reads as zeroes does not change, so it is not saved.
func (s *Store) BeforeZero(disk int, off, n int64) error {
	return s.before(disk, off, n, true)
}

func (s *Store) before(disk int, off, n int64, zeroing bool) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	if err := s.checkRange(disk, off, n); err != nil {
		return err
	}
	seg := s.open()
	if seg == nil || n == 0 {
		return nil
	}
	first, last := off/BlockSize, (off+n-1)/BlockSize
	held := func(b int64) bool {
		_, ok := seg.idx.get(blockKey(disk, b))
		return ok
	}
	for b := first; b <= last; {
		if held(b) {
			b++
			continue
		}
		e := b + 1
		for e <= last && e-b < batchBlocks && !held(e) {
			e++
		}
		if err := s.save(seg, disk, b, e, zeroing); err != nil {
			return err
		}
		b = e
	}
	return nil
}

func (s *Store) checkRange(disk int, off, n int64) error {
	if disk < 0 || disk >= len(s.disks) {
		return fmt.Errorf("%w: disk %d of %d", ErrOutOfRange, disk, len(s.disks))
	}
	if size := s.disks[disk].Size; off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: [%d, +%d) on disk %q of %d bytes", ErrOutOfRange, off, n, s.disks[disk].Name, size)
	}
	return nil
}

// save appends records of blocks [b, e) of disk, none held by seg, with
// their current image content, then indexes them. zeroing skips blocks that
// read as zeroes. Caller holds writeMu.
func (s *Store) save(seg *segment, disk int, b, e int64, zeroing bool) error {
	img := make([]byte, (e-b)*BlockSize)
	if err := s.readImage(disk, img, b*BlockSize); err != nil {
		return err
	}
	recs := make([]byte, 0, (e-b)*dataRecordSize)
	var added []entry
	for i := range e - b {
		data := img[i*BlockSize : (i+1)*BlockSize]
		zero := allZero(data)
		if zero && zeroing {
			continue
		}
		off := seg.size + int64(len(recs))
		h := recHeader{Kind: kindData, Disk: uint16(disk), Block: uint64(b + i), Synced: s.synced, Salt: seg.salt}
		l := dataLoc(off)
		if zero {
			h.Kind, l = kindZero, zeroLoc(off)
		} else {
			h.DCRC = crc(data)
		}
		var hb [recHeaderSize]byte
		encodeRecHeader(hb[:], &h)
		recs = append(recs, hb[:]...)
		if !zero {
			recs = append(recs, data...)
		}
		added = append(added, entry{blockKey(disk, b+i), l})
	}
	if len(recs) == 0 {
		return nil
	}
	if _, err := seg.f.WriteAt(recs, seg.size); err != nil {
		return s.broken(fmt.Errorf("snapshot: append to %s: %w", seg.path, err))
	}
	// Indexed only once the records are in the file: a view that finds a
	// block here can read it (see View.ReadAt).
	s.mu.Lock()
	for _, a := range added {
		seg.idx.put(a.key, a.loc)
	}
	seg.size += int64(len(recs))
	s.mu.Unlock()
	return nil
}

// readImage reads the image of disk at off into b; what lies past the end of
// the disk or the file reads as zeroes.
func (s *Store) readImage(disk int, b []byte, off int64) error {
	n := min(int64(len(b)), max(0, s.disks[disk].Size-off))
	got, err := s.images[disk].ReadAt(b[:n], off)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("snapshot: read image of disk %q: %w", s.disks[disk].Name, err)
	}
	clear(b[got:])
	return nil
}

// Sync makes the undo data saved by BeforeWrite and BeforeZero durable.
func (s *Store) Sync() error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	return s.syncOpen()
}

// syncOpen syncs the open segment. Caller holds writeMu.
func (s *Store) syncOpen() error {
	seg := s.open()
	if seg == nil || s.synced == seg.size {
		return nil
	}
	if err := seg.f.Sync(); err != nil {
		return s.broken(fmt.Errorf("snapshot: sync %s: %w", seg.path, err))
	}
	s.synced = seg.size
	return nil
}

// Cycle records that cycle c, whose barrier was sealed at sealed, is fully
// applied and durable in the images. With takePoint, cycle c becomes a
// recovery point: the open segment is closed and a new one starts at c,
// recorded in the manifest before Cycle returns. A cycle older than the
// newest one recorded is a repeat (apply redone after a crash) and changes
// nothing; so is the newest one unless it becomes a point now (the images
// still hold it: a test failover of the latest state makes it a point).
func (s *Store) Cycle(c uint64, sealed time.Time, appConsistent, takePoint bool) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	if c < s.last || c == s.last && (!takePoint || s.newestPoint() == c) {
		return nil
	}
	sealed = fromUnixNano(unixNano(sealed)) // as the manifest keeps it
	if !takePoint {
		s.last = c
		return nil
	}
	if err := s.syncOpen(); err != nil {
		return err
	}
	m := s.man
	m.Points = slices.Clone(m.Points)
	if n := len(m.Points); n > 0 {
		m.Points[n-1].Closed = s.open().size
	}
	no := m.NextSeg
	seg, err := createSegment(s.fs, s.dir, no, c, len(s.disks), rand.Uint32())
	if err != nil {
		// The manifest does not name it: a leftover Open removes.
		return s.broken(fmt.Errorf("snapshot: create segment for cycle %d: %w", c, err))
	}
	m.Seq++
	m.NextSeg++
	m.Points = append(m.Points, manPoint{Seg: no, Cycle: c, Sealed: sealed, App: appConsistent})
	if err := s.writeManifest(&m); err != nil {
		seg.f.Close()
		return s.broken(err)
	}
	var frozen index
	if old := s.open(); old != nil {
		frozen = old.idx.frozen()
	}
	s.mu.Lock()
	if old := s.open(); old != nil {
		old.idx = frozen
	}
	s.points = append(s.points, &point{cycle: c, sealed: sealed, app: appConsistent, seg: seg})
	s.mu.Unlock()
	s.man = m
	s.synced = seg.size
	s.last = c
	s.log.Info("recovery point taken", "cycle", c, "sealed", sealed, "app_consistent", appConsistent)
	return nil
}

// newestPoint is the cycle of the newest point, 0 with none. Caller holds
// writeMu or mu.
func (s *Store) newestPoint() uint64 {
	if n := len(s.points); n > 0 {
		return s.points[n-1].cycle
	}
	return 0
}

func (s *Store) writeManifest(m *manifest) error {
	if err := vfs.WriteFileAtomic(s.fs, join(s.dir, manifestFile), encodeManifest(m), 0o600); err != nil {
		return fmt.Errorf("snapshot: write manifest: %w", err)
	}
	return nil
}

// Points lists the recovery points, oldest first. The latest state (the
// images) is not one of them.
func (s *Store) Points() []Point {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Point, len(s.points))
	var need int64
	for i := len(s.points) - 1; i >= 0; i-- {
		p := s.points[i]
		need += p.seg.size
		out[i] = Point{ID: p.id(), Cycle: p.cycle, Time: p.sealed, AppConsistent: p.app, Bytes: need, OwnBytes: p.seg.size}
	}
	return out
}

// Prune keeps the newest keep points and drops the older ones with their
// segments. A point with an open view, and every newer one, is kept; a later
// Prune drops it once the view is closed.
func (s *Store) Prune(keep int) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.check(); err != nil {
		return err
	}
	s.mu.RLock()
	drop := 0
	for drop < len(s.points)-max(keep, 0) && s.views[s.points[drop].seg.no] == 0 {
		drop++
	}
	s.mu.RUnlock()
	if drop == 0 {
		return nil
	}
	m := s.man
	m.Seq++
	m.Points = slices.Clone(m.Points[drop:])
	if err := s.writeManifest(&m); err != nil {
		return s.broken(err)
	}
	s.man = m
	s.mu.Lock()
	gone := slices.Clone(s.points[:drop])
	s.points = slices.Delete(s.points, 0, drop)
	s.mu.Unlock()
	if len(s.points) == 0 {
		s.synced = 0
	}
	s.removeSegments(gone)
	for _, p := range gone {
		s.log.Info("recovery point pruned", "cycle", p.cycle)
	}
	return nil
}

// removeSegments closes and removes the segments of points the manifest no
// longer lists. A failure is only logged: Open removes leftovers.
func (s *Store) removeSegments(gone []*point) {
	for _, p := range gone {
		p.seg.f.Close()
		if err := s.fs.Remove(p.seg.path); err != nil {
			s.log.Warn("remove pruned undo segment", "segment", p.seg.path, "err", err)
		}
	}
	if err := s.fs.SyncDir(s.dir); err != nil {
		s.log.Warn("sync recovery point directory", "dir", s.dir, "err", err)
	}
}

// Close closes the Store's files. Views of it fail afterwards. It is
// idempotent.
func (s *Store) Close() error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.closeFiles()
}

func (s *Store) closeFiles() error {
	var errs []error
	for _, p := range s.points {
		errs = append(errs, p.seg.f.Close())
	}
	for _, f := range s.images {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// mkdirDurable creates dir and its missing parents and makes their names
// durable.
func mkdirDurable(fsys vfs.FS, dir string) error {
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := fsys.Stat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		if filepath.Dir(d) == d {
			break
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if err := fsys.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, d := range missing {
		if err := fsys.SyncDir(filepath.Dir(d)); err != nil {
			return err
		}
	}
	return nil
}
