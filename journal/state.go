package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"path"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

const (
	checkpointMagic   = 0x434a4456 // "VDJC"
	checkpointVersion = 1
	checkpointSize    = 48
	checkpointFile    = "checkpoint"

	dirtyMagic   = 0x444a4456 // "VDJD"
	dirtyVersion = 1
	dirtyFile    = "dirty"
)

// checkpoint is the durable summary of the journal's progress: every record
// below Applied is in the images and the images were synced.
type checkpoint struct {
	Applied  uint64 // records below are durable in the images
	Head     uint64 // where the next segment starts if none is left
	Released uint64 // cycles up to this one are shipped and gone
	Cycle    uint64 // the open cycle at the time
}

func (c checkpoint) encode() []byte {
	b := make([]byte, checkpointSize)
	binary.LittleEndian.PutUint32(b[0:], checkpointMagic)
	b[4] = checkpointVersion
	binary.LittleEndian.PutUint64(b[8:], c.Applied)
	binary.LittleEndian.PutUint64(b[16:], c.Head)
	binary.LittleEndian.PutUint64(b[24:], c.Released)
	binary.LittleEndian.PutUint64(b[32:], c.Cycle)
	binary.LittleEndian.PutUint32(b[44:], crc(b[:44]))
	return b
}

func decodeCheckpoint(b []byte) (checkpoint, error) {
	var c checkpoint
	if len(b) != checkpointSize || binary.LittleEndian.Uint32(b[0:]) != checkpointMagic {
		return c, fmt.Errorf("%w: checkpoint file is not a checkpoint", ErrInvalid)
	}
	if binary.LittleEndian.Uint32(b[44:]) != crc(b[:44]) {
		return c, fmt.Errorf("%w: checkpoint checksum", ErrInvalid)
	}
	if b[4] != checkpointVersion {
		return c, fmt.Errorf("%w: checkpoint version %d", ErrVersion, b[4])
	}
	c.Applied = binary.LittleEndian.Uint64(b[8:])
	c.Head = binary.LittleEndian.Uint64(b[16:])
	c.Released = binary.LittleEndian.Uint64(b[24:])
	c.Cycle = binary.LittleEndian.Uint64(b[32:])
	return c, nil
}

func readCheckpoint(fsys vfs.FS, dir string) (checkpoint, bool, error) {
	b, err := vfs.ReadFile(fsys, path.Join(dir, checkpointFile))
	if errors.Is(err, fs.ErrNotExist) {
		return checkpoint{Cycle: 1}, false, nil
	}
	if err != nil {
		return checkpoint{}, false, fmt.Errorf("journal: read checkpoint: %w", err)
	}
	c, err := decodeCheckpoint(b)
	if err != nil {
		return c, false, fmt.Errorf("journal: %w", err)
	}
	return c, true, nil
}

// dirtyMap is one bit per block of every disk: the blocks written since the
// last cycle the replica has, kept instead of cycles once the journal passes
// its cap. Its presence on disk means "resync required".
//
// File layout (little endian):
//
//	| magic u32 | version u8 | pad 3 | lsn u64 | released u64 | ndisks u32 |
//	| per disk: nwords u64, words u64... | crc32c u32 |
//
// lsn: records at or after it are marked again on recovery.
type dirtyMap struct {
	lsn      uint64
	released uint64
	words    [][]uint64
}

func newDirtyMap(sizes []int64) *dirtyMap {
	d := &dirtyMap{}
	for _, s := range sizes {
		d.words = append(d.words, make([]uint64, (s/BlockSize+63)/64))
	}
	return d
}

func (d *dirtyMap) set(disk int, block uint64) { d.words[disk][block/64] |= 1 << (block % 64) }

func (d *dirtyMap) setRange(disk int, off, n int64) {
	for b := uint64(off) / BlockSize; b <= uint64(off+n-1)/BlockSize; b++ {
		if b%64 == 0 && b+63 <= uint64(off+n-1)/BlockSize {
			d.words[disk][b/64] = ^uint64(0)
			b += 63
			continue
		}
		d.set(disk, b)
	}
}

// Count is the number of dirty blocks.
func (d *dirtyMap) count() int64 {
	var n int
	for _, ws := range d.words {
		for _, w := range ws {
			n += bits.OnesCount64(w)
		}
	}
	return int64(n)
}

func (d *dirtyMap) encode() []byte {
	b := binary.LittleEndian.AppendUint32(nil, dirtyMagic)
	b = append(b, dirtyVersion, 0, 0, 0)
	b = binary.LittleEndian.AppendUint64(b, d.lsn)
	b = binary.LittleEndian.AppendUint64(b, d.released)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(d.words)))
	for _, ws := range d.words {
		b = binary.LittleEndian.AppendUint64(b, uint64(len(ws)))
		for _, w := range ws {
			b = binary.LittleEndian.AppendUint64(b, w)
		}
	}
	return binary.LittleEndian.AppendUint32(b, crc(b))
}

func decodeDirty(b []byte, sizes []int64) (*dirtyMap, error) {
	bad := func(why string) (*dirtyMap, error) {
		return nil, fmt.Errorf("%w: dirty map: %s", ErrInvalid, why)
	}
	if len(b) < 32 || binary.LittleEndian.Uint32(b) != dirtyMagic {
		return bad("bad magic")
	}
	if binary.LittleEndian.Uint32(b[len(b)-4:]) != crc(b[:len(b)-4]) {
		return bad("checksum")
	}
	if b[4] != dirtyVersion {
		return nil, fmt.Errorf("%w: dirty map version %d", ErrVersion, b[4])
	}
	d := newDirtyMap(sizes)
	d.lsn = binary.LittleEndian.Uint64(b[8:])
	d.released = binary.LittleEndian.Uint64(b[16:])
	if int(binary.LittleEndian.Uint32(b[24:])) != len(sizes) {
		return bad("disk count changed")
	}
	p := b[28 : len(b)-4]
	for i := range d.words {
		if len(p) < 8 || binary.LittleEndian.Uint64(p) != uint64(len(d.words[i])) {
			return bad("disk size changed")
		}
		p = p[8:]
		if len(p) < 8*len(d.words[i]) {
			return bad("short")
		}
		for k := range d.words[i] {
			d.words[i][k] = binary.LittleEndian.Uint64(p[8*k:])
		}
		p = p[8*len(d.words[i]):]
	}
	return d, nil
}

func (j *Journal) diskSizes() []int64 {
	s := make([]int64, len(j.cfg.Disks))
	for i, d := range j.cfg.Disks {
		s[i] = d.Size
	}
	return s
}

func readDirty(fsys vfs.FS, dir string, sizes []int64) (*dirtyMap, error) {
	b, err := vfs.ReadFile(fsys, path.Join(dir, dirtyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: read dirty map: %w", err)
	}
	d, err := decodeDirty(b, sizes)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	return d, nil
}
