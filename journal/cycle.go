package journal

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// CycleInfo describes a closed cycle.
type CycleInfo struct {
	Cycle         uint64    `json:"cycle"`
	Sealed        time.Time `json:"sealed"`
	AppConsistent bool      `json:"app_consistent"`
	// Point: the cycle should become a recovery point (SealPoint).
	Point bool `json:"point,omitempty"`
	// Bytes is what the guest wrote during the cycle, overwrites included.
	Bytes int64 `json:"bytes"`
	// Blocks is the number of distinct blocks the cycle ships after coalescing.
	Blocks int64 `json:"blocks"`
	// Ranges is the number of trim/zero ranges it ships.
	Ranges int64 `json:"ranges"`
	// Start and End bound the cycle's records in the journal.
	Start uint64 `json:"start_lsn"`
	End   uint64 `json:"end_lsn"`
}

// Extent is one piece of a closed cycle's coalesced content: a run of blocks
// whose final data is in the journal, or a trim/zero range.
type Extent struct {
	Disk   int
	Offset int64
	Length int64
	Kind   uint8  // KindWrite, KindTrim, KindZero or KindZeroAlloc
	lsn    uint64 // where the data of a KindWrite run starts in the journal
	rec    recRef // the write record holding that data (KindWrite)
}

// recRef is what a reader of journaled data needs to verify it: the write
// record's LSN, payload length and payload CRC32C. A run of a cycle's blocks
// never spans records (a header lies between any two payloads), so one
// recRef covers an Extent.
type recRef struct {
	lsn uint64
	n   uint32 // payload length (at most MaxPayload)
	sum uint32
}

func refOf(h *Header) recRef { return recRef{lsn: h.LSN, n: uint32(h.Length), sum: h.DCRC} }

// cycleIndex is a cycle's content while it is in memory: the newest journal
// position of every block written, and the trim/zero ranges newer than any
// write they cover.
type cycleIndex struct {
	info   CycleInfo
	blocks map[uint64]uint64
	ranges []Extent
	recs   []recRef // the cycle's write records, by LSN
}

// addRecord notes a write record of the cycle. Appends finish out of order,
// but rarely by more than a few places (see enqueueLocked).
func (ci *cycleIndex) addRecord(h *Header) {
	i := len(ci.recs)
	for i > 0 && ci.recs[i-1].lsn > h.LSN {
		i--
	}
	ci.recs = slices.Insert(ci.recs, i, refOf(h))
}

// recordOf is the write record holding journal position data.
func (ci *cycleIndex) recordOf(data uint64) recRef {
	i := sort.Search(len(ci.recs), func(i int) bool { return ci.recs[i].lsn > data }) - 1
	if i < 0 {
		return recRef{}
	}
	return ci.recs[i]
}

// dropRange forgets block writes inside a range that a newer trim/zero covers.
func (ci *cycleIndex) dropRange(disk int, off, n int64) {
	forEachKeyInRange(ci.blocks, disk, off, n, func(k, _ uint64) { delete(ci.blocks, k) })
}

// cycleIndexLocked returns the in-memory index of cycle c, or nil when cycles
// are not being kept (no replication, or dirty-block tracking).
func (j *Journal) cycleIndexLocked(c uint64) *cycleIndex {
	if !j.mu.retain || c <= j.mu.released || (j.mu.dirty != nil && (j.mu.resyncBase == 0 || c <= j.mu.resyncBase)) {
		return nil
	}
	ci := j.mu.open[c]
	if ci == nil {
		ci = &cycleIndex{info: CycleInfo{Cycle: c}, blocks: make(map[uint64]uint64)}
		j.mu.open[c] = ci
	}
	return ci
}

// Seal closes the open cycle of every disk of the VM at one instant and makes
// it durable. The returned cycle can be read with Extents until Release.
// flags may include SealAppConsistent.
func (j *Journal) Seal(flags uint64) (CycleInfo, error) {
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	return j.sealLocked(flags)
}

// sealLocked is Seal with sealMu held.
func (j *Journal) sealLocked(flags uint64) (CycleInfo, error) {
	now := j.cfg.Now()
	payload := sealPayload{UnixNano: now.UnixNano(), Flags: flags}.encode()
	h, err := j.appendRecord(Header{Kind: KindSeal}, payload, nil)
	if err != nil {
		return CycleInfo{}, err
	}
	if err := j.syncTo(h.LSN + uint64(h.Size())); err != nil {
		return CycleInfo{}, err
	}
	// Every record of the cycle is below the seal and the sync waited for
	// all of them, so the cycle's index is complete.
	j.mu.Lock()
	// And the write-back's queue holds all of them: once they are written
	// back, the tree stands at this barrier.
	j.mu.tree.sealed = max(j.mu.tree.sealed, h.Cycle)
	j.kickWriteBack()
	ci := j.mu.open[h.Cycle]
	delete(j.mu.open, h.Cycle)
	written := j.mu.written[h.Cycle]
	delete(j.mu.written, h.Cycle)
	keep := ci != nil || (j.mu.retain && j.mu.dirty == nil && h.Cycle > j.mu.released)
	j.mu.Unlock()
	if ci == nil {
		ci = &cycleIndex{info: CycleInfo{Cycle: h.Cycle}}
	}
	ci.info.Bytes = written
	ci.info.Sealed = timeFromNano(now.UnixNano())
	ci.info.AppConsistent = flags&SealAppConsistent != 0
	ci.info.Point = flags&SealPoint != 0
	ci.info.End = h.LSN + uint64(h.Size())
	if keep {
		if err := j.cycles.put(ci); err != nil {
			// The seal is durable but its index is not: no longer able to
			// prove what the replica lacks, switch to dirty tracking with
			// this cycle's blocks marked (resync required).
			j.mu.Lock()
			j.mu.open[h.Cycle] = ci
			j.mu.cutting, j.mu.cutReason = true, "cannot index cycle "+fmt.Sprint(h.Cycle)+": "+err.Error()
			j.kickWriteBack()
			j.mu.Unlock()
			return CycleInfo{}, err
		}
	}
	j.mu.Lock()
	ci.info.Start = j.sealStartLocked(h.Cycle)
	j.mu.cycleStart = ci.info.End
	if keep && h.Cycle > j.mu.released && j.mu.dirty == nil {
		j.mu.closedC = append(j.mu.closedC, ci.info)
	} else if h.Cycle > j.mu.released {
		j.mu.released = h.Cycle
	}
	info := ci.info
	j.mu.Unlock()
	if !keep {
		if err := j.cycles.drop(h.Cycle); err != nil {
			return info, err
		}
	}
	j.log.Debug("cycle sealed", "cycle", info.Cycle, "blocks", info.Blocks, "bytes", info.Bytes)
	return info, nil
}

// sealStartLocked is where cycle c began: the end of the previous seal.
func (j *Journal) sealStartLocked(c uint64) uint64 {
	if n := len(j.mu.closedC); n > 0 && j.mu.closedC[n-1].Cycle == c-1 {
		return j.mu.closedC[n-1].End
	}
	return j.mu.cycleStart
}

// Cycles lists the closed cycles not yet released, oldest first.
func (j *Journal) Cycles() []CycleInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]CycleInfo(nil), j.mu.closedC...)
}

// OpenCycle is the number of the cycle writes currently go to.
func (j *Journal) OpenCycle() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.mu.cycle
}

// Extents calls fn for the coalesced content of closed cycle c: first its
// trim/zero ranges in journal order, then its block runs by disk and offset.
// Applying them in that order to the image at the previous barrier gives the
// image at c's barrier.
func (j *Journal) Extents(c uint64, fn func(Extent) error) error {
	if !j.isClosed(c) {
		return fmt.Errorf("%w: %d", ErrUnknownCycle, c)
	}
	return j.cycles.extents(c, fn)
}

func (j *Journal) isClosed(c uint64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, ci := range j.mu.closedC {
		if ci.Cycle == c {
			return true
		}
	}
	return false
}

// ReadExtent reads the data of a KindWrite extent of a closed cycle into p
// (len(p) == e.Length), verified: the payload of the record holding it must
// match the CRC32C its header carries. An extent that is its record's whole
// payload is checked in p itself; one that covers part of it reads the whole
// payload into a scratch buffer to check it. A mismatch returns a
// *DamageError (ErrDamaged), and p must not be used.
func (j *Journal) ReadExtent(e Extent, p []byte) error {
	if e.Kind != KindWrite || int64(len(p)) != e.Length {
		return fmt.Errorf("journal: ReadExtent of %s extent into %d bytes", kindName(e.Kind), len(p))
	}
	payload := e.rec.lsn + HeaderSize
	if e.rec.n == 0 || e.lsn < payload || e.lsn-payload+uint64(e.Length) > uint64(e.rec.n) {
		return fmt.Errorf("%w: extent at LSN %#x outside its record at %#x", errBadIndex, e.lsn, e.rec.lsn)
	}
	buf := p
	if whole := e.lsn == payload && e.Length == int64(e.rec.n); !whole {
		buf = j.getBuf(int(e.rec.n))
		defer j.putBuf(buf)
	}
	j.segMu.RLock()
	err := j.readJournal(buf, payload)
	j.segMu.RUnlock()
	if err != nil {
		return err
	}
	if got := crc(buf); got != e.rec.sum {
		off := e.Offset - int64(e.lsn-payload)
		return j.damage(e.rec, e.Disk, off, fmt.Sprintf("payload checksum %#x, want %#x", got, e.rec.sum))
	}
	if len(buf) != len(p) {
		copy(p, buf[e.lsn-payload:])
	}
	return nil
}

// damage is the DamageError of the write record rec, which covers disk's
// bytes from off.
func (j *Journal) damage(rec recRef, disk int, off int64, why string) *DamageError {
	e := &DamageError{Disk: disk, Off: off, Len: int64(rec.n), LSN: rec.lsn, Why: why}
	if disk >= 0 && disk < len(j.cfg.Disks) {
		e.DiskName = j.cfg.Disks[disk].Name
	}
	j.mu.Lock()
	if seg := j.segmentFor(rec.lsn); seg != nil {
		e.Segment = seg.name
	}
	j.mu.Unlock()
	return e
}

// Release drops closed cycles up to and including c: they were shipped and
// the replica made them durable. Their journal space is freed at the next
// checkpoint.
func (j *Journal) Release(c uint64) error {
	j.mu.Lock()
	var drop []uint64
	for len(j.mu.closedC) > 0 && j.mu.closedC[0].Cycle <= c {
		drop = append(drop, j.mu.closedC[0].Cycle)
		j.mu.closedC = j.mu.closedC[1:]
	}
	if c > j.mu.released && c < j.mu.cycle {
		j.mu.released = c
	}
	j.mu.Unlock()
	for _, n := range drop {
		if err := j.cycles.drop(n); err != nil {
			return err
		}
	}
	j.kickWriteBack()
	return nil
}

// cycleStore keeps closed cycles' indexes in Badger so that cycles waiting to
// ship cost no memory. It holds positions only, never block data, and is
// rebuilt from the segments at every open. The same database holds the
// block tree under treePrefix ('T'), which outlives an Open (tree.go).
//
// Keys:  'b' cycle(8, BE) disk(2, BE) block(6, BE) -> run blocks(4) data LSN(8)
//
//	                                              record LSN(8) payload length(4)
//	                                              payload CRC32C(4)
//	'r' cycle(8, BE) seq(4, BE)                -> disk(2) off(8) len(8) kind(1)
//	'i' cycle(8, BE)                           -> CycleInfo as JSON
//
// A 'b' value carries what ReadExtent needs to verify the run's data without
// reading the record's header: the record it lies in, its payload length
// and CRC32C (values are little endian). Nothing outlives an Open, so the
// layout may change freely between versions.
type cycleStore struct{ db *badger.DB }

func openCycleStore(dir string) (*cycleStore, error) {
	opts := badger.DefaultOptions(dir).
		WithLogger(nil).
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBlockCacheSize(4 << 20).
		WithIndexCacheSize(4 << 20).
		WithValueLogFileSize(16 << 20).
		WithNumCompactors(2).
		WithSyncWrites(false).
		WithMetricsEnabled(false)
	if dir == "" {
		opts = opts.WithInMemory(true)
	}
	db, err := badger.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("journal: open cycle index: %w", err)
	}
	// The index is rebuilt from the segments at every open; the block
	// tree under its own prefix (treePrefix) stays.
	if err := db.DropPrefix([]byte{'b'}, []byte{'r'}, []byte{'i'}); err != nil {
		db.Close()
		return nil, fmt.Errorf("journal: reset cycle index: %w", err)
	}
	return &cycleStore{db: db}, nil
}

func (s *cycleStore) close() error { return s.db.Close() }

func cycleKey(prefix byte, c uint64, rest int) []byte {
	k := make([]byte, 9, 9+rest)
	k[0] = prefix
	binary.BigEndian.PutUint64(k[1:], c)
	return k
}

// put writes a cycle's index, coalescing consecutive blocks whose data is
// consecutive in the journal into runs, and fills in Blocks and Ranges.
func (s *cycleStore) put(ci *cycleIndex) error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	keys := make([]uint64, 0, len(ci.blocks))
	for k := range ci.blocks {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(a, b int) bool { return keys[a] < keys[b] })
	for i := 0; i < len(keys); {
		k0, d0 := keys[i], ci.blocks[keys[i]]
		n := 1
		for i+n < len(keys) && keys[i+n] == k0+uint64(n) && ci.blocks[keys[i+n]] == d0+uint64(n)*BlockSize {
			n++
		}
		key := binary.BigEndian.AppendUint64(cycleKey('b', ci.info.Cycle, 8), k0)
		rec := ci.recordOf(d0)
		val := binary.LittleEndian.AppendUint32(nil, uint32(n))
		val = binary.LittleEndian.AppendUint64(val, d0)
		val = binary.LittleEndian.AppendUint64(val, rec.lsn)
		val = binary.LittleEndian.AppendUint32(val, rec.n)
		val = binary.LittleEndian.AppendUint32(val, rec.sum)
		if err := wb.Set(key, val); err != nil {
			return fmt.Errorf("journal: index cycle %d: %w", ci.info.Cycle, err)
		}
		i += n
	}
	ci.info.Blocks = int64(len(keys))
	ci.info.Ranges = int64(len(ci.ranges))
	for i, r := range ci.ranges {
		key := binary.BigEndian.AppendUint32(cycleKey('r', ci.info.Cycle, 4), uint32(i))
		val := binary.LittleEndian.AppendUint16(nil, uint16(r.Disk))
		val = binary.LittleEndian.AppendUint64(val, uint64(r.Offset))
		val = binary.LittleEndian.AppendUint64(val, uint64(r.Length))
		val = append(val, r.Kind)
		if err := wb.Set(key, val); err != nil {
			return fmt.Errorf("journal: index cycle %d: %w", ci.info.Cycle, err)
		}
	}
	info, _ := json.Marshal(ci.info)
	if err := wb.Set(cycleKey('i', ci.info.Cycle, 0), info); err != nil {
		return fmt.Errorf("journal: index cycle %d: %w", ci.info.Cycle, err)
	}
	if err := wb.Flush(); err != nil {
		return fmt.Errorf("journal: index cycle %d: %w", ci.info.Cycle, err)
	}
	return nil
}

// drop deletes a cycle's index. It deletes key by key in a write batch:
// Badger's DropPrefix would block every concurrent write, failing a seal
// that indexes the next cycle at that moment.
func (s *cycleStore) drop(c uint64) error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	err := s.db.View(func(txn *badger.Txn) error {
		for _, p := range []byte{'r', 'b', 'i'} {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: cycleKey(p, c, 0)})
			for it.Rewind(); it.Valid(); it.Next() {
				if err := wb.Delete(it.Item().KeyCopy(nil)); err != nil {
					it.Close()
					return err
				}
			}
			it.Close()
		}
		return nil
	})
	if err == nil {
		err = wb.Flush()
	}
	if err != nil {
		return fmt.Errorf("journal: drop cycle %d: %w", c, err)
	}
	return nil
}

var errBadIndex = errors.New("journal: malformed cycle index entry")

func (s *cycleStore) extents(c uint64, fn func(Extent) error) error {
	return s.db.View(func(txn *badger.Txn) error {
		for _, p := range []byte{'r', 'b'} {
			prefix := cycleKey(p, c, 0)
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 256})
			for it.Rewind(); it.Valid(); it.Next() {
				item := it.Item()
				key := item.Key()
				val, err := item.ValueCopy(nil)
				if err != nil {
					it.Close()
					return err
				}
				var e Extent
				switch {
				case p == 'b' && len(key) == 17 && len(val) == 28:
					k := binary.BigEndian.Uint64(key[9:])
					e = Extent{
						Disk:   int(k >> 48),
						Offset: int64(k&(1<<48-1)) * BlockSize,
						Length: int64(binary.LittleEndian.Uint32(val)) * BlockSize,
						Kind:   KindWrite,
						lsn:    binary.LittleEndian.Uint64(val[4:]),
						rec: recRef{
							lsn: binary.LittleEndian.Uint64(val[12:]),
							n:   binary.LittleEndian.Uint32(val[20:]),
							sum: binary.LittleEndian.Uint32(val[24:]),
						},
					}
				case p == 'r' && len(val) == 19:
					e = Extent{
						Disk:   int(binary.LittleEndian.Uint16(val)),
						Offset: int64(binary.LittleEndian.Uint64(val[2:])),
						Length: int64(binary.LittleEndian.Uint64(val[10:])),
						Kind:   val[18],
					}
				default:
					it.Close()
					return fmt.Errorf("%w: key %x", errBadIndex, key)
				}
				if err := fn(e); err != nil {
					it.Close()
					return err
				}
			}
			it.Close()
		}
		return nil
	})
}
