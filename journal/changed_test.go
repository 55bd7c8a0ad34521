package journal

import (
	"bytes"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// changedBlocks lists the blocks ChangedSince(a) reports for the first 64
// blocks of disk.
func changedBlocks(t *testing.T, j *Journal, a uint64, disk int) []int {
	t.Helper()
	ch, err := j.ChangedSince(a, disk, 0, 64*BlockSize)
	if err != nil {
		t.Fatalf("ChangedSince(%d, disk %d): %v", a, disk, err)
	}
	var out []int
	for i, c := range ch {
		if c {
			out = append(out, i)
		}
	}
	return out
}

func blocks(ranges ...[2]int) []int {
	var out []int
	for _, r := range ranges {
		for b := r[0]; b < r[1]; b++ {
			out = append(out, b)
		}
	}
	return out
}

// ChangedSince finds the writes, zeroes and trims of closed cycles (in the
// cycle store), of the open cycle and still pending write-back, after the
// barrier asked about and not before it; a released cycle makes it unknown.
func TestChangedSince(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, testConfig(t, vfs.Default, dir, 1<<20, 1<<20))
	defer j.Close()
	d0, d1 := j.Disk(0), j.Disk(1)
	write := func(d *Disk, blk, n int) {
		t.Helper()
		if _, err := d.WriteAt(bytes.Repeat([]byte{byte(blk + 1)}, n*BlockSize), int64(blk)*BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	seal := func() uint64 {
		t.Helper()
		info, err := j.Seal(0)
		if err != nil {
			t.Fatal(err)
		}
		return info.Cycle
	}
	before := j.OpenCycle() - 1 // the barrier before anything was written
	write(d0, 2, 1)
	write(d1, 7, 1) // another disk: never reported for disk 0
	c1 := seal()
	write(d0, 5, 1)
	if err := d0.Zero(8*BlockSize, 4*BlockSize, false); err != nil {
		t.Fatal(err)
	}
	c2 := seal()
	// The open cycle: a write, a 64 KiB write, a trim, and a sub-block
	// write that widens to its block.
	write(d0, 30, 1)
	write(d0, 40, 16)
	if err := d0.Trim(60*BlockSize, BlockSize); err != nil {
		t.Fatal(err)
	}
	if _, err := d0.WriteAt([]byte{1, 2, 3}, 62*BlockSize+100); err != nil {
		t.Fatal(err)
	}
	if j.Stats().PendingBlocks == 0 {
		t.Fatal("no block is pending write-back: the test does not cover pending writes")
	}

	open := blocks([2]int{30, 31}, [2]int{40, 56}, [2]int{60, 61}, [2]int{62, 63})
	for _, tc := range []struct {
		a    uint64
		want []int
	}{
		{before, append(blocks([2]int{2, 3}, [2]int{5, 6}, [2]int{8, 12}), open...)},
		{c1, append(blocks([2]int{5, 6}, [2]int{8, 12}), open...)},
		{c2, open},
	} {
		if got := changedBlocks(t, j, tc.a, 0); !slices.Equal(got, tc.want) {
			t.Errorf("changed since cycle %d: blocks %v, want %v", tc.a, got, tc.want)
		}
	}
	if got := changedBlocks(t, j, before, 1); !slices.Equal(got, []int{7}) {
		t.Errorf("disk 1 changed since cycle %d: blocks %v, want [7]", before, got)
	}
	// A range that starts inside a run of the cycle store.
	ch, err := j.ChangedSince(c1, 0, 9*BlockSize+512, 2*BlockSize)
	if err != nil || !slices.Equal(ch, []bool{true, true, true}) {
		t.Errorf("blocks 9-11 changed since cycle %d: %v, %v", c1, ch, err)
	}

	// Once the write-back put the open cycle in the image, it still counts.
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	if got := changedBlocks(t, j, c2, 0); !slices.Equal(got, open) {
		t.Errorf("after the write-back, changed since cycle %d: blocks %v, want %v", c2, got, open)
	}

	if err := j.Release(c1); err != nil {
		t.Fatal(err)
	}
	if _, err := j.ChangedSince(before, 0, 0, BlockSize); !errors.Is(err, ErrTooOld) {
		t.Errorf("changed since a released cycle: %v, want ErrTooOld", err)
	}
	if got := changedBlocks(t, j, c1, 0); !slices.Equal(got, append(blocks([2]int{5, 6}, [2]int{8, 12}), open...)) {
		t.Errorf("after releasing cycle %d, changed since it: %v", c1, got)
	}
	if err := j.SetRetain(false); err != nil {
		t.Fatal(err)
	}
	if _, err := j.ChangedSince(c2, 0, 0, BlockSize); !errors.Is(err, ErrTooOld) {
		t.Errorf("changed since with cycles no longer kept: %v, want ErrTooOld", err)
	}
	if _, err := j.ChangedSince(c2, 0, 1<<20, BlockSize); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("a range past the disk: %v, want ErrOutOfRange", err)
	}
}

// A trim or zero is in the image only once applied (rangeOp punches it
// after the record is durable, under the write-back's lock): until then a
// reader sees the old data, so it counts as changed even when its cycle is
// at or before the barrier asked about.
func TestChangedSinceTrimNotYetInTheImage(t *testing.T) {
	j := mustOpen(t, testConfig(t, vfs.Default, t.TempDir(), 1<<20, 1<<20))
	defer j.Close()
	d0 := j.Disk(0)
	if _, err := d0.WriteAt(bytes.Repeat([]byte{7}, 8*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	// Hold the write-back's lock: the trim is journaled and indexed, not
	// punched.
	j.wb.Lock()
	trimmed := make(chan error, 1)
	go func() { trimmed <- d0.Trim(2*BlockSize, 2*BlockSize) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		j.mu.Lock()
		queued := slices.ContainsFunc(j.mu.queue, func(q queued) bool { return q.h.Kind == KindTrim })
		j.mu.Unlock()
		if queued {
			break
		}
		if time.Now().After(deadline) {
			j.wb.Unlock()
			t.Fatal("the trim never reached the write-back queue")
		}
	}
	info, err := j.Seal(0)
	if err != nil {
		j.wb.Unlock()
		t.Fatal(err)
	}
	got := changedBlocks(t, j, info.Cycle, 0)
	buf := make([]byte, BlockSize)
	rerr := j.readAt(0, buf, 2*BlockSize)
	j.wb.Unlock()
	if err := <-trimmed; err != nil {
		t.Fatal(err)
	}
	if rerr != nil || buf[0] != 7 {
		t.Fatalf("the trim was in the image while held: %v, %d", rerr, buf[0])
	}
	if want := []int{2, 3}; !slices.Equal(got, want) {
		t.Fatalf("changed since cycle %d holding a trim not yet applied: %v, want %v", info.Cycle, got, want)
	}
	// Once applied, the trim of a cycle up to the barrier is not a change.
	if err := j.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := j.writeBack(); err != nil {
		t.Fatal(err)
	}
	if got := changedBlocks(t, j, info.Cycle, 0); len(got) != 0 {
		t.Fatalf("changed since cycle %d after the trim was applied: %v", info.Cycle, got)
	}
}

// A cycle released while ChangedSince scans the cycle store may have been
// dropped before the scan reached it: the answer is ErrTooOld, not one
// that misses its blocks.
func TestChangedSinceReleaseDuringTheScan(t *testing.T) {
	j := mustOpen(t, testConfig(t, vfs.Default, t.TempDir(), 1<<20, 1<<20))
	defer j.Close()
	a := j.OpenCycle() - 1
	if _, err := j.Disk(0).WriteAt(bytes.Repeat([]byte{1}, BlockSize), 3*BlockSize); err != nil {
		t.Fatal(err)
	}
	info, err := j.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	if got := changedBlocks(t, j, a, 0); !slices.Equal(got, []int{3}) {
		t.Fatalf("changed since cycle %d: %v, want [3]", a, got)
	}
	j.scanned = func() {
		j.scanned = nil
		if err := j.Release(info.Cycle); err != nil {
			t.Error(err)
		}
	}
	if _, err := j.ChangedSince(a, 0, 0, 64*BlockSize); !errors.Is(err, ErrTooOld) {
		t.Fatalf("changed since cycle %d, released during the scan: %v, want ErrTooOld", a, err)
	}
}
