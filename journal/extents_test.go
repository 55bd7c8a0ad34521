package journal

import (
	"bytes"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// fmtMap prints a map as "H0K-64K D64K-96K ...", in KiB, for messages.
func fmtMap(m []vfs.Extent) string {
	var b bytes.Buffer
	for _, e := range m {
		c := "D"
		switch {
		case e.Hole:
			c = "H"
		case e.Zero:
			c = "Z"
		}
		fmt.Fprintf(&b, "%s%dK-%dK ", c, e.Offset>>10, (e.Offset+e.Length)>>10)
	}
	return b.String()
}

// TestExtentsMap: a map of data written back, data only in the journal,
// trims and zeroes, on both the real filesystem and MemFS.
func TestExtentsMap(t *testing.T) {
	const k = 1 << 10
	for _, name := range []string{"os", "memfs"} {
		t.Run(name, func(t *testing.T) {
			var fsys vfs.FS = vfs.Default
			dir := t.TempDir()
			if name == "memfs" {
				fsys, dir = vfs.NewMemFS(), "/vm"
			}
			cfg := testConfig(t, fsys, dir, 1<<20)
			j := mustOpen(t, cfg)
			defer func() { j.Close() }()
			d := j.Disk(0)
			check := func(what, want string) {
				t.Helper()
				m, err := d.Extents(0, 1<<20)
				if err != nil {
					t.Fatal(err)
				}
				if got := fmtMap(m); got != want {
					t.Errorf("%s:\n got %s\nwant %s", what, got, want)
				}
			}
			check("new disk", "H0K-1024K ")

			// Written back: in the image.
			if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 64*k), 64*k); err != nil {
				t.Fatal(err)
			}
			if _, err := d.WriteAt(bytes.Repeat([]byte{8}, 128*k), 512*k); err != nil {
				t.Fatal(err)
			}
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := j.writeBack(); err != nil {
				t.Fatal(err)
			}
			if n := j.Stats().PendingBlocks; n != 0 {
				t.Fatalf("%d blocks pending after the write-back", n)
			}
			check("written back", "H0K-64K D64K-128K H128K-512K D512K-640K H640K-1024K ")

			// A trim and an unaligned zero reach the image before they
			// return; the zero's partial blocks are written as data.
			if err := d.Trim(96*k, 16*k); err != nil {
				t.Fatal(err)
			}
			if err := d.Zero(520*k+512, 16*k, true); err != nil {
				t.Fatal(err)
			}
			// Now writes that stay in the journal: nothing syncs it.
			if _, err := d.WriteAt(bytes.Repeat([]byte{9}, 4*k), 100*k); err != nil {
				t.Fatal(err)
			}
			if _, err := d.WriteAt([]byte{1}, 900*k+10); err != nil {
				t.Fatal(err)
			}
			if n := j.Stats().PendingBlocks; n < 2 {
				t.Fatalf("%d blocks pending, want the two just written", n)
			}
			want := "H0K-64K D64K-96K H96K-100K D100K-104K H104K-112K D112K-128K H128K-512K " +
				"D512K-524K H524K-536K D536K-640K H640K-900K D900K-904K H904K-1024K "
			check("trimmed, zeroed, pending", want)

			// A map of a part starts and ends where asked.
			m, err := d.Extents(98*k, 4*k+100)
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprint(m); got != fmt.Sprint([]vfs.Extent{{Offset: 98 * k, Length: 2 * k, Hole: true, Zero: true}, {Offset: 100 * k, Length: 2*k + 100}}) {
				t.Errorf("map of [98K, +4K+100) = %s", got)
			}
			for _, bad := range [][2]int64{{-1, 10}, {0, 0}, {1 << 20, 1}, {1<<20 - 1, 2}} {
				if _, err := d.Extents(bad[0], bad[1]); err == nil {
					t.Errorf("Extents(%d, %d) did not fail", bad[0], bad[1])
				}
			}

			// After the write-back the map is the same.
			if err := j.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := j.writeBack(); err != nil {
				t.Fatal(err)
			}
			check("all written back", want)
		})
	}
}

// TestExtentsMatchContent: after random writes, trims and zeroes, with and
// without write-back, every extent called zero reads as zeroes and every
// block holding data lies in a data extent.
func TestExtentsMatchContent(t *testing.T) {
	const size = 4 << 20
	for seed := uint64(1); seed <= 4; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 14))
			cfg := testConfig(t, vfs.NewMemFS(), "/vm", size)
			j := mustOpen(t, cfg)
			defer j.Close()
			d := j.Disk(0)
			for i := 0; i < 300; i++ {
				off := r.Int64N(size - 1)
				n := 1 + r.Int64N(min(size-off, 256<<10))
				var err error
				switch r.IntN(10) {
				case 0, 1:
					err = d.Trim(off, n)
				case 2:
					err = d.Zero(off, n, r.IntN(2) == 0)
				case 3:
					if err = j.Flush(); err == nil {
						err = j.writeBack()
					}
				default:
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(1 + r.IntN(255))
					}
					_, err = d.WriteAt(p, off)
				}
				if err != nil {
					t.Fatal(err)
				}
				if i%50 == 49 {
					checkMapContent(t, d)
				}
			}
			checkMapContent(t, d)
		})
	}
}

func checkMapContent(t *testing.T, d *Disk) {
	t.Helper()
	content := make([]byte, d.Size())
	if _, err := d.ReadAt(content, 0); err != nil {
		t.Fatal(err)
	}
	m, err := d.Extents(0, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	pos := int64(0)
	for _, e := range m {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %+v where %d was due: %s", e, pos, fmtMap(m))
		}
		if e.Zero || e.Hole {
			if i := bytes.IndexFunc(content[e.Offset:e.Offset+e.Length], func(r rune) bool { return r != 0 }); i >= 0 {
				t.Fatalf("extent %+v is called zero but byte %d is not", e, e.Offset+int64(i))
			}
		}
		pos += e.Length
	}
	if pos != d.Size() {
		t.Fatalf("map ends at %d of %d", pos, d.Size())
	}
}

// TestExtentsDuringWriteBack: a block written before a map was asked for is
// data in it, while the write-back moves blocks from the journal to the
// image underneath (the order extents looks in).
func TestExtentsDuringWriteBack(t *testing.T) {
	const size = 8 << 20
	cfg := testConfig(t, vfs.NewMemFS(), "/vm", size)
	j := mustOpen(t, cfg)
	defer j.Close()
	d := j.Disk(0)
	var written atomic.Int64 // blocks [0, written) hold data
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(2)
	go func() { // writer
		defer wg.Done()
		defer close(stop)
		blk := bytes.Repeat([]byte{0x5a}, BlockSize)
		for b := int64(0); b < size/BlockSize; b += 3 { // every third block: holes between
			if _, err := d.WriteAt(blk, b*BlockSize); err != nil {
				t.Error(err)
				return
			}
			written.Store(b + 1)
		}
	}()
	go func() { // write-back
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := j.Flush(); err != nil {
				t.Error(err)
				return
			}
			if err := j.writeBack(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	maps := 0
	for done := false; !done; {
		select {
		case <-stop:
			done = true
		default:
		}
		upTo := written.Load()
		m, err := d.Extents(0, size)
		if err != nil {
			t.Fatal(err)
		}
		maps++
		for _, e := range m {
			if !e.Zero && !e.Hole {
				continue
			}
			for b := (e.Offset + BlockSize - 1) / BlockSize; b*BlockSize < e.Offset+e.Length && b < upTo; b++ {
				if b%3 == 0 {
					t.Fatalf("block %d, written before the map was asked for, is in hole %+v", b, e)
				}
			}
		}
	}
	wg.Wait()
	t.Logf("%d maps taken while writing", maps)
}

func TestOverlayData(t *testing.T) {
	H := func(off, n int64) vfs.Extent { return vfs.Extent{Offset: off, Length: n, Hole: true, Zero: true} }
	D := func(off, n int64) vfs.Extent { return vfs.Extent{Offset: off, Length: n} }
	const B = BlockSize
	for _, tt := range []struct {
		name   string
		img    []vfs.Extent
		blocks []int64
		want   []vfs.Extent
	}{
		{"none", []vfs.Extent{H(0, 4*B)}, nil, []vfs.Extent{H(0, 4*B)}},
		{"middle", []vfs.Extent{H(0, 4*B)}, []int64{1, 2}, []vfs.Extent{H(0, B), D(B, 2*B), H(3*B, B)}},
		{"in data", []vfs.Extent{D(0, 2*B), H(2*B, 2*B)}, []int64{0, 3}, []vfs.Extent{D(0, 2*B), H(2*B, B), D(3*B, B)}},
		{"joins data", []vfs.Extent{D(0, B), H(B, B), D(2*B, B)}, []int64{1}, []vfs.Extent{D(0, 3*B)}},
		{"unaligned range", []vfs.Extent{H(100, 2*B-200)}, []int64{0, 1}, []vfs.Extent{D(100, 2*B-200)}},
		{"block across extents", []vfs.Extent{H(0, B/2), D(B/2, 10), H(B/2+10, 2*B)}, []int64{0}, []vfs.Extent{D(0, B), H(B, B+B/2+10)}},
	} {
		if got := overlayData(tt.img, tt.blocks); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("%s: %s, want %s", tt.name, fmtMap(got), fmtMap(tt.want))
		}
	}
}

// hookFS runs hook once, right after the first SeekData on an image has
// answered: the moment a map that looked at the image first would be stale.
type hookFS struct {
	vfs.FS
	hook func()
	once sync.Once
}

type hookFile struct {
	vfs.File
	fs *hookFS
}

func (h *hookFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := h.FS.OpenFile(name, flag, perm)
	if err != nil || !strings.HasSuffix(name, ".img") {
		return f, err
	}
	return hookFile{f, h}, nil
}

func (f hookFile) SeekData(off int64) (int64, error) {
	n, err := f.File.(vfs.Seeker).SeekData(off)
	if f.fs.hook != nil {
		f.fs.once.Do(f.fs.hook)
	}
	return n, err
}

func (f hookFile) SeekHole(off int64) (int64, error) { return f.File.(vfs.Seeker).SeekHole(off) }

// TestExtentsWriteBackBetweenLooks: the write-back moves a block from the
// journal to the image between the image's map and the journal's look, in
// the order that would lose it if the image were looked at first.
func TestExtentsWriteBackBetweenLooks(t *testing.T) {
	hfs := &hookFS{FS: vfs.NewMemFS()}
	cfg := testConfig(t, hfs, "/vm", 1<<20)
	j := mustOpen(t, cfg)
	defer j.Close()
	d := j.Disk(0)
	if _, err := d.WriteAt(bytes.Repeat([]byte{1}, BlockSize), 8*BlockSize); err != nil {
		t.Fatal(err)
	}
	hfs.hook = func() {
		if err := j.Flush(); err != nil {
			t.Error(err)
		}
		if err := j.writeBack(); err != nil {
			t.Error(err)
		}
	}
	m, err := d.Extents(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if n := j.Stats().PendingBlocks; n != 0 {
		t.Fatalf("the hook did not write the block back: %d pending", n)
	}
	if got, want := fmtMap(m), "H0K-32K D32K-36K H36K-1024K "; got != want {
		t.Fatalf("map while the block moved: %s, want %s", got, want)
	}
}
