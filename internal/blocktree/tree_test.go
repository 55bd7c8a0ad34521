package blocktree

import (
	"bytes"
	"math/rand/v2"
	"testing"

	badger "github.com/dgraph-io/badger/v4"
)

func openDB(t *testing.T, dir string) *badger.DB {
	t.Helper()
	db, err := badger.Open(Options(dir))
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// built returns a fully built tree of img (one disk), from scratch.
func built(t *testing.T, img []byte) *Tree {
	t.Helper()
	db := openDB(t, t.TempDir())
	t.Cleanup(func() { db.Close() })
	tr, _, err := Open(db, []byte("x"), []int64{int64(len(img))})
	if err != nil {
		t.Fatal(err)
	}
	for {
		done, err := tr.BuildStep(0, bytes.NewReader(img), 1<<20, nil)
		if err != nil {
			t.Fatal(err)
		}
		if done {
			return tr
		}
	}
}

func TestIncrementalRootMatchesRebuild(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const size = 8<<20 + 3*BlockSize + 100 // a partial last block
	img := make([]byte, size)
	for i := 0; i < 40; i++ {
		off := rng.IntN(size)
		n := min(rng.IntN(200<<10), size-off)
		for j := off; j < off+n; j++ {
			img[j] = byte(rng.Uint32())
		}
	}
	tr := built(t, img)
	r0, ok := tr.Root(0)
	if !ok {
		t.Fatal("root of a built tree is not known")
	}
	if again, _ := built(t, img).Root(0); again != r0 {
		t.Fatalf("two builds of one image: %v and %v", r0, again)
	}
	for round := 0; round < 30; round++ {
		b := tr.Batch()
		for k := 0; k < 1+rng.IntN(20); k++ {
			blk := rng.Int64N((size + BlockSize - 1) / BlockSize)
			off := blk * BlockSize
			n := min(int64(1+rng.IntN(8))*BlockSize, size-off)
			switch rng.IntN(3) {
			case 0:
				for j := off; j < off+n; j++ {
					img[j] = byte(rng.Uint32())
				}
				b.Data(0, off, img[off:off+n])
			case 1:
				clear(img[off : off+n])
				b.Zero(0, off, n)
			case 2: // rewrite with the same bytes
				b.Data(0, off, img[off:off+n])
			}
		}
		if err := b.Commit(); err != nil {
			t.Fatal(err)
		}
		got, ok := tr.Root(0)
		want, _ := built(t, img).Root(0)
		if !ok || got != want {
			t.Fatalf("round %d: incremental root %v (known %v), rebuilt %v", round, got, ok, want)
		}
	}
	// Leaves and blocks agree with a rebuild too.
	ref := built(t, img)
	n := int64((size + LeafSize - 1) / LeafSize)
	a, err := tr.Leaves(0, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	bl, _ := ref.Leaves(0, 0, n)
	for i := range a {
		if a[i] != bl[i] || a[i] == 0 {
			t.Fatalf("leaf %d: %#x, rebuilt %#x", i, a[i], bl[i])
		}
	}
	hs, _ := tr.Blocks(0, 5*BlockSize, 40*BlockSize)
	for i, h := range hs {
		off := int64(5+i) * BlockSize
		if want := HashBlock(img[off:min(off+BlockSize, size)]); h != want {
			t.Fatalf("block %d: %#x, want %#x", 5+i, h, want)
		}
	}
}

func TestUnknownBlocksHideTheRoot(t *testing.T) {
	img := make([]byte, 1<<20)
	tr := built(t, img)
	b := tr.Batch()
	b.Data(0, 100, []byte("partial")) // covers part of block 0
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, ok := tr.Root(0); ok {
		t.Fatal("root known with an Unknown block")
	}
	if l, _ := tr.Leaves(0, 0, 1); l[0] != 0 {
		t.Fatalf("leaf with an Unknown block has digest %#x", l[0])
	}
	b = tr.Batch()
	b.Zero(0, 0, BlockSize)
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if r, ok := tr.Root(0); !ok || r != (Root{}) {
		t.Fatalf("zero disk: root %v known %v, want zero and known", r, ok)
	}
}

func TestReopenKeepsOrResets(t *testing.T) {
	dir := t.TempDir()
	img := bytes.Repeat([]byte("abcdefg"), 300000)
	db := openDB(t, dir)
	tr, reset, err := Open(db, []byte("p"), []int64{int64(len(img))})
	if err != nil || !reset {
		t.Fatalf("first open: reset %v, %v", reset, err)
	}
	for done := false; !done; {
		if done, err = tr.BuildStep(0, bytes.NewReader(img), 256<<10, nil); err != nil {
			t.Fatal(err)
		}
	}
	root, _ := tr.Root(0)
	if err := tr.Sync(); err != nil {
		t.Fatal(err)
	}
	db.Close()

	db = openDB(t, dir)
	tr, reset, err = Open(db, []byte("p"), []int64{int64(len(img))})
	if err != nil || reset {
		t.Fatalf("reopen: reset %v, %v", reset, err)
	}
	if r, ok := tr.Root(0); !ok || r != root {
		t.Fatalf("reopened root %v (known %v), want %v", r, ok, root)
	}
	// Dirty at open: reset, nothing claimed.
	if err := tr.Begin(); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db = openDB(t, dir)
	defer db.Close()
	tr, reset, err = Open(db, []byte("p"), []int64{int64(len(img))})
	if err != nil || !reset {
		t.Fatalf("open of a dirty tree: reset %v, %v", reset, err)
	}
	if _, ok := tr.Root(0); ok {
		t.Fatal("a reset tree claims a root")
	}
	if hs, _ := tr.Blocks(0, 0, BlockSize); hs[0] != Unknown {
		t.Fatalf("a reset tree claims block 0 is %#x", hs[0])
	}
	// Other sizes: reset too.
	if _, reset, _ = Open(db, []byte("p"), []int64{int64(len(img)) + BlockSize}); !reset {
		t.Fatal("open with another disk size kept the tree")
	}
}

func TestSplitCommit(t *testing.T) {
	const size = (maxTxnLeaves*2 + 5) * LeafSize
	img := make([]byte, size)
	tr := built(t, img)
	b := tr.Batch()
	for off := int64(0); off < size; off += LeafSize {
		img[off] = 1
		b.Data(0, off, img[off:off+BlockSize])
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, dirty := tr.State(); dirty {
		t.Fatal("split commit left the tree dirty")
	}
	got, _ := tr.Root(0)
	if want, _ := built(t, img).Root(0); got != want {
		t.Fatalf("root after a split commit %v, rebuilt %v", got, want)
	}
}

func TestParseRoot(t *testing.T) {
	r := Root{0x0123456789abcdef, 42}
	got, err := ParseRoot(r.String())
	if err != nil || got != r {
		t.Fatalf("ParseRoot(%q) = %v, %v", r.String(), got, err)
	}
	if _, err := ParseRoot("xyz"); err == nil {
		t.Fatal("ParseRoot of junk succeeded")
	}
}

func TestRootOfMatchesTree(t *testing.T) {
	img := make([]byte, 3<<20+5000)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < len(img); i += 7 {
		img[i] = byte(rng.Uint32())
	}
	clear(img[1<<20 : 2<<20]) // a zero stretch
	want, _ := built(t, img).Root(0)
	for _, bufSize := range []int{0, LeafSize, 1 << 20, 4 << 20} {
		got, err := RootOf(bytes.NewReader(img), int64(len(img)), make([]byte, bufSize))
		if err != nil || got != want {
			t.Fatalf("RootOf with a %d-byte buffer: %v, %v; tree %v", bufSize, got, err, want)
		}
	}
}
