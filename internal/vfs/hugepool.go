package vfs

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HugePool hands out DirectAlign-aligned buffers of one size, carved from
// memory the kernel is asked to back with transparent huge pages.
//
// Why: a block device takes a bounded number of physically separate pieces
// per request (max_segments: 254 on the virtio disk of the development
// machine). A 1 MiB buffer of 4 KiB pages is 256 pieces, so every 1 MiB
// O_DIRECT write from ordinary memory reached the disk as two requests, and
// a 16 MiB vectored write as seventeen; from a huge page it is one piece per
// 2 MiB. fio's 1 MiB sequential O_DIRECT writes at queue depth 4 on that
// disk: 1.3-1.9 GB/s in 512 KiB requests from ordinary memory, 3.6-3.9 GB/s
// in 1 MiB requests from huge pages (bench/RESULTS.md).
//
// The pool grows by slabs up to max bytes and never shrinks; past max, Get
// says no and the caller allocates on the heap. Where the kernel gives no
// huge pages (THP "never", or no memory to compact) the buffers are ordinary
// pages and only the pooling remains. A buffer must go back with Put exactly
// once; a buffer dropped instead keeps its slot until the process ends.
type HugePool struct {
	size, max int

	mu    sync.Mutex
	free  [][]byte
	out   map[uintptr]struct{} // start addresses of the buffers handed out
	slabs [][2]uintptr         // [start, end) of every slab
	total int
}

const (
	hugePageSize = 2 << 20
	hugeSlabSize = 32 << 20
)

// NewHugePool returns a pool of buffers of size bytes (a multiple of
// DirectAlign, at most a slab) holding at most max bytes.
func NewHugePool(size, max int) *HugePool {
	if size <= 0 || size%DirectAlign != 0 || size > hugeSlabSize {
		panic("vfs: HugePool buffer size must be a positive multiple of DirectAlign up to 32 MiB")
	}
	return &HugePool{size: size, max: max, out: make(map[uintptr]struct{})}
}

// Size is the length of every buffer of the pool.
func (p *HugePool) Size() int { return p.size }

// InUse is how many buffers are handed out.
func (p *HugePool) InUse() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.out)
}

// Get returns a buffer of Size bytes (not zeroed), or ok false when the pool
// is at its max or the kernel refused the memory.
func (p *HugePool) Get() (b []byte, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) == 0 && !p.growLocked() {
		return nil, false
	}
	b = p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	p.out[uintptr(unsafe.Pointer(&b[0]))] = struct{}{}
	return b, true
}

// Put gives back a buffer Get returned (or a slice of it from its start)
// and reports whether it was one. A second Put of the same buffer is
// ignored: two owners of one buffer would corrupt each other's data.
func (p *HugePool) Put(b []byte) bool {
	if cap(b) == 0 {
		return false
	}
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.out[addr]; ok {
		delete(p.out, addr)
		p.free = append(p.free, unsafe.Slice(unsafe.SliceData(b), p.size))
		return true
	}
	for _, s := range p.slabs {
		if addr >= s[0] && addr < s[1] {
			return true // not handed out: a second Put, or a slice from inside
		}
	}
	return false
}

// growLocked maps one more slab, 2 MiB aligned and advised for huge pages,
// and carves it into free buffers.
func (p *HugePool) growLocked() bool {
	if p.total+hugeSlabSize > p.max {
		return false
	}
	// The slab is never unmapped: its buffers live as long as the pool,
	// which lives as long as the process. The unaligned edges of the
	// mapping are never touched, so they cost address space, not memory.
	m, err := unix.Mmap(-1, 0, hugeSlabSize+hugePageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return false
	}
	base := uintptr(unsafe.Pointer(&m[0]))
	skip := int((hugePageSize - base%hugePageSize) % hugePageSize)
	slab := m[skip : skip+hugeSlabSize]
	// Advice only: without it the memory is ordinary pages, still usable.
	_ = unix.Madvise(slab, unix.MADV_HUGEPAGE)
	start := uintptr(unsafe.Pointer(&slab[0]))
	p.slabs = append(p.slabs, [2]uintptr{start, start + hugeSlabSize})
	p.total += hugeSlabSize
	for off := hugeSlabSize/p.size*p.size - p.size; off >= 0; off -= p.size {
		p.free = append(p.free, slab[off:off+p.size:off+p.size])
	}
	return true
}
