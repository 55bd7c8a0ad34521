package blockdev_test

// Real clients (libnbd's nbdinfo and nbdcopy, qemu-img, qemu-io) against a
// journaled disk: they must see its holes, including blocks that are still
// only in the journal.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
)

// countDisk counts the bytes read from a disk and forwards its map, as the
// daemon's wrapper does.
type countDisk struct {
	blockdev.Disk
	read atomic.Int64
}

func (c *countDisk) ReadAt(p []byte, off int64) (int, error) {
	c.read.Add(int64(len(p)))
	return c.Disk.ReadAt(p, off)
}

func (c *countDisk) Extents(off, length int64) ([]blockdev.Extent, error) {
	return c.Disk.(blockdev.Mapper).Extents(off, length)
}

// serveDisk serves d as the one export "vm1/disk0" on a unix socket and
// returns its URI and the socket.
func serveDisk(t *testing.T, d blockdev.Disk) (uri, sock string) {
	t.Helper()
	cat := &catalogue{}
	cat.set(blockdev.Export{Name: "vm1/disk0", Disk: d})
	srv := blockdev.NewNBDServer(blockdev.NBDConfig{Exports: cat, Logger: testLogger(t)})
	sock = filepath.Join(shortDir(t), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return fmt.Sprintf("nbd+unix:///vm1/disk0?socket=%s", sock), sock
}

// dataRuns reduces a map to its data runs, "[from,to)" in bytes, merged.
func dataRuns(ext []blockdev.Extent) string {
	var b strings.Builder
	var from, to int64 = -1, -1
	flush := func() {
		if from >= 0 {
			fmt.Fprintf(&b, "[%d,%d) ", from, to)
		}
	}
	for _, e := range ext {
		if e.Zero || e.Hole {
			continue
		}
		if e.Offset == to {
			to += e.Length
			continue
		}
		flush()
		from, to = e.Offset, e.Offset+e.Length
	}
	flush()
	return b.String()
}

func TestNBDClientMap(t *testing.T) {
	needBinaries(t, "nbdinfo", "qemu-img", "qemu-io")
	const size = 8 << 20
	j, d := newJournalDisk(t, size)
	want := mapLayout(t, j, d)
	cd := &countDisk{Disk: d}
	uri, sock := serveDisk(t, cd)

	t.Run("nbdinfo --map", func(t *testing.T) {
		out := runClient(t, "nbdinfo", "--map", "--json", uri)
		var got []struct {
			Offset int64  `json:"offset"`
			Length int64  `json:"length"`
			Type   uint32 `json:"type"`
			Desc   string `json:"description"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
		}
		var wantS, gotS []string
		for _, e := range want {
			typ := 0
			if e.Hole {
				typ = 3
			}
			wantS = append(wantS, fmt.Sprintf("%d+%d:%d", e.Offset, e.Length, typ))
		}
		for _, e := range got {
			gotS = append(gotS, fmt.Sprintf("%d+%d:%d", e.Offset, e.Length, e.Type))
		}
		if fmt.Sprint(gotS) != fmt.Sprint(wantS) {
			t.Errorf("nbdinfo --map:\n got %v\nwant %v", gotS, wantS)
		}
		if n := j.Stats().PendingBlocks; n < 14 {
			t.Errorf("the journal-only blocks were written back during the test (%d pending): the map did not see them there", n)
		}
	})

	t.Run("qemu-img map", func(t *testing.T) {
		out := runClient(t, "qemu-img", "map", "--output=json", "--image-opts",
			"driver=nbd,export=vm1/disk0,server.type=unix,server.path="+sock)
		var got []struct {
			Start  int64 `json:"start"`
			Length int64 `json:"length"`
			Data   bool  `json:"data"`
			Zero   bool  `json:"zero"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("qemu-img map: %v\n%s", err, out)
		}
		var ext []blockdev.Extent
		for _, e := range got {
			if !e.Data && !e.Zero {
				t.Errorf("qemu-img map: extent %+v neither data nor zero", e)
			}
			ext = append(ext, blockdev.Extent{Offset: e.Start, Length: e.Length, Zero: !e.Data, Hole: !e.Data})
		}
		if g, w := dataRuns(ext), dataRuns(want); g != w {
			t.Errorf("qemu-img map data:\n got %s\nwant %s\n%s", g, w, out)
		}
	})

	t.Run("qemu-img convert", func(t *testing.T) {
		dst := filepath.Join(t.TempDir(), "copy.img")
		before := cd.read.Load()
		runClient(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, dst)
		// qemu-img reads only what block status calls data.
		if n := cd.read.Load() - before; n > 1<<20 {
			t.Errorf("qemu-img convert read %d bytes of an 8 MiB disk holding 388 KiB", n)
		}
		got, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		src := make([]byte, size)
		if _, err := d.ReadAt(src, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, src) {
			t.Fatal("qemu-img convert changed the data")
		}
		var st unix.Stat_t
		if err := unix.Stat(dst, &st); err != nil {
			t.Fatal(err)
		}
		// The holes are not written (qemu-img also skips zeroes it reads,
		// so this holds the copy to sparseness, not the map).
		if alloc := st.Blocks * 512; alloc > 1<<20 {
			t.Errorf("qemu-img convert wrote %d bytes of an 8 MiB disk holding 388 KiB", alloc)
		}
	})

	t.Run("structured reads of holes and data", func(t *testing.T) {
		// qemu-io negotiates structured replies: the hole comes back
		// as an OFFSET_HOLE chunk and must read as zeroes.
		out := runClient(t, "qemu-io", "-f", "raw", "-r", uri,
			"-c", "read -P 0 64k 960k", // a hole
			"-c", "read -P 1 0 64k", // data written back
			"-c", "read -P 3 2048k 4k", // data only in the journal
			"-c", "read -P 0 1040k 16k", // trimmed
			"-c", "read -P 0 4160k 16k", // zeroed
			"-c", "read -P 5 4176k 48k", // journal only, next to the zeroed hole
			"-c", "read -v 2044k 8k") // across hole and data
		if strings.Contains(out, "failed") || strings.Count(out, "read ") != 7 {
			t.Fatalf("qemu-io reads:\n%s", out)
		}
	})
}

func TestNBDClientNbdcopySparse(t *testing.T) {
	needBinaries(t, "nbdcopy")
	const size = 1 << 30
	_, jd := newJournalDisk(t, size)
	d := &countDisk{Disk: jd}
	// 10 MiB of data: ten 1 MiB runs spread over the disk.
	var data []int64
	for i := int64(0); i < 10; i++ {
		off := i*(size/10) + 4096*(i%3)
		if _, err := d.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 1<<20), off); err != nil {
			t.Fatal(err)
		}
		data = append(data, off)
	}
	uri, _ := serveDisk(t, d)
	dst := filepath.Join(t.TempDir(), "copy.img")
	start := time.Now()
	runClient(t, "nbdcopy", uri, dst)
	read := d.read.Load()
	t.Logf("nbdcopy of a 1 GiB disk holding 10 MiB read %d bytes from the disk in %v", read, time.Since(start))
	if read < 10<<20 || read >= 64<<20 {
		t.Errorf("nbdcopy read %d bytes from the disk, want 10 MiB and less than 64 MiB", read)
	}
	f, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, want := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += 1 << 20 {
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if _, err := jd.ReadAt(want, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("the copy differs in the MiB at %d", off)
		}
	}
	var st os.FileInfo
	if st, err = f.Stat(); err != nil || st.Size() != size {
		t.Fatalf("copy size: %v %v", st, err)
	}
}
