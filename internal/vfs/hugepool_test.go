package vfs

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

func TestHugePool(t *testing.T) {
	const size = DirectAlign + 1<<20
	p := NewHugePool(size, hugeSlabSize) // one slab: 31 buffers
	perSlab := hugeSlabSize / size

	seen := map[uintptr]bool{}
	var bufs [][]byte
	for range perSlab {
		b, ok := p.Get()
		if !ok {
			t.Fatalf("Get %d of %d: pool refused", len(bufs)+1, perSlab)
		}
		addr := uintptr(unsafe.Pointer(&b[0]))
		if len(b) != size || cap(b) != size || addr%DirectAlign != 0 || seen[addr] {
			t.Fatalf("buffer %d: len %d cap %d at %#x (seen before %v)", len(bufs), len(b), cap(b), addr, seen[addr])
		}
		seen[addr] = true
		b[0], b[size-1] = 1, 2 // the memory is writable end to end
		bufs = append(bufs, b)
	}
	if _, ok := p.Get(); ok {
		t.Fatal("Get past max succeeded")
	}
	if n := p.InUse(); n != perSlab {
		t.Fatalf("InUse %d, want %d", n, perSlab)
	}

	// A foreign buffer is not the pool's; a slice of a pool buffer from its
	// start goes back; a second Put of it is ignored, so it is handed out
	// once only.
	if p.Put(AlignedBuffer(size)) || p.Put(nil) {
		t.Fatal("Put of a foreign buffer reported as the pool's")
	}
	if !p.Put(bufs[3][:100]) || !p.Put(bufs[3]) {
		t.Fatal("Put of a pool buffer reported as foreign")
	}
	b, ok := p.Get()
	if !ok || &b[0] != &bufs[3][0] || len(b) != size {
		t.Fatalf("Get after Put: ok %v, not the buffer given back", ok)
	}
	if _, ok := p.Get(); ok {
		t.Fatal("a buffer put twice was handed out twice")
	}
}

// Every buffer is handed to one owner at a time, under concurrent use.
func TestHugePoolConcurrent(t *testing.T) {
	p := NewHugePool(64<<10, 2*hugeSlabSize)
	var mu sync.Mutex
	owner := map[uintptr]int{}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 2000 {
				b, ok := p.Get()
				if !ok {
					t.Error("pool refused below its max")
					return
				}
				addr := uintptr(unsafe.Pointer(&b[0]))
				mu.Lock()
				if o, taken := owner[addr]; taken {
					t.Errorf("buffer %#x handed to %d while %d holds it", addr, g, o)
				}
				owner[addr] = g
				mu.Unlock()
				b[0] = byte(g)
				mu.Lock()
				delete(owner, addr)
				mu.Unlock()
				p.Put(b)
			}
		}()
	}
	wg.Wait()
}

// The slabs are advised for transparent huge pages: the kernel marks their
// mapping eligible unless THP is off on this machine.
func TestHugePoolAdvised(t *testing.T) {
	// A kernel built without THP has no setting: nothing is eligible.
	mode, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("THP setting: %v", err)
	}
	want := "1"
	if err != nil || strings.Contains(string(mode), "[never]") {
		want = "0"
	}
	p := NewHugePool(DirectAlign+1<<20, hugeSlabSize)
	b, ok := p.Get()
	if !ok {
		t.Fatal("Get failed")
	}
	defer p.Put(b)
	addr := uintptr(unsafe.Pointer(&b[0]))
	got, err := thpEligible(addr)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("THPeligible %s for the slab (THP %q), want %s", got, strings.TrimSpace(string(mode)), want)
	}
}

// thpEligible is the THPeligible line of the mapping holding addr.
func thpEligible(addr uintptr) (string, error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return "", err
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		// A mapping starts with "lo-hi perms ...", its fields are "Key: value".
		if f := strings.Fields(line); len(f) > 0 && !strings.HasSuffix(f[0], ":") {
			var lo, hi uintptr
			if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err != nil {
				return "", fmt.Errorf("smaps line %q: %v", line, err)
			}
			in = addr >= lo && addr < hi
			continue
		}
		if v, ok := strings.CutPrefix(line, "THPeligible:"); ok && in {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no mapping holds %#x", addr)
}
