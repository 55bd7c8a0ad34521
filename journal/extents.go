package journal

import (
	"fmt"
	"slices"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Extents describes [off, off+length) of the disk as consecutive extents
// (it makes the disk a blockdev.Mapper, so the front ends can skip holes):
// the image's own map of data and holes (vfs.Map, SEEK_DATA/SEEK_HOLE),
// with every block newer in the journal than in the image laid over it as
// data. It answers at block granularity inside the image's map.
//
// Trims and zeroes need no overlay: rangeOp applies them to the image (a
// punched hole, or zeroed blocks) before it returns, so the image's map
// already shows them, and one still under way is concurrent with this call
// and may be in the answer or not, as it may be in a read's.
func (d *Disk) Extents(off, length int64) ([]vfs.Extent, error) {
	if length <= 0 || off < 0 || off > d.size || length > d.size-off {
		return nil, fmt.Errorf("%w: map of [%d, +%d) on a %d-byte disk", ErrOutOfRange, off, length, d.size)
	}
	return d.j.extents(d.idx, off, length)
}

// extents is Disk.Extents. It looks at the journal's pending blocks first
// and at the image second. The write-back writes a block to the image
// before it drops it from pending (writeBackRecord), so a block it moves
// meanwhile is seen in the first look or the second, never in neither: data
// is never called a hole. The other order could miss it. Pending blocks are
// read under mu, as readAt reads them; the image's map needs no lock of the
// journal's (segMu, which readAt also takes, guards journal segments, which
// a map never reads).
func (j *Journal) extents(disk int, off, length int64) ([]vfs.Extent, error) {
	var pending []int64 // blocks newer in the journal, ascending
	if j.npending.Load() != 0 {
		j.mu.Lock()
		forEachKeyInRange(j.mu.pending, disk, off, length, func(key, _ uint64) {
			pending = append(pending, int64(key&(1<<48-1)))
		})
		j.mu.Unlock()
		slices.Sort(pending)
	}
	img, err := vfs.Map(j.images[disk], off, length)
	if err != nil {
		return nil, fmt.Errorf("journal: map of disk %d: %w", disk, err)
	}
	if len(pending) == 0 {
		return img, nil
	}
	return overlayData(img, pending), nil
}

// overlayData lays the given blocks (ascending) over a map as data: where
// they fall in a hole or zeroed extent, that part becomes data.
func overlayData(img []vfs.Extent, blocks []int64) []vfs.Extent {
	var out []vfs.Extent
	add := func(e vfs.Extent) {
		if e.Length <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Hole == e.Hole && out[k].Zero == e.Zero && out[k].Offset+out[k].Length == e.Offset {
			out[k].Length += e.Length
			return
		}
		out = append(out, e)
	}
	b := 0
	for _, e := range img {
		end := e.Offset + e.Length
		if !e.Hole && !e.Zero {
			add(e)
			continue
		}
		pos := e.Offset
		for b < len(blocks) && blocks[b]*BlockSize < end {
			from := max(blocks[b]*BlockSize, pos)
			to := min((blocks[b]+1)*BlockSize, end)
			if to <= pos { // a block wholly before this extent
				b++
				continue
			}
			add(vfs.Extent{Offset: pos, Length: from - pos, Hole: e.Hole, Zero: e.Zero})
			add(vfs.Extent{Offset: from, Length: to - from})
			pos = to
			if to < (blocks[b]+1)*BlockSize {
				break // the block goes on into the next extent
			}
			b++
		}
		add(vfs.Extent{Offset: pos, Length: end - pos, Hole: e.Hole, Zero: e.Zero})
	}
	return out
}
