package journal

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// BlockSize is the journal's unit of tracking: the index, the coalescing of a
// cycle and the dirty map all work on 4 KiB blocks. Writes that are not aligned
// to it are widened by read-modify-write under the block's stripe lock.
const BlockSize = 4096

const (
	defaultSegmentSize   = 64 << 20
	defaultSyncInterval  = time.Second
	defaultCheckpointInt = 5 * time.Second
	checkpointBytes      = 256 << 20
	stripeRegion         = 1 << 20 // bytes of disk one stripe lock covers
	numStripes           = 512
)

// Errors returned by the journal.
var (
	ErrOutOfRange = errors.New("journal: request out of range")
	ErrClosed     = errors.New("journal: closed")
	// ErrFailed wraps the I/O error that stopped the journal; every later
	// write and flush fails with it until the journal is reopened.
	ErrFailed = errors.New("journal: failed")
	// ErrUnknownCycle is for a cycle that is not closed or already released.
	ErrUnknownCycle = errors.New("journal: unknown cycle")
)

// DiskSpec names one disk of the VM and its raw image.
type DiskSpec struct {
	Name string
	Path string // the raw image; must exist with Size bytes
	Size int64
}

// Config of a Journal.
type Config struct {
	FS    vfs.FS // nil = the real filesystem
	Dir   string // the VM's journal directory
	Disks []DiskSpec
	// Cap bounds the bytes of journal kept for unshipped cycles; 0 means half
	// the VM's total disk size. Passing it switches the VM to dirty-block
	// tracking (resync required); guest writes never fail because of it.
	Cap int64
	// Retain keeps sealed cycles until Release (replication is enabled).
	// Without it sealed cycles are released at once.
	Retain bool
	// IndexDir is where the Badger cycle index lives; "" keeps it in memory.
	IndexDir     string
	SegmentSize  int64         // default 64 MiB
	SyncInterval time.Duration // journal syncs itself this often; default 1s
	// CheckpointInterval bounds how long written-back data waits for an image
	// sync and checkpoint; default 5s.
	CheckpointInterval time.Duration
	// NoBlockTree: the journal keeps no block tree (BlockTree returns
	// nil, RootsAt nil, WaitWrittenBack still works). Only for benchmarks
	// that measure what the tree costs (bench/fio.sh): a tree left in
	// IndexDir is marked dirty, so that the next Open with a tree
	// rebuilds it from the images.
	NoBlockTree bool
	Logger      *slog.Logger
	Now         func() time.Time
}

// Journal is the write path of one VM: every write, trim and zero of any of its
// disks is appended to the journal before it is acknowledged, and reaches the
// image only after the journal holding it is synced (write-back). So the image
// never holds a write the journal lacks, even after a power cut.
//
// A Journal is safe for concurrent use. Its fields are grouped by what guards
// them: those set by Open and only read after it; those safe for concurrent
// use by themselves; the locks that serialise an operation and guard no field
// (sealMu, ckptMu, dirtyMu, syncMu, segMu); wb, the write-back's lock with
// the buffer it guards; and mu with everything else, which is most of the
// state. A goroutine holding one lock takes only locks later in this order
// (see the package doc):
//
//	stripes (ascending), sealMu, wb or ckptMu (never both), dirtyMu,
//	syncMu, segMu, mu
type Journal struct {
	// Set by Open, read-only after it.
	cfg    Config // cfg.Retain is only the initial mu.retain
	fs     vfs.FS
	log    *slog.Logger
	images []vfs.File
	disks  []*Disk
	cycles *cycleStore // Badger is safe for concurrent use
	// tree is the images' block-hash tree, in cycles' database; it is
	// safe for concurrent use, and only changed under wb (tree.go). Nil
	// with Config.NoBlockTree.
	tree      *blocktree.Tree
	treeReset bool // Open found the tree reset: it is being rebuilt
	// directMin is the smallest write payload appended with O_DIRECT
	// (directAppendMin; tests lower it to drive small writes that way).
	directMin int
	// scanned, if set (tests), runs in ChangedSince after the cycle store
	// was scanned, where a Release may come.
	scanned func()

	// Safe for concurrent use by themselves.
	npending atomic.Int64 // len(mu.pending): changed under mu, read without it
	ckptBusy atomic.Bool  // the background's checkpoint is running
	kick     chan struct{}
	stop     chan struct{}
	wg       sync.WaitGroup
	bufPool  sync.Pool

	// Locks that serialise an operation and guard no field of their own.
	stripes [numStripes]sync.Mutex // writes to overlapping 1 MiB regions of a disk
	sealMu  sync.Mutex             // one seal, resync step or switch to dirty tracking
	ckptMu  sync.Mutex             // one checkpoint at a time
	dirtyMu sync.Mutex             // writes and removal of the dirty map file
	syncMu  sync.Mutex             // one journal sync at a time; callers share it
	segMu   sync.RWMutex           // readers of segment files vs closing them

	// wb is held by the write-back and by anything else that changes the
	// images (rangeOp).
	wb struct {
		sync.Mutex
		buf     []byte // aligned buffer for direct write-back (alignedBuf)
		treeBuf []byte // the tree build's read buffer, while it builds
		// repair is where repairTree stands: disk and leaf, and leaves
		// seen since it last found an Unknown one; stuck, per disk, the
		// Unknown count a whole walk found no leaf for.
		repair struct {
			disk       int
			leaf, idle int64
			stuck      map[int]int64
		}
	}

	mu struct {
		sync.Mutex
		// cond is signalled when an append leaves flight, a sync ends, a
		// kept buffer is given back, or the journal fails or closes.
		cond   *sync.Cond
		failed error // sticky: see failLocked
		closed bool

		// The log.
		head     uint64 // next LSN to hand out
		segs     []*segment
		free     []string // recycled segment files, ready for reuse
		freeSeq  int
		inflight map[uint64]struct{} // reserved LSNs whose write has not returned
		synced   uint64              // journal durable through this LSN
		lastSync time.Time

		// Cycles and resync.
		retain     bool                   // keep cycles for shipping (Config.Retain, SetRetain)
		cycle      uint64                 // the open cycle
		cycleStart uint64                 // LSN where the open cycle began
		open       map[uint64]*cycleIndex // cycles whose index is still in memory
		written    map[uint64]int64       // bytes written per open cycle, kept or not
		closedC    []CycleInfo            // sealed, indexed, not released
		released   uint64                 // cycles <= released are gone
		dirty      *dirtyMap              // non-nil: resync required, writes tracked as dirty blocks
		resyncBase uint64                 // non-zero: a resync from this barrier cycle is under way
		resyncNext bool                   // the next seal is a resync barrier
		cutting    bool                   // a switch to dirty tracking is under way
		cutReason  string                 // why, when not the cap
		// resyncReason says why dirty is set, when known (enterDirty,
		// keepCutWrite); "" after a restart that found only the map.
		resyncReason string

		// The write-back.
		pending       map[uint64]uint64 // block key -> data LSN newer than the image
		queue         []queued          // records awaiting write-back, in LSN order
		retained      int               // bytes of queued direct-append buffers (queued.buf)
		retainLimit   int               // budget of retained: retainMax (tests change it)
		retainWaiters int               // appends waiting in waitRetainLocked
		applied       uint64            // every record below it is in the image (maybe unsynced)
		ckpt          checkpoint        // the last checkpoint written

		// The block tree's barriers (tree.go).
		tree struct {
			// sealed is the newest cycle whose seal is durable: every
			// record of it is in the queue or written back.
			sealed uint64
			// through is the newest barrier the write-back has passed
			// with the tree: every record of cycles <= through is in
			// the images and the tree.
			through uint64
			// atBarrier: the tree stands at barrier through, no record
			// of a later cycle in it yet.
			atBarrier bool
			// roots at barriers, the last rootsKept of them; a barrier
			// passed while the tree did not know its roots has none.
			roots map[uint64][]blocktree.Root
		}
	}
}

type queued struct {
	h       Header
	eager   bool // a trim/zero the caller applies itself
	applied bool
	// buf, if not nil, is the aligned buffer a direct append wrote the
	// record from (payload at DirectAlign): the write-back takes the data
	// from it instead of reading the journal back.
	buf []byte
	// hashes of a write record's blocks (blocktree.HashBlocks of its
	// payload), taken at append time from the bytes its CRC32C was taken
	// from; nil without a tree. The write-back commits them to the tree.
	hashes []blocktree.Hash
}

// Open recovers the journal in cfg.Dir (repairing a torn tail, refusing
// corruption), replays every record the images lack, and starts the
// background sync and write-back.
func Open(cfg Config) (*Journal, error) {
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.SegmentSize <= 0 {
		cfg.SegmentSize = defaultSegmentSize
	}
	if cfg.SegmentSize < segmentHeaderSize+HeaderSize+MaxPayload {
		cfg.SegmentSize = segmentHeaderSize + HeaderSize + MaxPayload
	}
	if cfg.SyncInterval <= 0 {
		cfg.SyncInterval = defaultSyncInterval
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = defaultCheckpointInt
	}
	if len(cfg.Disks) == 0 || len(cfg.Disks) > 1<<16-1 {
		return nil, fmt.Errorf("journal: %d disks (want 1..65535)", len(cfg.Disks))
	}
	if cfg.Cap <= 0 {
		var total int64
		for _, d := range cfg.Disks {
			total += d.Size
		}
		cfg.Cap = max(total/2, 2*cfg.SegmentSize)
	}
	j := &Journal{
		cfg:       cfg,
		fs:        cfg.FS,
		log:       cfg.Logger,
		kick:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		directMin: directAppendMin,
	}
	j.mu.cond = sync.NewCond(&j.mu.Mutex)
	j.mu.inflight = make(map[uint64]struct{})
	j.mu.open = make(map[uint64]*cycleIndex)
	j.mu.written = make(map[uint64]int64)
	j.mu.pending = make(map[uint64]uint64)
	j.mu.retain = cfg.Retain
	j.mu.retainLimit = retainMax
	if err := j.fs.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	// The directory's own name must be durable before anything in it is.
	if err := j.fs.SyncDir(path.Dir(cfg.Dir)); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	for i, d := range cfg.Disks {
		if d.Size <= 0 || d.Size%BlockSize != 0 {
			j.closeFiles()
			return nil, fmt.Errorf("journal: disk %s: size %d is not a positive multiple of %d", d.Name, d.Size, BlockSize)
		}
		f, err := j.fs.OpenFile(d.Path, os.O_RDWR, 0)
		if err != nil {
			j.closeFiles()
			return nil, fmt.Errorf("journal: disk %s: %w", d.Name, err)
		}
		j.images = append(j.images, f)
		if sz, err := f.Size(); err != nil || sz != d.Size {
			j.closeFiles()
			if err == nil {
				err = fmt.Errorf("image is %d bytes, want %d", sz, d.Size)
			}
			return nil, fmt.Errorf("journal: disk %s: %w", d.Name, err)
		}
		j.disks = append(j.disks, &Disk{j: j, idx: i, size: d.Size})
	}
	var err error
	if j.cycles, err = openCycleStore(cfg.IndexDir); err != nil {
		j.closeFiles()
		return nil, err
	}
	if err := j.openTree(); err != nil {
		j.closeFiles()
		j.cycles.close()
		return nil, err
	}
	if err := j.recover(); err != nil {
		j.closeFiles()
		j.cycles.close()
		return nil, err
	}
	j.mu.lastSync = cfg.Now()
	j.wg.Add(1)
	go j.background()
	j.kickWriteBack() // builds the tree if it is not built
	return j, nil
}

// Disk returns the i-th disk of the VM as a block device.
func (j *Journal) Disk(i int) *Disk { return j.disks[i] }

// Disks returns all disks of the VM.
func (j *Journal) Disks() []*Disk { return j.disks }

// Close syncs the journal, writes back and checkpoints everything, and closes
// the files. It is idempotent.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.mu.closed {
		j.mu.Unlock()
		return nil
	}
	j.mu.closed = true
	j.mu.cond.Broadcast()
	j.mu.Unlock()
	close(j.stop)
	j.wg.Wait()
	var err error
	if j.failedErr() == nil {
		err = j.syncTo(j.headLSN())
		if err == nil {
			err = j.writeBack()
		}
		if err == nil {
			err = j.checkpoint(true)
		}
	}
	j.closeFiles()
	if cerr := j.cycles.close(); err == nil {
		err = cerr
	}
	// A failed journal still holds the buffers of records it did not
	// write back; they belong to a pool shared by every journal.
	j.mu.Lock()
	for i := range j.mu.queue {
		j.releaseKeptLocked(j.mu.queue[i].buf)
		j.mu.queue[i].buf = nil
	}
	j.mu.Unlock()
	return err
}

func (j *Journal) closeFiles() {
	for _, f := range j.images {
		f.Close()
	}
	for _, s := range j.mu.segs {
		s.f.Close()
	}
}

// maxFree is how many removed segments are kept for reuse.
const maxFree = 4

func (j *Journal) popFreeLocked() string {
	if len(j.mu.free) == 0 {
		return ""
	}
	f := j.mu.free[len(j.mu.free)-1]
	j.mu.free = j.mu.free[:len(j.mu.free)-1]
	return f
}

func (j *Journal) headLSN() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.mu.head
}

func (j *Journal) failedErr() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.mu.failed
}

// failLocked stops the journal after an I/O error: a record may be missing
// from the middle of the log, so nothing after it may be called durable.
func (j *Journal) failLocked(err error) error {
	if j.mu.failed == nil {
		j.mu.failed = fmt.Errorf("%w: %w", ErrFailed, err)
		j.log.Error("journal failed; writes and flushes now fail until restart", "err", err)
	}
	j.mu.cond.Broadcast()
	return j.mu.failed
}

func blockKey(disk int, block uint64) uint64 { return uint64(disk)<<48 | block }

// lockRange takes the stripe locks covering [off, off+n) of disk, in order.
func (j *Journal) lockRange(disk int, off, n int64) func() {
	first := off / stripeRegion
	last := (off + max(n, 1) - 1) / stripeRegion
	var idx []int
	if last-first+1 >= numStripes {
		idx = make([]int, numStripes)
		for i := range idx {
			idx[i] = i
		}
	} else {
		idx = make([]int, 0, last-first+1)
		for r := first; r <= last; r++ {
			idx = append(idx, int((uint64(r)*0x9E3779B97F4A7C15+uint64(disk))%numStripes))
		}
		slices.Sort(idx)
		idx = slices.Compact(idx)
	}
	for _, s := range idx {
		j.stripes[s].Lock()
	}
	return func() {
		for i := len(idx) - 1; i >= 0; i-- {
			j.stripes[idx[i]].Unlock()
		}
	}
}

func (j *Journal) getBuf(n int) []byte {
	if b, ok := j.bufPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return make([]byte, n, max(n, 64<<10+HeaderSize))
}

func (j *Journal) putBuf(b []byte) {
	if cap(b) <= 4<<20+HeaderSize {
		j.bufPool.Put(&b)
	}
}

// reserveLocked hands out LSNs for a record of n bytes, starting a new segment
// when the active one is full. The record is marked in flight.
func (j *Journal) reserveLocked(n int64) (uint64, *segment, error) {
	if j.mu.failed != nil {
		return 0, nil, j.mu.failed
	}
	if j.mu.closed {
		return 0, nil, ErrClosed
	}
	active := j.mu.segs[len(j.mu.segs)-1]
	if j.mu.head+uint64(n) > active.base+uint64(j.cfg.SegmentSize) {
		var err error
		if active, err = j.newSegmentLocked(); err != nil {
			return 0, nil, err
		}
	}
	lsn := j.mu.head
	j.mu.head += uint64(n)
	j.mu.inflight[lsn] = struct{}{}
	return lsn, active, nil
}

// newSegmentLocked starts a new active segment at the head.
func (j *Journal) newSegmentLocked() (*segment, error) {
	seg, err := createSegment(j.fs, j.cfg.Dir, j.mu.head, j.cfg.Now().UnixNano(), j.popFreeLocked(), j.cfg.SegmentSize)
	if err != nil {
		return nil, j.failLocked(err)
	}
	j.mu.segs = append(j.mu.segs, seg)
	j.mu.head += segmentHeaderSize
	return seg, nil
}

// appendRecord writes one record and returns its header. The caller holds the
// stripe locks of the range. index runs under mu after the write succeeded.
func (j *Journal) appendRecord(h Header, payload []byte, index func(h *Header)) (Header, error) {
	size := HeaderSize + int64(len(payload))
	buf := j.getBuf(int(size))
	defer j.putBuf(buf)
	copy(buf[HeaderSize:], payload)
	h.DCRC = crc(payload)

	j.mu.Lock()
	lsn, seg, err := j.reserveLocked(size)
	if err != nil {
		j.mu.Unlock()
		return h, err
	}
	h.Cycle = j.mu.cycle
	if h.Kind == KindSeal {
		j.mu.cycle++ // the cut: later records belong to the next cycle
		if j.mu.resyncNext {
			// BeginResync: from the next cycle on, cycles are kept even
			// though the dirty map is still in place.
			j.mu.resyncBase, j.mu.resyncNext = h.Cycle, false
		}
	}
	h.LSN, h.Synced = lsn, j.mu.synced
	j.mu.Unlock()

	encodeHeader(buf, &h)
	_, werr := seg.f.WriteAt(buf, int64(lsn-seg.base))

	j.mu.Lock()
	defer j.mu.Unlock()
	return h, j.appendedLocked(lsn, seg, werr, &h, index)
}

// appendedLocked ends an append that reserved [start, ...) of seg: it is
// no longer in flight, and unless the write failed (which fails the
// journal) or the journal failed meanwhile, index runs. Caller holds mu.
func (j *Journal) appendedLocked(start uint64, seg *segment, werr error, h *Header, index func(h *Header)) error {
	delete(j.mu.inflight, start)
	j.mu.cond.Broadcast()
	if werr != nil {
		return j.failLocked(fmt.Errorf("append to %s: %w", seg.name, werr))
	}
	if j.mu.failed != nil {
		return j.mu.failed
	}
	if index != nil {
		index(h)
	}
	return nil
}

// Flush makes every record appended before it was called durable. Concurrent
// flushes share one sync.
func (j *Journal) Flush() error { return j.syncTo(j.headLSN()) }

// syncTo makes the journal durable through at least target.
func (j *Journal) syncTo(target uint64) error {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	j.mu.Lock()
	if j.mu.failed != nil {
		defer j.mu.Unlock()
		return j.mu.failed
	}
	if j.mu.synced >= target {
		j.mu.Unlock()
		return nil
	}
	upTo := j.mu.head
	// Records below upTo must all be written before the sync, or a crash
	// could keep a later record and lose an earlier one it was promised with.
	for j.mu.failed == nil && j.inflightBelow(upTo) {
		j.mu.cond.Wait()
	}
	if j.mu.failed != nil {
		defer j.mu.Unlock()
		return j.mu.failed
	}
	var toSync []*segment
	for i := len(j.mu.segs) - 1; i >= 0; i-- {
		toSync = append(toSync, j.mu.segs[i])
		if j.mu.segs[i].base <= j.mu.synced {
			break
		}
	}
	j.mu.Unlock()

	j.segMu.RLock()
	var err error
	for _, s := range toSync {
		if err = s.f.Sync(); err != nil {
			err = fmt.Errorf("sync %s: %w", s.name, err)
			break
		}
	}
	j.segMu.RUnlock()

	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		return j.failLocked(err)
	}
	if upTo > j.mu.synced {
		j.mu.synced = upTo
	}
	j.mu.lastSync = j.cfg.Now()
	j.mu.cond.Broadcast()
	j.kickWriteBack()
	return nil
}

func (j *Journal) inflightBelow(lsn uint64) bool {
	for l := range j.mu.inflight {
		if l < lsn {
			return true
		}
	}
	return false
}

func (j *Journal) kickWriteBack() {
	select {
	case j.kick <- struct{}{}:
	default:
	}
}

// segmentFor returns the segment holding lsn. Caller holds mu.
func (j *Journal) segmentFor(lsn uint64) *segment {
	i := sort.Search(len(j.mu.segs), func(i int) bool { return j.mu.segs[i].base > lsn }) - 1
	if i < 0 {
		return nil
	}
	return j.mu.segs[i]
}

// readJournal reads journal bytes at lsn. Caller holds segMu for reading.
func (j *Journal) readJournal(p []byte, lsn uint64) error {
	j.mu.Lock()
	seg := j.segmentFor(lsn)
	j.mu.Unlock()
	if seg == nil {
		return fmt.Errorf("journal: no segment holds LSN %#x", lsn)
	}
	_, err := seg.f.ReadAt(p, int64(lsn-seg.base))
	return err
}

// readImage reads the image, treating bytes past its end as zeroes.
func readImage(f vfs.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	return err
}

// readAt reads disk bytes: blocks newer in the journal than in the image come
// from the journal.
func (j *Journal) readAt(disk int, p []byte, off int64) error {
	if j.npending.Load() == 0 {
		return readImage(j.images[disk], p, off)
	}
	type piece struct {
		dst []byte
		lsn uint64 // 0: from the image at off
		off int64
	}
	j.segMu.RLock()
	defer j.segMu.RUnlock()
	var pieces []piece
	j.mu.Lock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		blk := uint64(pos / BlockSize)
		inBlk := pos % BlockSize
		n := min(int64(len(p)-done), BlockSize-inBlk)
		var lsn uint64
		if d, ok := j.mu.pending[blockKey(disk, blk)]; ok {
			lsn = d + uint64(inBlk)
		}
		if k := len(pieces) - 1; k >= 0 && (pieces[k].lsn == 0) == (lsn == 0) &&
			(lsn == 0 || pieces[k].lsn+uint64(len(pieces[k].dst)) == lsn) {
			pieces[k].dst = p[done-len(pieces[k].dst) : done+int(n)]
		} else {
			pieces = append(pieces, piece{dst: p[done : done+int(n)], lsn: lsn, off: pos})
		}
		done += int(n)
	}
	j.mu.Unlock()
	for _, pc := range pieces {
		var err error
		if pc.lsn == 0 {
			err = readImage(j.images[disk], pc.dst, pc.off)
		} else {
			err = j.readJournal(pc.dst, pc.lsn)
		}
		if err != nil {
			return fmt.Errorf("journal: read disk %d: %w", disk, err)
		}
	}
	return nil
}

// write journals data at a block-aligned or unaligned offset of disk.
func (j *Journal) write(disk int, p []byte, off int64) error {
	unlock := j.lockRange(disk, off, int64(len(p)))
	defer unlock()
	start := off &^ (BlockSize - 1)
	end := (off + int64(len(p)) + BlockSize - 1) &^ (BlockSize - 1)
	if start != off || end != off+int64(len(p)) {
		// Widen to whole blocks: the index tracks blocks, not sectors.
		buf := j.getBuf(int(end - start))
		defer j.putBuf(buf)
		if err := j.readAt(disk, buf[:BlockSize], start); err != nil {
			return err
		}
		if tail := end - BlockSize; tail > start {
			if err := j.readAt(disk, buf[tail-start:], tail); err != nil {
				return err
			}
		}
		copy(buf[off-start:], p)
		p, off = buf, start
	}
	for len(p) > 0 {
		n := min(len(p), MaxPayload)
		if err := j.appendWrite(disk, p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// appendPath is how a write record reaches its segment file. Which one a
// write takes is decided in one place, appendPathFor.
type appendPath int

const (
	// appendPlain copies header and payload into one pooled buffer and
	// writes it with a plain WriteAt (appendRecord): small writes, which
	// the page cache gathers.
	appendPlain appendPath = iota
	// appendCopyDirect copies a large payload into an aligned append buffer,
	// checksumming it on the way, and writes it with O_DIRECT behind a pad
	// record (appendDirect, see direct.go): the journal copy skips the page
	// cache, and the buffer can be kept for the write-back.
	appendCopyDirect
	// appendReceived writes with O_DIRECT straight from the append buffer a
	// front end received the payload into (Disk.ReceiveWrite,
	// appendDirectBuf): not even the copy into an aligned buffer is left.
	appendReceived
)

// appendPathFor decides how a write of n bytes at off is appended; received
// says its payload already lies in an append buffer (Disk.ReceiveWrite).
//
// A payload of at least directMin bytes goes with O_DIRECT: from the buffer
// it was received into if it can be appended from there as it is (on block
// boundaries and one record long), else copied into one. Smaller ones take
// the plain path. The two O_DIRECT paths still fall back to the plain one
// when the segment cannot take O_DIRECT writes (reserveDirectLocked).
func (j *Journal) appendPathFor(off int64, n int, received bool) appendPath {
	direct := n >= j.directMin
	switch {
	case received && direct && off%BlockSize == 0 && n%BlockSize == 0 && n <= MaxPayload:
		return appendReceived
	case direct:
		return appendCopyDirect
	default:
		return appendPlain
	}
}

// appendWrite journals a write of p at off, a whole number of blocks of at
// most MaxPayload bytes. The caller holds the range's stripe locks.
func (j *Journal) appendWrite(disk int, p []byte, off int64) error {
	return j.appendWriteVia(j.appendPathFor(off, len(p), false), disk, p, off, nil, 0, nil)
}

// appendWriteVia journals a write of p at off by path via. For
// appendReceived, buf is the append buffer p lies in, sum its checksum and
// hs its block hashes (taken as it arrived; nil without a tree), and buf
// is taken.
//
// The record's block hashes, for the tree, are taken here on the caller's
// goroutine from the front end's data (with the copy and checksum where
// there is one, while the piece is in the CPU cache) and queued with it:
// the write-back, a single goroutine that bounds a stream, only commits
// them.
func (j *Journal) appendWriteVia(via appendPath, disk int, p []byte, off int64, buf []byte, sum uint32, hs []blocktree.Hash) error {
	h := Header{Kind: KindWrite, Disk: uint16(disk), Offset: uint64(off), Length: uint64(len(p))}
	if j.tree != nil && via == appendPlain {
		hs = blocktree.HashBlocks(make([]blocktree.Hash, 0, len(p)/BlockSize), p)
	}
	index := func(h *Header) {
		first := uint64(off) / BlockSize
		nblk := (uint64(len(p)) + BlockSize - 1) / BlockSize
		ci := j.cycleIndexLocked(h.Cycle)
		for i := uint64(0); i < nblk; i++ {
			key := blockKey(disk, first+i)
			data := h.LSN + HeaderSize + i*BlockSize
			if _, ok := j.mu.pending[key]; !ok {
				j.npending.Add(1)
			}
			j.mu.pending[key] = data
			if ci != nil {
				ci.blocks[key] = data
			}
		}
		if ci != nil {
			ci.addRecord(h)
		}
		if j.mu.dirty != nil {
			j.mu.dirty.setRange(disk, off, int64(len(p)))
		}
		j.mu.written[h.Cycle] += int64(len(p))
		j.enqueueLocked(queued{h: *h, hashes: hs})
		j.checkCapLocked()
	}
	var err error
	switch via {
	case appendReceived:
		h.DCRC = sum
		_, err = j.appendDirectBuf(h, buf, index)
	case appendCopyDirect:
		var hp *[]blocktree.Hash
		if j.tree != nil {
			hs = make([]blocktree.Hash, 0, len(p)/BlockSize)
			hp = &hs
		}
		_, err = j.appendDirect(h, p, hp, index)
	case appendPlain:
		_, err = j.appendRecord(h, p, index)
	}
	return err
}

// enqueueLocked adds a record to the write-back queue in LSN order: appends
// complete out of order, but rarely by more than a few places.
func (j *Journal) enqueueLocked(q queued) {
	i := len(j.mu.queue)
	for i > 0 && j.mu.queue[i-1].h.LSN > q.h.LSN {
		i--
	}
	j.mu.queue = slices.Insert(j.mu.queue, i, q)
}

// rangeOp journals a trim or zero of [off, off+n) and applies it to the image
// once the record is durable. Partial blocks at the edges are written as
// zeroes through the normal write path.
func (j *Journal) rangeOp(disk int, kind uint8, off, n int64) error {
	start := (off + BlockSize - 1) &^ (BlockSize - 1)
	end := (off + n) &^ (BlockSize - 1)
	if end <= start {
		return j.write(disk, make([]byte, n), off)
	}
	if start > off {
		if err := j.write(disk, make([]byte, start-off), off); err != nil {
			return err
		}
	}
	if tail := off + n; tail > end {
		if err := j.write(disk, make([]byte, tail-end), end); err != nil {
			return err
		}
	}
	unlock := j.lockRange(disk, start, end-start)
	defer unlock()
	h := Header{Kind: kind, Disk: uint16(disk), Offset: uint64(start), Length: uint64(end - start)}
	h, err := j.appendRecord(h, nil, func(h *Header) {
		if ci := j.cycleIndexLocked(h.Cycle); ci != nil {
			ci.dropRange(disk, start, end-start)
			ci.ranges = append(ci.ranges, Extent{Disk: disk, Offset: start, Length: end - start, Kind: kind, lsn: h.LSN})
		}
		if j.mu.dirty != nil {
			j.mu.dirty.setRange(disk, start, end-start)
		}
		j.enqueueLocked(queued{h: *h, eager: true})
	})
	if err != nil {
		return err
	}
	if err := j.syncTo(h.LSN + HeaderSize); err != nil {
		return err
	}
	j.wb.Lock()
	defer j.wb.Unlock()
	err = j.applyRange(&h)
	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		return j.failLocked(err)
	}
	for i := range j.mu.queue {
		if j.mu.queue[i].h.LSN == h.LSN {
			j.mu.queue[i].applied = true
			break
		}
	}
	j.kickWriteBack()
	return nil
}

// applyRange applies a trim or zero record to the image and forgets older
// journal blocks in its range. Caller holds wb.
func (j *Journal) applyRange(h *Header) error {
	f := j.images[h.Disk]
	off, n := int64(h.Offset), int64(h.Length)
	var err error
	if h.Kind == KindZeroAlloc {
		err = f.ZeroRange(off, n)
	} else {
		err = f.PunchHole(off, n)
	}
	if err != nil {
		return fmt.Errorf("apply %s to disk %d: %w", kindName(h.Kind), h.Disk, err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	forEachKeyInRange(j.mu.pending, int(h.Disk), off, n, func(key, data uint64) {
		if data < h.LSN {
			delete(j.mu.pending, key)
			j.npending.Add(-1)
		}
	})
	return nil
}

// forEachKeyInRange visits the entries of m whose block lies in the range,
// walking whichever is smaller: the range or the map.
func forEachKeyInRange(m map[uint64]uint64, disk int, off, n int64, fn func(key, val uint64)) {
	first, last := uint64(off)/BlockSize, uint64(off+n-1)/BlockSize
	if last-first+1 <= uint64(len(m)) {
		for b := first; b <= last; b++ {
			k := blockKey(disk, b)
			if v, ok := m[k]; ok {
				fn(k, v)
			}
		}
		return
	}
	lo, hi := blockKey(disk, first), blockKey(disk, last)
	for k, v := range m {
		if k >= lo && k <= hi {
			fn(k, v)
		}
	}
}

func kindName(k uint8) string {
	switch k {
	case KindWrite:
		return "write"
	case KindTrim:
		return "trim"
	case KindZero:
		return "zero"
	case KindZeroAlloc:
		return "zero (allocated)"
	case KindSeal:
		return "seal"
	case KindPad:
		return "pad"
	}
	return fmt.Sprintf("kind %d", k)
}
