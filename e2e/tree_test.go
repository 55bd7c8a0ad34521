package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// randomBlockWrites is qemu-io commands that write n 4 KiB blocks of a
// disk of size bytes, each at a random block with its own pattern.
func randomBlockWrites(rng *rand.Rand, size int64, n int) []string {
	seen := map[int64]bool{}
	var args []string
	for len(seen) < n {
		b := rng.Int64N(size / 4096)
		if seen[b] {
			continue
		}
		seen[b] = true
		args = append(args, "-c", fmt.Sprintf("write -P %d %d 4k", 1+rng.IntN(250), b*4096))
	}
	return append(args, "-c", "flush")
}

// A resync after 1% of a disk's blocks changed reads about the changed
// blocks on the primary, not the disk: both sides compare their block
// trees. The replica ends byte-equal, the status says which cycle the
// replica verified against the primary's roots, and a kill -9 of the
// primary with an intact journal needs no resync at all afterwards.
func TestTreeResyncReadsOnlyChanged(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	const size = 64 << 20
	p := newPair(t)
	img := p.prim.addVM("vm1", "64M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 40M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h", "--verify-every", "24h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")

	// A cycle after the initial copy is checked against the primary's
	// roots (the trees are built by now: the sync waited for them).
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	waitStatus(t, p.prim, "vm1", "a verified cycle", func(s primStatus) bool { return s.Verified > 0 })

	p.prim.run("replication", "pause", "vm1")
	rng := rand.New(rand.NewPCG(7, 12))
	const changed = size / 4096 / 100
	sh(t, "qemu-io", append(append([]string{"-f", "raw"}, randomBlockWrites(rng, size, changed)...), p.prim.uri("vm1/disk0"))...)
	before := primaryStatus(t, p.prim, "vm1")
	p.prim.run("replication", "resync", "vm1")
	p.prim.run("replication", "resume", "vm1")
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	after := primaryStatus(t, p.prim, "vm1")
	read := after.Metrics.SyncReadBytesTotal - before.Metrics.SyncReadBytesTotal
	t.Logf("resync of %d changed blocks read %d bytes of the primary's %d-byte disk (%.1f%%), sent %d bytes",
		changed, read, size, 100*float64(read)/size, after.Metrics.SyncWireBytesTotal-before.Metrics.SyncWireBytesTotal)
	if read > size/10 {
		t.Fatalf("the resync read %d bytes, more than 10%% of the %d-byte disk: it did not compare block trees", read, size)
	}
	if read < changed*4096 {
		t.Fatalf("the resync read %d bytes, less than the %d changed bytes", read, changed*4096)
	}
	p.checkEqual(t, "vm1", "disk0")
	cmpImages(t, p, img, "vm1")
	text := p.prim.run("replication", "status", "vm1")
	if !strings.Contains(text, "verified at:  cycle") || !strings.Contains(text, "verify:       scheduled every 24h0m0s") {
		t.Fatalf("replication status lacks the verified cycle:\n%s", text)
	}

	// kill -9 with an intact journal: recovery replays it, no resync.
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 20M 1M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.kill()
	p.prim.start()
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	s := primaryStatus(t, p.prim, "vm1")
	if s.State != "replicating" || s.Metrics.SyncWireBytesTotal != after.Metrics.SyncWireBytesTotal {
		t.Fatalf("after a kill -9 with an intact journal: state %q, sync bytes %d -> %d (a resync ran)",
			s.State, after.Metrics.SyncWireBytesTotal, s.Metrics.SyncWireBytesTotal)
	}
	p.checkEqual(t, "vm1", "disk0")
}

// A replica whose image was damaged at rest and whose block tree was then
// rebuilt from that image (a replica host that lost its tree) no longer
// holds what the primary had: the roots of the next cycle differ, the
// replica says which disk diverged, and the primary repairs it with a
// block-tree resync, without an admin. Then the replica is byte-equal and
// verified again.
func TestDivergedReplicaIsRepaired(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	p := newPair(t)
	img := p.prim.addVM("vm1", "16M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 8M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")

	p.rep.stop()
	const at = 3<<20 + 100
	flipByte(t, filepath.Join(p.storage, "vm1", "disk0.img"), at)
	if err := os.RemoveAll(filepath.Join(p.storage, "vm1", "tree")); err != nil {
		t.Fatal(err)
	}
	restartReplica(t, p)
	before := primaryStatus(t, p.prim, "vm1").Metrics.SyncReadBytesTotal

	// Cycles go on; the first one checked against the rebuilt tree
	// diverges, and the repair follows on its own.
	var last uint64
	for i := 0; i < 3; i++ {
		sh(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %d 64k", 0x70+i, 12<<20+i<<16), "-c", "flush", p.prim.uri("vm1/disk0"))
		p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
		last = primaryStatus(t, p.prim, "vm1").LastApplied
	}
	s := waitStatus(t, p.prim, "vm1", "the repair of the diverged replica", func(s primStatus) bool {
		return s.State == "replicating" && s.Diverged == nil && s.Verified >= last && s.Metrics.SyncReadBytesTotal > before
	})
	t.Logf("verified at cycle %d after the repair, which read %d bytes of the primary's image", s.Verified, s.Metrics.SyncReadBytesTotal-before)
	if read := s.Metrics.SyncReadBytesTotal - before; read > 1<<20 {
		t.Fatalf("the repair read %d bytes: a block-tree resync reads only what differs", read)
	}
	p.checkEqual(t, "vm1", "disk0")
	cmpImages(t, p, img, "vm1")
	if log := p.rep.log.String(); !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "disk0") || !strings.Contains(log, "diverg") {
		t.Fatalf("the replica's log does not name the divergence of disk0:\n%s", log)
	}
	if log := p.prim.log.String(); !strings.Contains(log, fmt.Sprintf("[%d,%d)", at&^4095, at&^4095+4096)) {
		t.Fatalf("the primary's log does not name the repaired range [%d,%d):\n%s", at&^4095, at&^4095+4096, log)
	}
}

// `vdrepl verify VM --point ID` on the replica host reads a recovery point
// back and compares it with the roots recorded when it was taken: every
// point of an intact replica matches (exit 0); after a byte of the image
// is flipped, the latest point, which shares that block with the image,
// does not (exit 1, the disk named).
func TestVerifyRecoveryPoint(t *testing.T) {
	need(t, "qemu-io")
	p := newPair(t)
	p.prim.addVM("vm1", "8M")
	// Data the cycles overwrite: the undo data then holds blocks, not
	// only records of zero blocks.
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h",
		"--recovery-points", "3", "--quiesce-cmd", "/bin/true")
	// An application-consistent cycle is always a point (the quiesce
	// command does nothing here).
	for i := 0; i < 4; i++ {
		sh(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %d 256k", 0x30+i, i<<20), "-c", "flush", p.prim.uri("vm1/disk0"))
		p.prim.run("replication", "sync", "vm1", "--timeout", "60s", "--app-consistent")
	}
	var pts struct {
		Points []struct {
			ID string `json:"id"`
		} `json:"points"`
	}
	if err := json.Unmarshal([]byte(p.rep.run("replication", "points", "vm1", "--json")), &pts); err != nil || len(pts.Points) < 2 {
		t.Fatalf("points: %+v %v", pts, err)
	}
	for _, pt := range pts.Points {
		out := p.rep.run("verify", "vm1", "--point", pt.ID)
		if !strings.Contains(out, "disk disk0: matches") {
			t.Fatalf("verify --point %s of an intact replica:\n%s", pt.ID, out)
		}
	}
	// Damage at rest in the undo data: the oldest point reads through
	// every segment, and the record's checksum names the damage.
	segs, err := filepath.Glob(filepath.Join(p.storage, "vm1", "points", "*.undo"))
	if err != nil || len(segs) == 0 {
		t.Fatalf("no undo segments: %v", err)
	}
	flipByte(t, segs[0], 32+40+100) // inside the first record's payload
	out, errOut, err := p.rep.try("verify", "vm1", "--point", pts.Points[0].ID)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(errOut, filepath.Base(segs[0])) {
		t.Fatalf("verify --point %s over damaged undo data %s: %v\n%s%s", pts.Points[0].ID, segs[0], err, out, errOut)
	}
	t.Logf("damaged undo data: %s", strings.TrimSpace(errOut))
	flipByte(t, segs[0], 32+40+100)

	latest := pts.Points[len(pts.Points)-1].ID
	flipByte(t, filepath.Join(p.storage, "vm1", "disk0.img"), 7<<20+5)
	out, _, err = p.rep.try("verify", "vm1", "--point", latest)
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "disk disk0: DIFFERS") {
		t.Fatalf("verify --point %s over a damaged image: %v\n%s", latest, err, out)
	}
}

// A byte flipped at rest in the primary's image (while its daemon is
// down, after the write-back put the block there) is found by a verify,
// which says this host's image is the damaged side: the block no longer
// hashes to what the primary's tree recorded when it was written, and the
// replica's tree holds that hash. No resync starts, which would copy the
// damage to the replica; the replica keeps the good block.
func TestVerifyFindsPrimaryDamage(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	p := newPair(t)
	img := p.prim.addVM("vm1", "16M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 8M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")
	good := readByte(t, img, 2<<20+7)

	p.prim.stop()
	flipByte(t, img, 2<<20+7)
	p.prim.start()
	r, code := verify(t, p.prim)
	if code != 1 || r.MismatchBlocks != 1 || r.ResyncMarked || !strings.HasPrefix(r.Truth, "replica") {
		t.Fatalf("verify over a damaged primary image: exit %d, %+v", code, r)
	}
	text, _, _ := p.prim.try("verify", "vm1", "--dry-run") // exit 1: blocks differ
	if !strings.Contains(text, "DAMAGED:    disk disk0 on THIS host: 1 blocks") || !strings.Contains(text, fmt.Sprintf("[%d,%d)", 2<<20, 2<<20+4096)) {
		t.Fatalf("verify does not name the damaged block on this host:\n%s", text)
	}
	if s := primaryStatus(t, p.prim, "vm1"); s.State != "replicating" {
		t.Fatalf("primary damage started something: %+v", s)
	}
	if got := readByte(t, filepath.Join(p.storage, "vm1", "disk0.img"), 2<<20+7); got != good {
		t.Fatalf("the replica's copy of the damaged block changed: %#x, want %#x", got, good)
	}
}
