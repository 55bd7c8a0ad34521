package apply

import (
	"bytes"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// directReader returns a file's bytes exactly, across blocks and with a
// size that is not a multiple of the alignment, and Close stops it
// mid-file. The test directory must be on a filesystem with O_DIRECT (not
// tmpfs), or there is nothing to test (in CI that fails the test).
func TestDirectReaderReadsTheFile(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 8))
	for _, size := range []int{0, 1, 4095, 4096, 4097, directBlock, 2*directBlock + 12345} {
		want := make([]byte, size)
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		name := filepath.Join(dir, "s")
		if err := os.WriteFile(name, want, 0o600); err != nil {
			t.Fatal(err)
		}
		d, err := openDirect(name, int64(size))
		if err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("no O_DIRECT on %s: %v", dir, err)
			}
			t.Skipf("no O_DIRECT on %s: %v", dir, err)
		}
		// Odd read sizes, as bufio and the wire reader ask.
		var got bytes.Buffer
		buf := make([]byte, 100003)
		for {
			n, err := d.Read(buf[:1+rng.IntN(len(buf)-1)])
			got.Write(buf[:n])
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("size %d: %v after %d bytes", size, err, got.Len())
			}
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("size %d: read %d bytes that differ from the file", size, got.Len())
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Closed after the first read of a large file: the read-ahead stops.
	name := filepath.Join(dir, "s")
	d, err := openDirect(name, 2*directBlock+12345)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

// gather writes contiguous frames as one, flushes on a gap, another image
// or when full, and leaves frames it does not take to the caller; the
// images end up as if every frame had been written in order.
func TestGatherWritesFramesInOrder(t *testing.T) {
	dir := t.TempDir()
	const size = 3 * gatherMax
	open := func(n string) vfs.File {
		f, err := vfs.Default.OpenFile(filepath.Join(dir, n), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	imgs := []vfs.File{open("a"), open("b")}
	want := [][]byte{make([]byte, size), make([]byte, size)}
	rng := rand.New(rand.NewPCG(9, 10))
	type frame struct {
		disk int
		off  int64
		n    int
	}
	frames := []frame{
		{0, 0, 1 << 20}, {0, 1 << 20, 1 << 20}, // contiguous
		{0, 4 << 20, 64 << 10},       // a gap
		{1, 4<<20 + 64<<10, 1 << 20}, // another image at the offset that would follow
		{0, 4<<20 + 64<<10, 4096},    // too small: the caller writes it
		{0, 8 << 20, gatherMax},      // a whole gather
		{0, 16 << 20, 1 << 20},
		{0, 17 << 20, 1 << 20},
		{0, 16<<20 + 4096, 8192}, // overwrites what the gather holds: flushed first
	}
	for _, n := range []int{7, 9} { // fill up past gatherMax
		for i := 0; i < n; i++ {
			frames = append(frames, frame{1, int64(8<<20 + i<<20), 1 << 20})
		}
	}
	var g gather
	for _, fr := range frames {
		p := make([]byte, fr.n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		copy(want[fr.disk][fr.off:], p)
		took, err := g.add(imgs[fr.disk], p, fr.off)
		if err != nil {
			t.Fatal(err)
		}
		if took {
			continue
		}
		if err := g.flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := imgs[fr.disk].WriteAt(p, fr.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.flush(); err != nil {
		t.Fatal(err)
	}
	for d, img := range imgs {
		got := make([]byte, size)
		if _, err := img.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[d]) {
			t.Fatalf("image %d differs from the frames written in order", d)
		}
	}
}
