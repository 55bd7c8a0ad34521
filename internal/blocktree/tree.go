package blocktree

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/cespare/xxhash/v2"
	badger "github.com/dgraph-io/badger/v4"
)

// Sizes of the tree's units.
const (
	BlockSize  = 4096
	LeafBlocks = 16
	LeafSize   = BlockSize * LeafBlocks
)

// Hash is a block's hash; Unknown is 0.
type Hash uint64

// Unknown marks a block the tree does not know.
const Unknown Hash = 0

// version of the stored meta; a tree of another version is reset.
const version = 1

// ErrDisk is returned for a disk index the tree does not have.
var ErrDisk = errors.New("blocktree: no such disk")

var zeroBlock [BlockSize]byte

// ZeroHash is the hash of a block of zeroes.
var ZeroHash = HashBlock(nil)

// zeroLeaf is the digest of a leaf of zero blocks.
var zeroLeaf = leafDigest(zeroLeafHashes())

func zeroLeafHashes() *[LeafBlocks]Hash {
	var l [LeafBlocks]Hash
	for i := range l {
		l[i] = ZeroHash
	}
	return &l
}

// HashBlock hashes one block; b shorter than BlockSize is hashed as if
// zero-padded (the last block of a disk).
func HashBlock(b []byte) Hash {
	var h uint64
	if len(b) == BlockSize {
		h = xxhash.Sum64(b)
	} else {
		d := xxhash.New()
		d.Write(b)
		d.Write(zeroBlock[:BlockSize-len(b)])
		h = d.Sum64()
	}
	if h == 0 {
		h = 1
	}
	return Hash(h)
}

// HashBlocks appends the hashes of data's blocks to dst; a short last
// block is hashed zero-padded.
func HashBlocks(dst []Hash, data []byte) []Hash {
	for len(data) > 0 {
		n := min(len(data), BlockSize)
		dst = append(dst, HashBlock(data[:n]))
		data = data[n:]
	}
	return dst
}

func leafDigest(l *[LeafBlocks]Hash) uint64 {
	var b [LeafBlocks * 8]byte
	for i, h := range l {
		if h == Unknown {
			return 0
		}
		binary.LittleEndian.PutUint64(b[i*8:], uint64(h))
	}
	d := xxhash.Sum64(b[:])
	if d == 0 {
		d = 1
	}
	return d
}

// Root is a disk's root: two 64-bit lanes.
type Root [2]uint64

func (r Root) String() string { return fmt.Sprintf("%016x%016x", r[0], r[1]) }

// ParseRoot reads a Root written by String.
func ParseRoot(s string) (Root, error) {
	var r Root
	if len(s) != 32 {
		return r, fmt.Errorf("blocktree: root %q: want 32 hex digits", s)
	}
	if _, err := fmt.Sscanf(s, "%016x%016x", &r[0], &r[1]); err != nil {
		return r, fmt.Errorf("blocktree: root %q: %w", s, err)
	}
	return r, nil
}

func mix(i, d uint64) Root {
	if d == zeroLeaf {
		return Root{}
	}
	var b [17]byte
	binary.LittleEndian.PutUint64(b[:], i)
	binary.LittleEndian.PutUint64(b[8:], d)
	a := xxhash.Sum64(b[:16])
	binary.LittleEndian.PutUint64(b[:], d)
	binary.LittleEndian.PutUint64(b[8:], i)
	b[16] = 0x5a
	return Root{a, xxhash.Sum64(b[:])}
}

func (r *Root) add(x Root) { r[0] += x[0]; r[1] += x[1] }
func (r *Root) sub(x Root) { r[0] -= x[0]; r[1] -= x[1] }

// DiskState is what the tree knows of one disk.
type DiskState struct {
	Size int64 `json:"size"`
	// Built is how far from offset 0 the disk was hashed from its image.
	Built int64 `json:"built"`
	// Unknown counts the leaves holding an Unknown block.
	Unknown int64 `json:"unknown"`
	Root    Root  `json:"root"`
}

// Complete says whether every block of the disk has a known hash.
func (d DiskState) Complete() bool { return d.Built >= d.Size && d.Unknown == 0 }

type meta struct {
	Version int         `json:"version"`
	Disks   []DiskState `json:"disks"`
	Dirty   bool        `json:"dirty,omitempty"`
}

// Tree is the block-hash tree of a VM's disks.
type Tree struct {
	db     *badger.DB
	prefix []byte

	mu   sync.Mutex
	meta meta
	// cache holds leaves as committed, so that a Commit reads a leaf it
	// changed before from memory, not BadgerDB: the write-back commits
	// the same hot leaves over and over. Only the Tree writes its keys,
	// so the cache cannot go stale; it is cleared on any failure.
	cache map[leafRef][LeafBlocks]Hash
}

// maxCacheLeaves bounds the leaf cache: about 2.5 MiB.
const maxCacheLeaves = 16384

// Open opens the tree under prefix in db for disks of sizes. A tree that is
// missing, of another version, of other disk sizes or left dirty is reset:
// it knows nothing until BuildStep hashes the images. reset says so.
func Open(db *badger.DB, prefix []byte, sizes []int64) (t *Tree, reset bool, err error) {
	t = &Tree{db: db, prefix: slices.Clone(prefix), cache: map[leafRef][LeafBlocks]Hash{}}
	var m meta
	err = db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(t.metaKey())
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error { return json.Unmarshal(v, &m) })
	})
	if err != nil {
		return nil, false, fmt.Errorf("blocktree: read meta: %w", err)
	}
	ok := m.Version == version && !m.Dirty && len(m.Disks) == len(sizes)
	for i := 0; ok && i < len(sizes); i++ {
		ok = m.Disks[i].Size == sizes[i]
	}
	if ok {
		t.meta = m
		return t, false, nil
	}
	t.meta = meta{Version: version, Disks: make([]DiskState, len(sizes))}
	for i, s := range sizes {
		t.meta.Disks[i].Size = s
	}
	if err := db.DropPrefix(t.leafPrefix()); err != nil {
		return nil, false, fmt.Errorf("blocktree: reset: %w", err)
	}
	if err := t.writeMeta(); err != nil {
		return nil, false, err
	}
	return t, true, nil
}

func (t *Tree) metaKey() []byte    { return append(slices.Clone(t.prefix), 'M') }
func (t *Tree) leafPrefix() []byte { return append(slices.Clone(t.prefix), 'L') }

func (t *Tree) leafKey(disk int, leaf int64) []byte {
	k := make([]byte, 0, len(t.prefix)+11)
	k = append(k, t.prefix...)
	k = append(k, 'L')
	k = binary.BigEndian.AppendUint16(k, uint16(disk))
	return binary.BigEndian.AppendUint64(k, uint64(leaf))
}

func (t *Tree) writeMeta() error {
	b, _ := json.Marshal(t.meta)
	if err := t.db.Update(func(txn *badger.Txn) error { return txn.Set(t.metaKey(), b) }); err != nil {
		return fmt.Errorf("blocktree: write meta: %w", err)
	}
	return nil
}

// State returns what the tree knows of each disk, and whether it is dirty.
func (t *Tree) State() ([]DiskState, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.meta.Disks), t.meta.Dirty
}

// Root returns disk's root; ok is false unless every block of the disk has
// a known hash and the tree is clean.
func (t *Tree) Root(disk int) (r Root, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		return Root{}, false
	}
	d := t.meta.Disks[disk]
	return d.Root, d.Complete() && !t.meta.Dirty
}

// Roots returns every disk's root, or nil unless all are known.
func (t *Tree) Roots() []Root {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.meta.Dirty {
		return nil
	}
	out := make([]Root, len(t.meta.Disks))
	for i, d := range t.meta.Disks {
		if !d.Complete() {
			return nil
		}
		out[i] = d.Root
	}
	return out
}

// Sync makes every commit durable.
func (t *Tree) Sync() error {
	if err := t.db.Sync(); err != nil {
		return fmt.Errorf("blocktree: sync: %w", err)
	}
	return nil
}

// Begin marks the tree dirty, durably: call it before images change in a
// way that a crash could leave undescribed by the tree. The next Commit
// cleans it.
func (t *Tree) Begin() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.meta.Dirty {
		return nil
	}
	t.meta.Dirty = true
	if err := t.writeMeta(); err != nil {
		return err
	}
	return t.Sync()
}

// Reset forgets everything about disk: it is Unknown until rebuilt.
func (t *Tree) Reset(disk int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		return ErrDisk
	}
	p := t.leafPrefix()
	p = binary.BigEndian.AppendUint16(p, uint16(disk))
	clear(t.cache)
	if err := t.db.DropPrefix(p); err != nil {
		return fmt.Errorf("blocktree: reset disk %d: %w", disk, err)
	}
	t.meta.Disks[disk] = DiskState{Size: t.meta.Disks[disk].Size}
	return t.writeMeta()
}

// getLeaf reads leaf of disk in txn; a missing one is a zero leaf.
func (t *Tree) getLeaf(txn *badger.Txn, disk int, leaf int64) (*[LeafBlocks]Hash, error) {
	it, err := txn.Get(t.leafKey(disk, leaf))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return zeroLeafHashes(), nil
	}
	if err != nil {
		return nil, err
	}
	l := new([LeafBlocks]Hash)
	err = it.Value(func(v []byte) error { return decodeLeaf(l, v, disk, leaf) })
	return l, err
}

// decodeLeaf reads a stored leaf value into l.
func decodeLeaf(l *[LeafBlocks]Hash, v []byte, disk int, leaf int64) error {
	if len(v) != LeafBlocks*8 {
		return fmt.Errorf("blocktree: leaf %d of disk %d: %d bytes", leaf, disk, len(v))
	}
	for i := range l {
		l[i] = Hash(binary.LittleEndian.Uint64(v[i*8:]))
	}
	return nil
}

// Leaves returns the digests of n leaves of disk from leaf first: 0 for a
// leaf holding an Unknown block or not yet built.
func (t *Tree) Leaves(disk int, first, n int64) ([]uint64, error) {
	t.mu.Lock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		t.mu.Unlock()
		return nil, ErrDisk
	}
	built := t.meta.Disks[disk].Built
	t.mu.Unlock()
	out := make([]uint64, n)
	for i := range out {
		out[i] = zeroLeaf
	}
	err := t.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: true, PrefetchSize: 256,
			Prefix: binary.BigEndian.AppendUint16(t.leafPrefix(), uint16(disk))})
		defer it.Close()
		for it.Seek(t.leafKey(disk, first)); it.Valid(); it.Next() {
			k := it.Item().Key()
			leaf := int64(binary.BigEndian.Uint64(k[len(k)-8:]))
			if leaf >= first+n {
				break
			}
			var l [LeafBlocks]Hash
			err := it.Item().Value(func(v []byte) error { return decodeLeaf(&l, v, disk, leaf) })
			if err != nil {
				return err
			}
			out[leaf-first] = leafDigest(&l)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("blocktree: read leaves: %w", err)
	}
	for i := range out {
		if (first+int64(i))*LeafSize >= built {
			out[i] = 0
		}
	}
	return out, nil
}

// Blocks returns the hashes of disk's blocks covering [off, off+n); off is
// block aligned. Blocks not yet built are Unknown.
func (t *Tree) Blocks(disk int, off, n int64) ([]Hash, error) {
	t.mu.Lock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		t.mu.Unlock()
		return nil, ErrDisk
	}
	built := t.meta.Disks[disk].Built
	t.mu.Unlock()
	first := off / BlockSize
	count := (n + BlockSize - 1) / BlockSize
	out := make([]Hash, 0, count)
	err := t.db.View(func(txn *badger.Txn) error {
		for b := first; b < first+count; {
			l, err := t.getLeaf(txn, disk, b/LeafBlocks)
			if err != nil {
				return err
			}
			for leaf := b / LeafBlocks; b < first+count && b/LeafBlocks == leaf; b++ {
				h := l[b%LeafBlocks]
				if b*BlockSize >= built {
					h = Unknown
				}
				out = append(out, h)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("blocktree: read blocks: %w", err)
	}
	return out, nil
}

// A Batch gathers block hash changes for one Commit. Later changes of a
// block win.
type Batch struct {
	t       *Tree
	changes map[leafRef]*leafChange
	order   []leafRef
}

type leafRef struct {
	disk int
	leaf int64
}

type leafChange struct {
	set [LeafBlocks]bool
	h   [LeafBlocks]Hash
}

// Batch starts a batch of changes.
func (t *Tree) Batch() *Batch { return &Batch{t: t, changes: make(map[leafRef]*leafChange)} }

// Len is the number of leaves the batch changes.
func (b *Batch) Len() int { return len(b.order) }

func (b *Batch) set(disk int, block int64, h Hash) {
	r := leafRef{disk, block / LeafBlocks}
	c := b.changes[r]
	if c == nil {
		c = new(leafChange)
		b.changes[r] = c
		b.order = append(b.order, r)
	}
	c.set[block%LeafBlocks] = true
	c.h[block%LeafBlocks] = h
}

// Set records the hashes of consecutive blocks of disk from block offset
// off (a multiple of BlockSize).
func (b *Batch) Set(disk int, off int64, hs []Hash) {
	for i, h := range hs {
		b.set(disk, off/BlockSize+int64(i), h)
	}
}

// Data records data written at off of disk: whole blocks get their hash,
// blocks it covers only in part become Unknown, except a last block cut by
// the end of the disk.
func (b *Batch) Data(disk int, off int64, data []byte) {
	size := b.t.size(disk)
	end := off + int64(len(data))
	for pos := off; pos < end; {
		blk := pos / BlockSize
		bs, be := blk*BlockSize, min((blk+1)*BlockSize, size)
		switch {
		case pos == bs && end >= be && be > bs:
			b.set(disk, blk, HashBlock(data[pos-off:be-off]))
		default:
			b.set(disk, blk, Unknown)
		}
		pos = (blk + 1) * BlockSize
	}
}

// Zero records that [off, off+n) of disk reads as zeroes: whole blocks get
// ZeroHash, blocks covered in part become Unknown.
func (b *Batch) Zero(disk int, off, n int64) {
	b.fill(disk, off, n, ZeroHash)
}

// Invalidate makes the blocks touching [off, off+n) of disk Unknown.
func (b *Batch) Invalidate(disk int, off, n int64) {
	if n <= 0 {
		return
	}
	for blk := off / BlockSize; blk*BlockSize < off+n; blk++ {
		b.set(disk, blk, Unknown)
	}
}

func (b *Batch) fill(disk int, off, n int64, h Hash) {
	size := b.t.size(disk)
	end := off + n
	for pos := off; pos < end; {
		blk := pos / BlockSize
		bs, be := blk*BlockSize, min((blk+1)*BlockSize, size)
		if pos == bs && end >= be && be > bs {
			b.set(disk, blk, h)
		} else {
			b.set(disk, blk, Unknown)
		}
		pos = (blk + 1) * BlockSize
	}
}

func (t *Tree) size(disk int) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		return 0
	}
	return t.meta.Disks[disk].Size
}

// maxTxnLeaves bounds the leaves of one transaction; a larger Commit is
// split with the meta marked dirty across its parts.
const maxTxnLeaves = 2048

// Commit writes the batch's changes and the new roots, and cleans a tree
// marked dirty by Begin. It is not durable until Sync.
func (b *Batch) Commit() error {
	t := b.t
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range b.order {
		if r.disk < 0 || r.disk >= len(t.meta.Disks) {
			return ErrDisk
		}
	}
	split := len(b.order) > maxTxnLeaves
	if split && !t.meta.Dirty {
		t.meta.Dirty = true
		if err := t.writeMeta(); err != nil {
			return err
		}
	}
	m := t.meta
	m.Disks = slices.Clone(m.Disks)
	for start := 0; start < len(b.order) || start == 0; start += maxTxnLeaves {
		part := b.order[start:min(start+maxTxnLeaves, len(b.order))]
		last := start+maxTxnLeaves >= len(b.order)
		leaves := make([][LeafBlocks]Hash, len(part))
		err := t.db.Update(func(txn *badger.Txn) error {
			for i, r := range part {
				l, err := t.commitLeaf(txn, &m, r, b.changes[r])
				if err != nil {
					return err
				}
				leaves[i] = l
			}
			if last {
				m.Dirty = false
			}
			v, _ := json.Marshal(m)
			return txn.Set(t.metaKey(), v)
		})
		if err != nil {
			t.meta.Dirty = true // what is stored is unknown now
			clear(t.cache)
			return fmt.Errorf("blocktree: commit: %w", err)
		}
		t.meta = m
		m.Disks = slices.Clone(m.Disks)
		if len(t.cache)+len(part) > maxCacheLeaves {
			clear(t.cache)
		}
		for i, r := range part {
			t.cache[r] = leaves[i]
		}
	}
	return nil
}

// commitLeaf applies one leaf's changes in txn, moves the disk's root and
// Unknown count in m, and returns the new leaf.
func (t *Tree) commitLeaf(txn *badger.Txn, m *meta, r leafRef, c *leafChange) ([LeafBlocks]Hash, error) {
	l, ok := t.cache[r]
	if !ok {
		p, err := t.getLeaf(txn, r.disk, r.leaf)
		if err != nil {
			return l, err
		}
		l = *p
	}
	old := leafDigest(&l)
	for i := range l {
		if c.set[i] {
			l[i] = c.h[i]
		}
	}
	return l, t.putLeaf(txn, m, r, old, &l)
}

func (t *Tree) putLeaf(txn *badger.Txn, m *meta, r leafRef, old uint64, l *[LeafBlocks]Hash) error {
	d := leafDigest(l)
	ds := &m.Disks[r.disk]
	ds.Root.sub(mix(uint64(r.leaf), old))
	ds.Root.add(mix(uint64(r.leaf), d))
	if old == 0 {
		ds.Unknown--
	}
	if d == 0 {
		ds.Unknown++
	}
	key := t.leafKey(r.disk, r.leaf)
	if d == zeroLeaf {
		return txn.Delete(key)
	}
	v := make([]byte, LeafBlocks*8)
	for i, h := range l {
		binary.LittleEndian.PutUint64(v[i*8:], uint64(h))
	}
	return txn.Set(key, v)
}

// BuildStep hashes up to max bytes (whole leaves, at least one) of disk
// from where its build stands, reading img, and records them. It returns
// true once the disk is built. The caller keeps that range of the image
// still until BuildStep returns.
func (t *Tree) BuildStep(disk int, img io.ReaderAt, max int64, buf []byte) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if disk < 0 || disk >= len(t.meta.Disks) {
		return false, ErrDisk
	}
	ds := t.meta.Disks[disk]
	if ds.Built >= ds.Size {
		return true, nil
	}
	n := min(ds.Size-ds.Built, (max+LeafSize-1)/LeafSize*LeafSize)
	if int64(cap(buf)) < n {
		buf = make([]byte, n)
	}
	p := buf[:n]
	if m, err := img.ReadAt(p, ds.Built); err != nil && !(errors.Is(err, io.EOF) && int64(m) == n) {
		return false, fmt.Errorf("blocktree: build disk %d at %d: %w", disk, ds.Built, err)
	}
	m := t.meta
	m.Disks = slices.Clone(m.Disks)
	err := t.db.Update(func(txn *badger.Txn) error {
		for off := int64(0); off < n; off += LeafSize {
			leaf := (ds.Built + off) / LeafSize
			old, err := t.getLeaf(txn, disk, leaf)
			if err != nil {
				return err
			}
			var l [LeafBlocks]Hash
			for i := range l {
				b := off + int64(i)*BlockSize
				switch {
				case b >= n:
					l[i] = ZeroHash // past the end of the disk
				default:
					l[i] = HashBlock(p[b:min(b+BlockSize, n)])
				}
			}
			if err := t.putLeaf(txn, &m, leafRef{disk, leaf}, leafDigest(old), &l); err != nil {
				return err
			}
			delete(t.cache, leafRef{disk, leaf})
		}
		m.Disks[disk].Built = ds.Built + n
		v, _ := json.Marshal(m)
		return txn.Set(t.metaKey(), v)
	})
	if err != nil {
		return false, fmt.Errorf("blocktree: build disk %d: %w", disk, err)
	}
	t.meta = m
	return m.Disks[disk].Built >= ds.Size, nil
}

// Options are BadgerDB options sized for a tree of its own (a replica VM's):
// small memtables and caches, since a host keeps one per VM. A transaction
// of maxTxnLeaves leaves fits in a memtable of this size.
func Options(dir string) badger.Options {
	return badger.DefaultOptions(dir).
		WithLogger(nil).
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBlockCacheSize(2 << 20).
		WithIndexCacheSize(2 << 20).
		WithValueLogFileSize(16 << 20).
		WithNumCompactors(2).
		WithSyncWrites(false).
		WithMetricsEnabled(false)
}

// RootOf computes the root of a disk of size bytes read from r, without a
// tree: what a tree built over the same bytes would hold. buf, if large
// enough, is used for the reads (a multiple of LeafSize; 4 MiB is good).
func RootOf(r io.ReaderAt, size int64, buf []byte) (Root, error) {
	if len(buf) < LeafSize {
		buf = make([]byte, 4<<20)
	}
	buf = buf[:len(buf)/LeafSize*LeafSize]
	var root Root
	var l [LeafBlocks]Hash
	for pos := int64(0); pos < size; {
		p := buf[:min(int64(len(buf)), size-pos)]
		if m, err := r.ReadAt(p, pos); err != nil && !(errors.Is(err, io.EOF) && m == len(p)) {
			return Root{}, fmt.Errorf("blocktree: read at %d: %w", pos, err)
		}
		for off := 0; off < len(p); off += LeafSize {
			for i := range l {
				b := off + i*BlockSize
				if b >= len(p) {
					l[i] = ZeroHash
				} else {
					l[i] = HashBlock(p[b:min(b+BlockSize, len(p))])
				}
			}
			root.add(mix(uint64((pos+int64(off))/LeafSize), leafDigest(&l)))
		}
		pos += int64(len(p))
	}
	return root, nil
}
