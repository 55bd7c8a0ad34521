package apply

import (
	"bytes"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
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
