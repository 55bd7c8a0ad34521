package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pointsOf lists a replica VM's recovery points on h.
type pointJSON struct {
	ID            string    `json:"ID"`
	Cycle         uint64    `json:"Cycle"`
	Time          time.Time `json:"Time"`
	AppConsistent bool      `json:"AppConsistent"`
	Bytes         int64     `json:"Bytes"`
}

func pointsOf(t *testing.T, h *host, vm string) []pointJSON {
	t.Helper()
	var out struct {
		Points []pointJSON `json:"points"`
	}
	if err := json.Unmarshal([]byte(h.run("replication", "points", vm, "--json")), &out); err != nil {
		t.Fatal(err)
	}
	return out.Points
}

var syncedRE = regexp.MustCompile(`cycle (\d+) of`)

// syncCycle runs `replication sync` (extra flags appended) and returns the
// cycle it reports applied.
func syncCycle(t *testing.T, h *host, vm string, extra ...string) uint64 {
	t.Helper()
	out := h.run(append([]string{"replication", "sync", vm}, extra...)...)
	m := syncedRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("replication sync said %q", out)
	}
	c, _ := strconv.ParseUint(m[1], 10, 64)
	return c
}

// pointsPair is a pair with vm1 (one 16 MiB disk) replicating with
// recovery points, one per second of barrier time, `keep` kept.
func pointsPair(t *testing.T, keep int, extra ...string) *pair {
	t.Helper()
	p := newPair(t)
	p.prim.addVM("vm1", "16M")
	args := append([]string{"replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h",
		"--recovery-points", fmt.Sprint(keep), "--recovery-point-interval", "1s"}, extra...)
	p.prim.run(args...)
	p.prim.run("replication", "sync", "vm1")
	return p
}

// nextInterval waits until the wall clock is a point interval (1s) past
// since, so the next cycle becomes a recovery point.
func nextInterval(t *testing.T, since time.Time) {
	t.Helper()
	waitFor(t, "the next recovery point interval", func() bool { return time.Since(since) > 1100*time.Millisecond })
}

// pointedCycles writes n patterns into vm1/disk0 of h (byte base+i at MiB
// step*i), each a recovery point interval after the one before (and after
// the sync that preceded the call), syncs each and returns the cycles with
// the disk's content at each.
func pointedCycles(t *testing.T, h *host, n int, base byte, step int) ([]uint64, map[uint64][]byte) {
	t.Helper()
	want := map[uint64][]byte{}
	var cycles []uint64
	last := time.Now()
	for i := range n {
		nextInterval(t, last)
		writePattern(t, h, "vm1/disk0", base+byte(i), step*i)
		last = time.Now()
		c := syncCycle(t, h, "vm1")
		want[c] = exportBytes(t, h, "vm1/disk0")
		cycles = append(cycles, c)
	}
	return cycles, want
}

// writePattern writes 1 MiB of byte b at MiB offset mib of vm1/disk0.
func writePattern(t *testing.T, h *host, export string, b byte, mib int) {
	t.Helper()
	sh(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x%02x %dM 1M", b, mib), h.uri(export))
}

func testExportBytes(t *testing.T, h *host, export string) []byte {
	t.Helper()
	return exportBytes(t, h, export)
}

// TestRecoveryPointsExact writes a distinct pattern in each interval,
// recovers each point through a test failover and compares it byte for
// byte with the primary at that point's cycle; the policy keeps the newest
// three.
func TestRecoveryPointsExact(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	p := pointsPair(t, 3)
	cycles, want := pointedCycles(t, p.prim, 5, 0x10, 1)
	ps := pointsOf(t, p.rep, "vm1")
	var got []uint64
	for _, pt := range ps {
		got = append(got, pt.Cycle)
	}
	if !slices.Equal(got, cycles[2:]) {
		t.Fatalf("points %v, want the newest three of %v", got, cycles)
	}
	for _, pt := range ps {
		p.rep.run("failover", "test", "vm1", "--point", pt.ID)
		if !bytes.Equal(exportBytes(t, p.rep, "vm1-test/disk0"), want[pt.Cycle]) {
			t.Fatalf("point %s differs from the primary at cycle %d", pt.ID, pt.Cycle)
		}
		p.rep.run("failover", "stop-test", "vm1")
	}
	out := p.rep.run("replication", "points", "vm1")
	if !strings.Contains(out, "3 point(s) besides the latest state (policy keeps 3)") {
		t.Fatalf("points listing:\n%s", out)
	}
	if _, errOut, err := p.rep.try("failover", "test", "vm1", "--point", fmt.Sprint(cycles[0])); err == nil || !strings.Contains(errOut, "no recovery point") {
		t.Fatalf("test failover of a pruned point: %v %s", err, errOut)
	}
}

// TestTestFailoverWhilePrimaryWrites: the test copy stays as it was while
// the primary goes on writing and the replica applying; writes to it reach
// neither; stop-test removes it; replication never paused.
func TestTestFailoverWhilePrimaryWrites(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	p := pointsPair(t, 0)
	writePattern(t, p.prim, "vm1/disk0", 0x41, 1)
	syncCycle(t, p.prim, "vm1")
	before := exportBytes(t, p.prim, "vm1/disk0")
	res := p.rep.run("failover", "test", "vm1", "--json")
	if !strings.Contains(res, `"vm1-test/disk0"`) {
		t.Fatalf("test failover answer: %s", res)
	}
	if _, errOut, err := p.rep.try("failover", "test", "vm1"); err == nil || !strings.Contains(errOut, "is running") {
		t.Fatalf("second test failover: %v %s", err, errOut)
	}
	if !bytes.Equal(exportBytes(t, p.rep, "vm1-test/disk0"), before) {
		t.Fatal("the test copy is not the latest state")
	}
	// The primary writes on and the replica applies underneath.
	for i := range 3 {
		writePattern(t, p.prim, "vm1/disk0", byte(0x50+i), 2+i)
		syncCycle(t, p.prim, "vm1")
	}
	p.checkEqual(t, "vm1", "disk0")
	if !bytes.Equal(exportBytes(t, p.rep, "vm1-test/disk0"), before) {
		t.Fatal("the test copy changed while the replica applied cycles")
	}
	// Writes to the test copy stay in it.
	writePattern(t, p.rep, "vm1-test/disk0", 0x77, 8)
	tc := exportBytes(t, p.rep, "vm1-test/disk0")
	if !bytes.Equal(tc[8<<20:9<<20], bytes.Repeat([]byte{0x77}, 1<<20)) || !bytes.Equal(tc[:8<<20], before[:8<<20]) {
		t.Fatal("the test copy does not hold what was written to it")
	}
	p.checkEqual(t, "vm1", "disk0")
	if st := primaryStatus(t, p.prim, "vm1"); st.State != "replicating" || st.Health != "normal" {
		t.Fatalf("primary during the test failover: %+v", st)
	}
	var status struct {
		Tests []struct {
			VM string `json:"vm"`
		} `json:"test_failovers"`
	}
	json.Unmarshal([]byte(p.rep.run("status", "--json")), &status)
	if len(status.Tests) != 1 || status.Tests[0].VM != "vm1" {
		t.Fatalf("status lists test failovers %+v", status.Tests)
	}
	p.rep.run("failover", "stop-test", "vm1")
	if out, err := runOut("nbdinfo", p.rep.uri("vm1-test/disk0")); err == nil {
		t.Fatalf("the test export is still there after stop-test:\n%s", out)
	}
	if pts := pointsOf(t, p.rep, "vm1"); len(pts) != 0 {
		t.Fatalf("the test failover's point outlived it: %+v", pts)
	}
	writePattern(t, p.prim, "vm1/disk0", 0x66, 3)
	syncCycle(t, p.prim, "vm1")
	p.checkEqual(t, "vm1", "disk0")
}

// TestUnplannedFailoverCancelComplete: the primary is killed; the replica
// fails over to an older point, the failed-over VM writes (flushed), the
// replica is killed -9 and restarted, the failover is cancelled (back to the
// latest state, a replica again), then done again to the latest state and
// completed.
func TestUnplannedFailoverCancelComplete(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	p := pointsPair(t, 4)
	cycles, want := pointedCycles(t, p.prim, 3, 0x20, 2)
	latest := want[cycles[2]]
	p.prim.kill()

	older := fmt.Sprint(cycles[0])
	out := p.rep.run("failover", "unplanned", "vm1", "--point", older)
	if !strings.Contains(out, "vm1/disk0") {
		t.Fatalf("unplanned failover said %q", out)
	}
	if !bytes.Equal(exportBytes(t, p.rep, "vm1/disk0"), want[cycles[0]]) {
		t.Fatal("failed-over disk is not the chosen point")
	}
	// The failed-over VM runs and writes; qemu-io flushes before it exits.
	writePattern(t, p.rep, "vm1/disk0", 0x99, 10)
	p.rep.kill()
	p.rep.start()
	run := exportBytes(t, p.rep, "vm1/disk0")
	if !bytes.Equal(run[10<<20:11<<20], bytes.Repeat([]byte{0x99}, 1<<20)) {
		t.Fatal("a flushed write of the failed-over VM was lost by kill -9")
	}
	var vms []struct {
		Name       string `json:"name"`
		FailedOver bool   `json:"failed_over"`
	}
	json.Unmarshal([]byte(p.rep.run("vm", "list", "--json")), &vms)
	if len(vms) != 1 || !vms[0].FailedOver {
		t.Fatalf("vm list after restart: %+v", vms)
	}
	if _, errOut, err := p.rep.try("vm", "remove", "vm1"); err == nil || !strings.Contains(errOut, "failed over") {
		t.Fatalf("remove of a failed-over VM: %v %s", err, errOut)
	}

	// Cancel: the images are the latest state again, older points stay.
	p.rep.run("failover", "cancel", "vm1")
	img, err := os.ReadFile(filepath.Join(p.storage, "vm1", "disk0.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img, latest) {
		t.Fatal("cancel did not return the replica to the latest state")
	}
	if out, err := runOut("nbdinfo", p.rep.uri("vm1/disk0")); err == nil {
		t.Fatalf("vm1/disk0 still served after cancel:\n%s", out)
	}
	var got []uint64
	for _, pt := range pointsOf(t, p.rep, "vm1") {
		got = append(got, pt.Cycle)
	}
	if !slices.Contains(got, cycles[0]) || !slices.Contains(got, cycles[1]) {
		t.Fatalf("points after cancel %v, want %v and %v kept", got, cycles[0], cycles[1])
	}

	// Again, to the latest state, and complete.
	p.rep.run("failover", "unplanned", "vm1")
	if !bytes.Equal(exportBytes(t, p.rep, "vm1/disk0"), latest) {
		t.Fatal("failover to the latest state serves something else")
	}
	p.rep.run("failover", "complete", "vm1")
	if _, errOut, err := p.rep.try("replication", "points", "vm1"); err == nil || !strings.Contains(errOut, "not a replica VM") {
		t.Fatalf("points after complete: %v %s", err, errOut)
	}
	if _, errOut, err := p.rep.try("failover", "cancel", "vm1"); err == nil || !strings.Contains(errOut, "not failed over") {
		t.Fatalf("cancel after complete: %v %s", err, errOut)
	}
	writePattern(t, p.rep, "vm1/disk0", 0xAA, 12)
	p.rep.stop()
	p.rep.start()
	after := exportBytes(t, p.rep, "vm1/disk0")
	if !bytes.Equal(after[:12<<20], latest[:12<<20]) || !bytes.Equal(after[12<<20:13<<20], bytes.Repeat([]byte{0xAA}, 1<<20)) {
		t.Fatal("the completed VM's disk is not the latest state plus its own writes")
	}
}

// TestFailoverLacksExcludedDisk: a disk excluded from replication never
// reaches the replica, and the failed-over VM says it lacks it.
func TestFailoverLacksExcludedDisk(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	p := newPair(t)
	dir := t.TempDir()
	p.prim.run("vm", "add", "vm1", "--disk", "root="+filepath.Join(dir, "root.img")+":8M",
		"--disk", "scratch="+filepath.Join(dir, "scratch.img")+":8M")
	writePattern(t, p.prim, "vm1/root", 0x11, 1)
	writePattern(t, p.prim, "vm1/scratch", 0x22, 1)
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h", "--exclude-disk", "scratch")
	p.prim.run("replication", "sync", "vm1")
	if _, err := os.Stat(filepath.Join(p.storage, "vm1", "scratch.img")); !os.IsNotExist(err) {
		t.Fatalf("the excluded disk reached the replica: %v", err)
	}
	if out := p.rep.run("replication", "status", "vm1"); !strings.Contains(out, "not replicated (excluded on the primary): scratch") {
		t.Fatalf("replica status does not name the excluded disk:\n%s", out)
	}
	out := p.rep.run("failover", "unplanned", "vm1")
	if !strings.Contains(out, "lacks disk(s) scratch") {
		t.Fatalf("failover does not say what the VM lacks:\n%s", out)
	}
	if list := p.rep.run("vm", "list"); !strings.Contains(list, "lacks disk(s) scratch") {
		t.Fatalf("vm list does not say what the VM lacks:\n%s", list)
	}
	if !bytes.Equal(exportBytes(t, p.rep, "vm1/root"), exportBytes(t, p.prim, "vm1/root")) {
		t.Fatal("the replicated disk differs")
	}
}
