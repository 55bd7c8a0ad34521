package blockdev_test

// Maps of a journaled disk through the front ends: lseek on the FUSE file
// and (nbd_map_clients_test.go) real NBD clients.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/journal"
)

// newJournalDisk opens a one-disk journal on the real filesystem. Nothing
// syncs it by itself for an hour, so writes stay in the journal (not in the
// image) until a Flush, a trim or a zero.
func newJournalDisk(t *testing.T, size int64) (*journal.Journal, *journal.Disk) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk0.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	j, err := journal.Open(journal.Config{Dir: filepath.Join(dir, "journal"),
		Disks:        []journal.DiskSpec{{Name: "disk0", Path: img, Size: size}},
		SyncInterval: time.Hour, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := j.Close(); err != nil {
			t.Errorf("journal Close: %v", err)
		}
	})
	return j, j.Disk(0)
}

// mapLayout writes, trims and zeroes a journaled disk of at least 8 MiB
// into a known map, the last writes left only in the journal, and returns
// that map. In KiB: data 0-64, 1024-1088 (trimmed 1040-1056), 2048-2052
// (journal only), 4096-4224 (zeroed 4160-4176, partly journal only),
// 6000-6004 (journal only); holes elsewhere.
func mapLayout(t *testing.T, j *journal.Journal, d blockdev.Disk) []blockdev.Extent {
	t.Helper()
	const k = 1 << 10
	fill := func(off, n int64, b byte) {
		t.Helper()
		if _, err := d.WriteAt(bytes.Repeat([]byte{b}, int(n)), off); err != nil {
			t.Fatal(err)
		}
	}
	fill(0, 64*k, 1)
	fill(1024*k, 64*k, 2)
	fill(4096*k, 64*k, 4)
	if err := j.Flush(); err != nil { // synced: the write-back may take them
		t.Fatal(err)
	}
	if err := d.Trim(1040*k, 16*k); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(4160*k, 16*k, true); err != nil {
		t.Fatal(err)
	}
	// From here on nothing syncs the journal: these stay out of the image.
	fill(2048*k, 4*k, 3)
	fill(4176*k, 48*k, 5)
	fill(6000*k, 4*k, 6)
	if n := j.Stats().PendingBlocks; n < 14 {
		t.Fatalf("%d blocks pending, want the 14 just written still in the journal", n)
	}
	H := func(from, to int64) blockdev.Extent {
		return blockdev.Extent{Offset: from * k, Length: (to - from) * k, Hole: true, Zero: true}
	}
	D := func(from, to int64) blockdev.Extent {
		return blockdev.Extent{Offset: from * k, Length: (to - from) * k}
	}
	size := d.Size() / k
	return []blockdev.Extent{D(0, 64), H(64, 1024), D(1024, 1040), H(1040, 1056), D(1056, 1088), H(1088, 2048),
		D(2048, 2052), H(2052, 4096), D(4096, 4160), H(4160, 4176), D(4176, 4224), H(4224, 6000), D(6000, 6004), H(6004, size)}
}

func TestFUSESeekDataHole(t *testing.T) {
	const size = 8 << 20
	j, d := newJournalDisk(t, size)
	want := mapLayout(t, j, d)
	got, err := d.Extents(0, size)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("journal map:\n got %v\nwant %v", got, want)
	}
	cat := newFUSECatalogue()
	cat.exports["vm1/disk0"] = blockdev.Export{Name: "vm1/disk0", Disk: d}
	m := fuseMount(t, cat, nil)
	path := filepath.Join(m.Mountpoint(), "vm1", "disk0.img")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seek := func(off int64, whence int) (int64, error) { return unix.Seek(int(f.Fd()), off, whence) }

	// From every boundary, one byte in, and one byte before the next:
	// SEEK_DATA and SEEK_HOLE land where the map says.
	for i, e := range want {
		next := func(hole bool) int64 { // start of the first extent at or after i of that kind
			for _, x := range want[i:] {
				if x.Hole == hole {
					return x.Offset
				}
			}
			if hole {
				return size
			}
			return -1
		}
		for _, off := range []int64{e.Offset, e.Offset + 1, e.Offset + e.Length - 1} {
			wantData, wantHole := next(false), next(true)
			if !e.Hole {
				wantData = off
			} else {
				wantHole = off
			}
			gotData, err := seek(off, unix.SEEK_DATA)
			if wantData < 0 {
				if !errors.Is(err, unix.ENXIO) {
					t.Errorf("SEEK_DATA from %d: %d, %v; want ENXIO", off, gotData, err)
				}
			} else if err != nil || gotData != wantData {
				t.Errorf("SEEK_DATA from %d: %d, %v; want %d", off, gotData, err, wantData)
			}
			if gotHole, err := seek(off, unix.SEEK_HOLE); err != nil || gotHole != wantHole {
				t.Errorf("SEEK_HOLE from %d: %d, %v; want %d", off, gotHole, err, wantHole)
			}
		}
	}
	if _, err := seek(size, unix.SEEK_DATA); !errors.Is(err, unix.ENXIO) {
		t.Errorf("SEEK_DATA at the end: %v, want ENXIO", err)
	}
	if _, err := seek(size, unix.SEEK_HOLE); !errors.Is(err, unix.ENXIO) {
		t.Errorf("SEEK_HOLE at the end: %v, want ENXIO", err)
	}

	// cp --sparse=always copies the data and leaves the holes holes.
	if _, err := exec.LookPath("cp"); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "copy.img")
	if out, err := exec.Command("cp", "--sparse=always", path, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	src := make([]byte, size)
	if _, err := d.ReadAt(src, 0); err != nil {
		t.Fatal(err)
	}
	cp, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cp, src) {
		t.Fatal("cp --sparse=always changed the data")
	}
	var st unix.Stat_t
	if err := unix.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	// 388 KiB of data; allow the filesystem its own rounding.
	if alloc := st.Blocks * 512; alloc > 1<<20 {
		t.Errorf("the sparse copy allocates %d bytes for 388 KiB of data", alloc)
	}
}
