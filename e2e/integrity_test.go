package e2e

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// journalRecord is one record found in a journal segment file, parsed by the
// layout journal/doc.go writes down (segment header 32 bytes; record header
// 56 bytes: magic "VDJR", version 1, kind at 5, disk at 6, LSN at 8, disk
// offset at 24, length at 32, header CRC32C of bytes 0..51 at 52).
type journalRecord struct {
	segment  string // the segment file
	at       int64  // file offset of the record's header
	lsn      uint64
	kind     uint8
	disk     int
	off, len int64 // range of the disk (a write's payload length)
}

const (
	recWrite = 1
	recSeal  = 5
	recPad   = 6
)

// payload is the file offset of the record's payload.
func (r journalRecord) payload() int64 { return r.at + 56 }

// journalRecords parses every segment of the VM's journal on h, oldest
// first, each up to its first record that does not verify.
func journalRecords(t *testing.T, h *host, vm string) []journalRecord {
	t.Helper()
	dir := filepath.Join(h.state, "vms", vm, "journal")
	segs, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	if err != nil || len(segs) == 0 {
		t.Fatalf("no journal segments in %s (%v)", dir, err)
	}
	castagnoli := crc32.MakeTable(crc32.Castagnoli)
	var recs []journalRecord
	for _, seg := range segs {
		base, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(seg), ".seg"), 16, 64)
		if err != nil {
			t.Fatalf("segment name %s: %v", seg, err)
		}
		b, err := os.ReadFile(seg)
		if err != nil {
			t.Fatal(err)
		}
		for at := int64(32); at+56 <= int64(len(b)); {
			hd := b[at : at+56]
			if binary.LittleEndian.Uint32(hd) != 0x524a4456 || hd[4] != 1 ||
				binary.LittleEndian.Uint32(hd[52:]) != crc32.Checksum(hd[:52], castagnoli) ||
				binary.LittleEndian.Uint64(hd[8:]) != base+uint64(at) {
				break
			}
			r := journalRecord{segment: seg, at: at, lsn: base + uint64(at), kind: hd[5],
				disk: int(binary.LittleEndian.Uint16(hd[6:])),
				off:  int64(binary.LittleEndian.Uint64(hd[24:])), len: int64(binary.LittleEndian.Uint64(hd[32:]))}
			recs = append(recs, r)
			at += 56
			switch r.kind {
			case recWrite, recPad:
				at += r.len
			case recSeal:
				at += 16
			}
		}
	}
	return recs
}

// flipByte flips one byte of a file, as damage at rest would.
func flipByte(t *testing.T, name string, at int64) {
	t.Helper()
	b := []byte{readByte(t, name, at) ^ 0x5a}
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// closedWindow is a resync window that opens in two hours: an automatic
// resync waits, so the damage stays visible in status until the test asks
// for the resync.
func closedWindow() string {
	now := time.Now()
	return now.Add(2*time.Hour).Format("15:04") + "-" + now.Add(3*time.Hour).Format("15:04")
}

// cmpImages fails unless the replica's image of vm/disk0 equals the primary's
// image file byte for byte.
func cmpImages(t *testing.T, p *pair, primImg, vm string) {
	t.Helper()
	want, err := os.ReadFile(primImg)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(p.storage, vm, "disk0.img"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("replica image is %d bytes, primary %d", len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		n, first := 0, -1
		for i := range got {
			if got[i] != want[i] {
				if first < 0 {
					first = i
				}
				n++
			}
		}
		t.Fatalf("replica image differs from the primary's in %d bytes, the first at %d", n, first)
	}
}

// damageNamed waits until the primary's status says resync required with a
// reason that names the segment and the disk range of rec.
func damageNamed(t *testing.T, p *pair, rec journalRecord) primStatus {
	t.Helper()
	rng := fmt.Sprintf("bytes [%d,%d)", rec.off, rec.off+rec.len)
	s, ok := pollStatus(t, p.prim, "vm1", 30*time.Second, func(s primStatus) bool {
		return s.State == "resync-required" && strings.Contains(s.Reason, filepath.Base(rec.segment)) &&
			strings.Contains(s.Reason, rng) && strings.Contains(s.Reason, fmt.Sprintf("LSN %#x", rec.lsn))
	})
	if !ok {
		t.Fatalf("the damaged journal record (LSN %#x in %s, %s) is not named in the status: state %q health %q reason %q",
			rec.lsn, filepath.Base(rec.segment), rng, s.State, s.Health, s.Reason)
	}
	if s.Health != "warning" {
		t.Fatalf("resync required after damage should be a warning: %+v", s)
	}
	return s
}

// pairReplicaDown is a pair replicating vm1 (one 16 MiB disk, cycles only
// on sync, a resync window that is not now), its initial copy done, with
// the replica stopped. It returns the primary's image file.
func pairReplicaDown(t *testing.T) (*pair, string) {
	t.Helper()
	need(t, "qemu-io", "nbdcopy")
	p := newPairWith(t, pairOpts{primExtra: []string{"--resync-window", closedWindow()}})
	img := p.prim.addVM("vm1", "16M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")
	p.rep.stop()
	return p, img
}

// repair runs the resync the damage asks for and a sync after it, and checks
// the replica equals the primary's image and replicates normally again.
func repair(t *testing.T, p *pair, primImg string) {
	t.Helper()
	p.prim.run("replication", "resync", "vm1")
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	s := waitStatus(t, p.prim, "vm1", "replicating after the resync", func(s primStatus) bool { return s.State == "replicating" })
	if s.Health != "normal" {
		t.Fatalf("after the resync: %+v", s)
	}
	p.checkEqual(t, "vm1", "disk0")
	cmpImages(t, p, primImg, "vm1")
}

// TestIntegrityDamagedJournalScenario1 is issue 12's scenario 1: with the
// replica down, four 1 MiB patterns are written and flushed, the primary
// stops cleanly, and one byte inside the payload of a journaled write of
// the unshipped cycle is flipped. Both start, `replication sync` runs. The
// damaged cycle must not be applied as good: the primary names the record
// (segment, LSN, disk range) in status and log, and the resync makes the
// replica equal to the primary's image.
func TestIntegrityDamagedJournalScenario1(t *testing.T) {
	p, img := pairReplicaDown(t)
	sh(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x33 2M 1M", "-c", "write -P 0x44 3M 1M",
		"-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.stop()

	// The write of the third pattern, in the cycle not yet shipped.
	var rec journalRecord
	for _, r := range journalRecords(t, p.prim, "vm1") {
		if r.kind == recWrite && r.disk == 0 && r.off <= 2<<20 && r.off+r.len > 2<<20 {
			rec = r
		}
	}
	if rec.len == 0 {
		t.Fatalf("no journal record of the write at 2 MiB: %+v", journalRecords(t, p.prim, "vm1"))
	}
	flip := rec.len / 2
	flipByte(t, rec.segment, rec.payload()+flip)
	t.Logf("flipped the byte at disk offset %d: payload byte %d of the record at LSN %#x in %s",
		rec.off+flip, flip, rec.lsn, filepath.Base(rec.segment))

	p.prim.start()
	restartReplica(t, p)
	out, errOut, err := p.prim.try("replication", "sync", "vm1", "--timeout", "60s")
	if err == nil {
		t.Errorf("replication sync succeeded over a damaged journal record: %s", out)
	} else {
		t.Logf("replication sync refused: %v: %s%s", err, out, errOut)
	}
	s := damageNamed(t, p, rec)
	t.Logf("status names the damage: %s", s.Reason)
	// The damaged bytes never reached the replica.
	got, err := os.ReadFile(filepath.Join(p.storage, "vm1", "disk0.img"))
	if err != nil {
		t.Fatal(err)
	}
	if b := got[rec.off+flip]; b != 0 && b != 0x33 {
		t.Fatalf("the replica holds %#x at the damaged byte: the damage was shipped", b)
	}

	repair(t, p, img)
	if b := readByte(t, img, rec.off+flip); b != 0x33 {
		t.Fatalf("the primary's image holds %#x at the damaged byte, want the pattern 0x33", b)
	}
	p.prim.stop()
	if log := p.prim.log.String(); !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "journal damaged, resync required") {
		t.Fatalf("the primary did not log the damage at ERROR:\n%s", log)
	}
}

// TestIntegrityCutTailScenario2 is issue 12's scenario 2: 1 MiB is written
// and flushed, the write-back puts it in the image, the primary is killed
// (-9), and a byte of that last record is flipped. Restarted with
// replication on and the replica down, recovery cuts the record as a torn
// tail; its data is in the image all the same, so the record's range must
// reach the replica: the primary marks it resync required naming the range,
// and the resync makes the replica equal to the primary's image.
func TestIntegrityCutTailScenario2(t *testing.T) {
	p, img := pairReplicaDown(t)
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5c 4M 1M", "-c", "flush", p.prim.uri("vm1/disk0"))
	waitFor(t, "the write-back to put the write in the image", func() bool {
		return readByte(t, img, 4<<20) == 0x5c && readByte(t, img, 5<<20-1) == 0x5c
	})
	p.prim.kill()

	recs := journalRecords(t, p.prim, "vm1")
	rec := recs[len(recs)-1]
	if rec.kind != recWrite || rec.off != 4<<20 || rec.len != 1<<20 {
		t.Fatalf("the journal's last record is not the 1 MiB write at 4 MiB: %+v", rec)
	}
	flipByte(t, rec.segment, rec.payload()+12345)

	p.prim.start()
	cutAtRecovery := false
	if s, ok := pollStatus(t, p.prim, "vm1", 5*time.Second, func(s primStatus) bool { return s.State == "resync-required" }); ok {
		cutAtRecovery = true
		t.Logf("after the restart, with the replica down: %s", s.Reason)
	} else {
		// A checkpoint passed the record between the write-back and the
		// kill: recovery did not check it, and shipping it finds the damage.
		t.Logf("recovery kept the record (a checkpoint covered it); shipping must find the damage: %+v", s)
	}
	restartReplica(t, p)
	if out, _, err := p.prim.try("replication", "sync", "vm1", "--timeout", "60s"); err == nil {
		t.Errorf("replication sync succeeded although the replica lacks a cut record's data: %s", out)
	}
	damageNamed(t, p, rec)

	repair(t, p, img)
	p.prim.stop()
	if cutAtRecovery {
		if log := p.prim.log.String(); !strings.Contains(log, "level=WARN") || !strings.Contains(log, "resync required for its range") {
			t.Fatalf("recovery did not log the cut record at WARN:\n%s", log)
		}
	}
}

func readByte(t *testing.T, name string, at int64) byte {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	return b[0]
}
