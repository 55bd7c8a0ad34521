package wire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite golden files")

func testHeader() Header {
	return Header{
		VM: "vm1", Kind: KindCycle, Cycle: 7, Prev: 6,
		Disks:  []Disk{{Name: "root", Size: 8 << 20}, {Name: "data", Size: 4 << 20}},
		Sealed: time.Unix(1700000000, 5).UTC(),
	}
}

// sample writes a stream with every frame type: a compressible block, an
// incompressible one, a multi-frame run, and ranges.
func sample(t testing.TB, compress bool) ([]byte, []Frame) {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	noise := make([]byte, 4096)
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	big := bytes.Repeat([]byte("vdrepl"), (MaxFrameData+8192)/6)
	big = big[:MaxFrameData+8192]
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), compress)
	if err != nil {
		t.Fatal(err)
	}
	want := []Frame{
		{Type: FrameTrim, Disk: 0, Offset: 0, Length: 1 << 20},
		{Type: FrameZero, Disk: 1, Offset: 4096, Length: 8192},
		{Type: FrameZeroAlloc, Disk: 1, Offset: 1 << 20, Length: 4096},
		{Type: FrameData, Disk: 0, Offset: 4096, Length: 4096, Data: bytes.Repeat([]byte{'a'}, 4096)},
		{Type: FrameData, Disk: 1, Offset: 0, Length: 4096, Data: noise},
		{Type: FrameData, Disk: 0, Offset: 2 << 20, Length: MaxFrameData, Data: big[:MaxFrameData]},
		{Type: FrameData, Disk: 0, Offset: 2<<20 + MaxFrameData, Length: 8192, Data: big[MaxFrameData:]},
	}
	for _, f := range want[:3] {
		if err := w.Range(f.Type, f.Disk, f.Offset, f.Length); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range [][]byte{want[3].Data, want[4].Data} {
		off := want[3].Offset
		disk := 0
		if bytes.Equal(d, noise) {
			off, disk = 0, 1
		}
		if err := w.Data(disk, off, d); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Data(0, 2<<20, big); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), want
}

func readAll(b []byte) (Header, []Frame, error) {
	r, err := NewReader(bytes.NewReader(b))
	if err != nil {
		return Header{}, nil, err
	}
	var got []Frame
	for {
		f, err := r.Next()
		if err == io.EOF {
			return r.Header(), got, nil
		}
		if err != nil {
			return r.Header(), got, err
		}
		f.Data = bytes.Clone(f.Data)
		got = append(got, f)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, compress := range []bool{false, true} {
		b, want := sample(t, compress)
		h, got, err := readAll(b)
		if err != nil {
			t.Fatalf("compress=%v: %v", compress, err)
		}
		if h.VM != "vm1" || h.Cycle != 7 || len(h.Disks) != 2 || !h.Sealed.Equal(testHeader().Sealed) {
			t.Fatalf("header %+v", h)
		}
		if len(got) != len(want) {
			t.Fatalf("compress=%v: %d frames, want %d", compress, len(got), len(want))
		}
		for i := range want {
			g, w := got[i], want[i]
			if g.Type != w.Type || g.Disk != w.Disk || g.Offset != w.Offset || g.Length != w.Length || !bytes.Equal(g.Data, w.Data) {
				t.Fatalf("compress=%v frame %d: got %v %d %d %d, want %v %d %d %d", compress, i, g.Type, g.Disk, g.Offset, g.Length, w.Type, w.Disk, w.Offset, w.Length)
			}
		}
	}
}

func TestCompressionShrinks(t *testing.T) {
	raw, _ := sample(t, false)
	z, _ := sample(t, true)
	if len(z)*4 > len(raw) {
		t.Fatalf("compressed stream %d bytes, raw %d: repetitive data should shrink 4x", len(z), len(raw))
	}
}

// Every single-byte change anywhere in a stream is caught, as corruption or
// (for the header's length field) as truncation.
func TestEveryByteFlipDetected(t *testing.T) {
	b, _ := sample(t, true)
	step := 1
	if testing.Short() {
		step = 97
	}
	for i := 0; i < len(b); i += step {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		_, _, err := readAll(c)
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrVersion) {
			t.Fatalf("flip at byte %d of %d not detected: %v", i, len(b), err)
		}
	}
}

func TestTruncationDetected(t *testing.T) {
	b, _ := sample(t, false)
	for _, n := range []int{0, 3, StreamHeaderSize, StreamHeaderSize + 10, len(b) / 2, len(b) - endPayloadSize - FrameHeaderSize, len(b) - 1} {
		_, _, err := readAll(b[:n])
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("stream cut at %d of %d: %v, want ErrTruncated", n, len(b), err)
		}
	}
	if _, _, err := readAll(append(bytes.Clone(b), 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte: %v, want ErrCorrupt", err)
	}
}

// A frame dropped from the middle (e.g. a lost chunk re-sent badly) fails
// the end frame's count and hash even though every frame verifies.
func TestDroppedFrameDetected(t *testing.T) {
	var a bytes.Buffer
	wa, _ := NewWriter(&a, testHeader(), false)
	wa.Range(FrameTrim, 0, 0, 4096)
	wa.Range(FrameTrim, 0, 8192, 4096)
	wa.Close()
	// Splice: the header, the first frame, the end frame.
	hdrLen := a.Len() - 2*FrameHeaderSize - FrameHeaderSize - endPayloadSize
	spliced := append(bytes.Clone(a.Bytes()[:hdrLen+FrameHeaderSize]), a.Bytes()[hdrLen+2*FrameHeaderSize:]...)
	if _, _, err := readAll(spliced); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("dropped frame: %v, want ErrCorrupt", err)
	}
}

func TestWriterRejectsOutOfRange(t *testing.T) {
	w, _ := NewWriter(io.Discard, testHeader(), false)
	for _, c := range []struct {
		disk   int
		off, n int64
	}{{2, 0, 4096}, {-1, 0, 1}, {0, -1, 1}, {1, 4 << 20, 1}, {0, 8<<20 - 1, 2}} {
		if err := w.Range(FrameTrim, c.disk, c.off, c.n); err == nil {
			t.Errorf("Range(%d, %d, %d) accepted", c.disk, c.off, c.n)
		}
	}
	if err := w.Range(FrameData, 0, 0, 1); err == nil {
		t.Error("Range of a data frame accepted")
	}
}

func TestVersionRejected(t *testing.T) {
	b, _ := sample(t, false)
	b[4] = 9
	if _, err := Verify(bytes.NewReader(b)); !errors.Is(err, ErrVersion) {
		t.Fatalf("version 9: %v", err)
	}
}

// The byte layout is pinned by a golden file: a change to it is a format
// change and needs a version bump.
func TestGolden(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{VM: "g", Kind: KindCycle, Cycle: 2, Prev: 1, Disks: []Disk{{Name: "d", Size: 1 << 20}}}, false)
	if err != nil {
		t.Fatal(err)
	}
	w.Range(FrameTrim, 0, 4096, 4096)
	w.Data(0, 0, []byte("hello, replica"))
	w.Close()
	got := hex.Dump(buf.Bytes())
	p := filepath.Join("testdata", "stream-v1.hex")
	if *update {
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -update once to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("stream layout changed:\n%s\nwant:\n%s", got, want)
	}
}

func TestPieces(t *testing.T) {
	disks := []Disk{{Size: 10}, {Size: 4}, {Size: 8}}
	if n := PieceCount(disks, 4); n != 3+1+2 {
		t.Fatalf("PieceCount = %d", n)
	}
	want := [][3]int64{{0, 0, 4}, {0, 4, 4}, {0, 8, 2}, {1, 0, 4}, {2, 0, 4}, {2, 4, 4}}
	for p, w := range want {
		d, off, n, ok := PieceRange(disks, 4, int64(p))
		if !ok || int64(d) != w[0] || off != w[1] || n != w[2] {
			t.Fatalf("piece %d = %d %d %d %v, want %v", p, d, off, n, ok, w)
		}
	}
	if _, _, _, ok := PieceRange(disks, 4, 6); ok {
		t.Fatal("piece 6 exists")
	}
}

func FuzzReader(f *testing.F) {
	// Small seeds keep the fuzzer fast; the big frames are covered above.
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, Header{VM: "f", Kind: KindCycle, Disks: []Disk{{Name: "d", Size: 1 << 20}}}, true)
	w.Range(FrameZero, 0, 0, 4096)
	w.Data(0, 8192, bytes.Repeat([]byte("ab"), 300))
	w.Data(0, 16384, []byte("xyz"))
	w.Close()
	f.Add(buf.Bytes())
	f.Add(buf.Bytes()[:60])
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReader(bytes.NewReader(b))
		if err != nil {
			return
		}
		for i := 0; i < 1<<16; i++ {
			fr, err := r.Next()
			if err != nil {
				return
			}
			if fr.Type == FrameData && int64(len(fr.Data)) != fr.Length {
				t.Fatalf("data frame with %d bytes for length %d", len(fr.Data), fr.Length)
			}
			d := r.Header().Disks[fr.Disk]
			if fr.Offset < 0 || fr.Offset+fr.Length > d.Size {
				t.Fatalf("frame outside disk: %+v", fr)
			}
		}
	})
}

// BenchmarkStream4K writes and reads a stream of 4 KiB data frames, the
// shape of a random-write cycle.
func BenchmarkStream4K(b *testing.B) {
	block := make([]byte, 4096)
	for i := range block {
		block[i] = byte(i * 7)
	}
	const blocks = 4096 // 16 MiB
	h := Header{VM: "b", Kind: KindCycle, Disks: []Disk{{Name: "d", Size: blocks * 4096}}}
	var buf bytes.Buffer
	b.SetBytes(blocks * 4096)
	for b.Loop() {
		buf.Reset()
		w, _ := NewWriter(&buf, h, false)
		for k := int64(0); k < blocks; k++ {
			w.Data(0, k*4096, block)
		}
		w.Close()
		r, err := NewReader(bytes.NewReader(buf.Bytes()))
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := r.Next(); err == io.EOF {
				break
			} else if err != nil {
				b.Fatal(err)
			}
		}
	}
}

// verifyPieces writes b to a Verifier in pieces of random sizes (up to max).
func verifyPieces(b []byte, seed uint64, max int) (Header, error) {
	rng := rand.New(rand.NewPCG(seed, 3))
	v := NewVerifier()
	for len(b) > 0 {
		n := min(len(b), 1+rng.IntN(max))
		if _, err := v.Write(b[:n]); err != nil {
			return Header{}, err
		}
		b = b[n:]
	}
	return v.Done()
}

// The Verifier, fed a stream in pieces of any size, accepts what the Reader
// accepts and rejects what it rejects, with the same kind of error.
func TestVerifierAgreesWithReader(t *testing.T) {
	for _, compress := range []bool{false, true} {
		b, _ := sample(t, compress)
		for seed, max := range []int{1 << 20, 8192, 33, 1} {
			if compress && max == 1 {
				continue // byte by byte is slow and adds nothing to 33
			}
			h, err := verifyPieces(b, uint64(seed), max)
			if err != nil || h.VM != "vm1" || h.Cycle != 7 {
				t.Fatalf("compress=%v pieces<=%d: %+v, %v", compress, max, h, err)
			}
		}
	}
	b, _ := sample(t, true)
	step := 1
	if testing.Short() {
		step = 97
	}
	for i := 0; i < len(b); i += step {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		_, _, rerr := readAll(c)
		_, verr := verifyPieces(c, uint64(i), 4096)
		for _, e := range []error{ErrCorrupt, ErrTruncated, ErrVersion} {
			if errors.Is(rerr, e) != errors.Is(verr, e) {
				t.Fatalf("flip at byte %d: reader says %v, verifier %v", i, rerr, verr)
			}
		}
		if verr == nil {
			t.Fatalf("flip at byte %d of %d not detected", i, len(b))
		}
	}
	for _, n := range []int{0, 3, StreamHeaderSize, StreamHeaderSize + 10, len(b) / 2, len(b) - 1} {
		if _, err := verifyPieces(b[:n], 1, 100); !errors.Is(err, ErrTruncated) {
			t.Fatalf("stream cut at %d of %d: %v, want ErrTruncated", n, len(b), err)
		}
	}
	if _, err := verifyPieces(append(bytes.Clone(b), 0), 1, 100); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte: %v, want ErrCorrupt", err)
	}
}

// SkipHash still checks every CRC and the end frame's counts; only a change
// the CRCs cannot see (the hash in the end frame itself) passes.
func TestReaderSkipHash(t *testing.T) {
	b, want := sample(t, false)
	read := func(b []byte) (int, error) {
		r, err := NewReader(bytes.NewReader(b))
		if err != nil {
			return 0, err
		}
		r.SkipHash()
		n := 0
		for {
			if _, err := r.Next(); err == io.EOF {
				return n, nil
			} else if err != nil {
				return n, err
			}
			n++
		}
	}
	if n, err := read(b); err != nil || n != len(want) {
		t.Fatalf("%d frames, %v; want %d", n, err, len(want))
	}
	c := bytes.Clone(b)
	c[len(c)-100] ^= 1 // inside the last data frame's payload
	if _, err := read(c); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped payload byte: %v, want ErrCorrupt", err)
	}
}
