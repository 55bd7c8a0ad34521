package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Replication under faults: a replica killed while it receives or applies a
// cycle, a connection cut or damaged on the way, a staged upload damaged at
// rest, a primary killed under write load or just after shipping, a backlog
// shipped after an outage. Two real daemons on loopback over
// real TLS; after each fault the images must be equal, the status healthy,
// and nothing sent twice that need not be: a faultProxy between the primary
// and the replica counts the bytes the primary sends.

// maxChunk is wire.MaxChunk: a broken upload costs at most one chunk.
const maxChunk = 8 << 20

// proxySlack is what the proxy counts beyond the stream itself: TLS records
// and handshakes, HTTP requests, status calls. Far less than a chunk.
const proxySlack = 1 << 20

// checkRecovered: the primary replicates with health normal, the replica
// holds a consistent image at cycle applied or later.
func checkRecovered(t *testing.T, p *pair, vm string, applied uint64) primStatus {
	t.Helper()
	f := primaryStatus(t, p.prim, vm)
	if f.State != "replicating" || f.Health != "normal" {
		t.Errorf("primary status after recovery: state %q health %q (%s; last error %q), want replicating/normal",
			f.State, f.Health, f.Reason, f.LastError)
	}
	r := p.rep.replication(vm)
	if len(r.Replicas) != 1 || !r.Replicas[0].Consistent || r.Replicas[0].State != "replicating" || r.Replicas[0].Applied < applied {
		t.Errorf("replica status after recovery: %+v, want consistent, replicating, applied >= %d", r.Replicas, applied)
	}
	return f
}

// newProxiedPair is a pair whose primary reaches the replica through a
// faultProxy, with vm1 (one disk of size) replicating, its initial copy
// done. Compression is off, so random data is as large on the wire as on
// the disk and byte counts are predictable; unless enable sets a
// --frequency, cycles close only on `replication sync`.
func newProxiedPair(t *testing.T, size string, enable ...string) (*pair, *faultProxy) {
	t.Helper()
	need(t, "nbdcopy")
	p := newPair(t)
	px := newFaultProxy(t, p.replicaAddr)
	p.prim.addVM("vm1", size)
	args := []string{"replication", "enable", "vm1", "--replica", px.addr(), "--compression=false"}
	if !slices.Contains(enable, "--frequency") {
		args = append(args, "--frequency", "1h")
	}
	p.prim.run(append(args, enable...)...)
	p.prim.run("replication", "sync", "vm1")
	return p, px
}

// writeRandom writes n random bytes at the start of an export with nbdcopy.
func writeRandom(t *testing.T, h *host, export string, n int) {
	t.Helper()
	src, _ := randomFile(t, n)
	sh(t, "nbdcopy", "--flush", src, h.uri(export))
}

// syncInBackground runs `replication sync vm` on h while the test injects
// a fault; wait returns its error (the sync must finish within a minute).
// One still running when the test ends is killed.
func syncInBackground(t *testing.T, h *host, vm string) (wait func() error) {
	t.Helper()
	cmd := exec.Command(vdreplBin, "--state", h.state, "replication", "sync", vm, "--timeout", "60s")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var res error
	finished := false
	wait = func() error {
		if !finished {
			select {
			case err := <-done:
				if err != nil {
					res = fmt.Errorf("replication sync: %w\n%s", err, out.String())
				}
			case <-time.After(90 * time.Second):
				cmd.Process.Kill()
				<-done
				res = errors.New("replication sync still running after 90s")
			}
			finished = true
		}
		return res
	}
	t.Cleanup(func() {
		cmd.Process.Kill() // a test that failed may leave it waiting
		wait()
	})
	return wait
}

// restartReplica starts the killed replica again on the address it had, the
// one the primary (or its proxy) was told.
func restartReplica(t *testing.T, p *pair) {
	t.Helper()
	for i, a := range p.rep.extra {
		if a == "--replica-listen" && i+1 < len(p.rep.extra) {
			p.rep.extra[i+1] = p.replicaAddr
		}
	}
	p.rep.start()
	var st struct {
		ReplicaListen string `json:"replica_listen"`
	}
	if err := json.Unmarshal([]byte(p.rep.run("status", "--json")), &st); err != nil || st.ReplicaListen != p.replicaAddr {
		t.Fatalf("restarted replica listens on %q (%v), want %s", st.ReplicaListen, err, p.replicaAddr)
	}
}

// fileSize is the size of name, -1 if it does not exist.
func fileSize(t *testing.T, name string) int64 {
	t.Helper()
	fi, err := os.Stat(name)
	if errors.Is(err, os.ErrNotExist) {
		return -1
	}
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// checkSent: the bytes the primary sent through the proxy while one cycle
// of stream bytes shipped are at least the stream and at most the stream
// plus one chunk (and the protocol's slack): an interrupted upload resumed
// where the replica's staging ended instead of starting over.
func checkSent(t *testing.T, sent, stream int64) {
	t.Helper()
	t.Logf("cycle stream %d bytes, primary sent %d bytes through the proxy (%+d)", stream, sent, sent-stream)
	if stream < 16<<20 {
		t.Fatalf("cycle stream is %d bytes: the writes did not travel as one cycle", stream)
	}
	if sent < stream {
		t.Fatalf("proxy forwarded %d bytes, less than the %d-byte stream: the proxy does not count", sent, stream)
	}
	if sent > stream+maxChunk+proxySlack {
		t.Fatalf("primary sent %d bytes for a %d-byte cycle, more than one %d-byte chunk over: the upload started over instead of resuming",
			sent, stream, maxChunk)
	}
}

// TestReplicaKilledMidUploadResumes kills -9 the replica while a cycle is
// half staged, restarts it on the same address, and checks the primary
// resumes the upload from the replica's staged offset.
func TestReplicaKilledMidUploadResumes(t *testing.T) {
	p, px := newProxiedPair(t, "32M", "--bandwidth-limit", "8MB/s")
	before := primaryStatus(t, p.prim, "vm1")
	up0 := px.upstream()
	writeRandom(t, p.prim, "vm1/disk0", 24<<20)
	wait := syncInBackground(t, p.prim, "vm1")

	// The stream is a little over 24 MiB (frame headers): kill once two
	// chunks are staged and the third is on its way, so starting over would
	// cost two chunks more than resuming.
	n := before.LastApplied + 1
	part := filepath.Join(p.storage, "vm1", "staging", fmt.Sprintf("c%d.part", n))
	deadline := time.Now().Add(30 * time.Second)
	for size := fileSize(t, part); size < 2*maxChunk; size = fileSize(t, part) {
		if time.Now().After(deadline) {
			t.Fatalf("staging file %s has %d bytes after 30s", part, size)
		}
		time.Sleep(2 * time.Millisecond)
	}
	p.rep.kill()
	staged := fileSize(t, part)
	if staged < 2*maxChunk || staged >= 24<<20 {
		t.Fatalf("replica killed with %d bytes staged, want two chunks but not the whole stream", staged)
	}
	restartReplica(t, p)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	p.checkEqual(t, "vm1", "disk0")
	after := checkRecovered(t, p, "vm1", n)
	if after.Metrics.CyclesShippedTotal != before.Metrics.CyclesShippedTotal+1 {
		t.Fatalf("%d cycles shipped, want 1", after.Metrics.CyclesShippedTotal-before.Metrics.CyclesShippedTotal)
	}
	t.Logf("killed with %d bytes staged", staged)
	checkSent(t, px.upstream()-up0, after.Metrics.CycleWireBytesTotal-before.Metrics.CycleWireBytesTotal)
}

// proxyFaultMidUpload ships a 24 MiB cycle while the proxy injects one fault
// 20 MiB into it (the third chunk), and checks the primary noticed, resumed
// and made the replica equal.
func proxyFaultMidUpload(t *testing.T, arm func(*faultProxy)) {
	p, px := newProxiedPair(t, "32M")
	before := primaryStatus(t, p.prim, "vm1")
	writeRandom(t, p.prim, "vm1/disk0", 24<<20)
	up0 := px.upstream()
	arm(px)
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	if px.faults() != 1 {
		t.Fatalf("the proxy's fault fired %d times, want once", px.faults())
	}
	p.checkEqual(t, "vm1", "disk0")
	after := checkRecovered(t, p, "vm1", before.LastApplied+1)
	if after.Metrics.RetriesTotal <= before.Metrics.RetriesTotal {
		t.Errorf("retries_total %d -> %d: the primary did not notice the fault", before.Metrics.RetriesTotal, after.Metrics.RetriesTotal)
	}
	checkSent(t, px.upstream()-up0, after.Metrics.CycleWireBytesTotal-before.Metrics.CycleWireBytesTotal)
}

// TestProxyCutsUploadResumes: the connection is cut in the middle of a
// chunk; the replica must not stage the part it got (its chunk CRC), and
// the primary resumes at the last whole chunk.
func TestProxyCutsUploadResumes(t *testing.T) {
	proxyFaultMidUpload(t, func(px *faultProxy) { px.cutAfter(20 << 20) })
}

// TestProxyFlipsByteUploadRecovers: one byte of the TLS stream is flipped.
// TLS finds it (record MAC) and drops the connection, so corruption cannot
// reach the payload on the wire; replication must recover all the same.
// TestCorruptStagedUploadRejected covers payload corruption.
func TestProxyFlipsByteUploadRecovers(t *testing.T) {
	proxyFaultMidUpload(t, func(px *faultProxy) { px.flipAt(20 << 20) })
}

// TestCorruptStagedUploadRejected damages one byte of a chunk the replica
// already staged (corruption at rest, which TLS cannot catch) while the
// rest of the cycle is on its way. The commit must find it (frame CRC,
// stream hash), discard the stream and have the primary send it again: the
// replica image never holds the damaged byte.
func TestCorruptStagedUploadRejected(t *testing.T) {
	p, px := newProxiedPair(t, "32M", "--bandwidth-limit", "8MB/s")
	before := primaryStatus(t, p.prim, "vm1")
	up0 := px.upstream()
	writeRandom(t, p.prim, "vm1/disk0", 24<<20)
	wait := syncInBackground(t, p.prim, "vm1")

	part := filepath.Join(p.storage, "vm1", "staging", fmt.Sprintf("c%d.part", before.LastApplied+1))
	deadline := time.Now().Add(30 * time.Second)
	for size := fileSize(t, part); size < maxChunk; size = fileSize(t, part) {
		if time.Now().After(deadline) {
			t.Fatalf("staging file %s has %d bytes after 30s", part, size)
		}
		time.Sleep(2 * time.Millisecond)
	}
	// The first chunk is staged whole (its size is past it); later chunks
	// are appended after it, so this write races with nothing.
	f, err := os.OpenFile(part, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	const at = 4<<20 + 12345
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x01
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()

	if err := wait(); err != nil {
		t.Fatal(err)
	}
	p.checkEqual(t, "vm1", "disk0")
	after := checkRecovered(t, p, "vm1", before.LastApplied+1)
	stream := after.Metrics.CycleWireBytesTotal - before.Metrics.CycleWireBytesTotal
	sent := px.upstream() - up0
	t.Logf("cycle stream %d bytes, primary sent %d bytes", stream, sent)
	// The damaged stream went whole, then the stream again.
	if stream < 16<<20 || sent < 2*stream {
		t.Fatalf("primary sent %d bytes for a %d-byte cycle: the damaged stream was not rejected and sent again", sent, stream)
	}
}

// replicaIntent is the intent in the replica's replica.json (apply/doc.go),
// nil when there is none or the file cannot be read yet.
func replicaIntent(path string) map[string]any {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var env struct {
		Body struct {
			Intent map[string]any `json:"intent"`
		} `json:"body"`
	}
	if json.Unmarshal(b, &env) != nil {
		return nil
	}
	return env.Body.Intent
}

// TestReplicaKilledMidApply kills -9 the replica while it applies a 48 MiB
// cycle N: once as soon as the verified stream (staging/cN.stream) appears,
// once as soon as replica.json holds the apply intent. Restarted, the
// replica must be at cycle N-1 or N with its image equal, byte for byte, to
// the primary's at that barrier (at N once the intent was durable), and
// equal to the primary after `replication sync`.
func TestReplicaKilledMidApply(t *testing.T) {
	p, px := newProxiedPair(t, "64M")
	staging := filepath.Join(p.storage, "vm1", "staging")
	for _, when := range []string{"stream", "intent"} {
		n := primaryStatus(t, p.prim, "vm1").LastApplied + 1
		prev := exportBytes(t, p.prim, "vm1/disk0") // the primary at barrier N-1
		writeRandom(t, p.prim, "vm1/disk0", 48<<20)
		next := exportBytes(t, p.prim, "vm1/disk0") // at barrier N: nothing else writes
		wait := syncInBackground(t, p.prim, "vm1")

		stream := filepath.Join(staging, fmt.Sprintf("c%d.stream", n))
		seen := func() bool { return fileSize(t, stream) >= 0 }
		if when == "intent" {
			seen = func() bool { in := replicaIntent(filepath.Join(p.storage, "vm1", "replica.json")); return in != nil }
		}
		deadline := time.Now().Add(30 * time.Second)
		for !seen() {
			if time.Now().After(deadline) {
				t.Fatalf("kill at %s: cycle %d: not seen in 30s", when, n)
			}
			time.Sleep(100 * time.Microsecond)
		}
		p.rep.kill()
		// Where the kill landed, as the dead replica left its files.
		phase := "after the apply"
		switch {
		case replicaIntent(filepath.Join(p.storage, "vm1", "replica.json")) != nil:
			phase = "mid-apply (intent durable)"
		case fileSize(t, stream) >= 0:
			phase = "before the intent (stream staged)"
		}
		// Keep the primary away while the restarted replica is examined.
		px.block()
		restartReplica(t, p)

		r := p.rep.replication("vm1")
		if len(r.Replicas) != 1 {
			t.Fatalf("replica status: %+v", r)
		}
		applied := r.Replicas[0].Applied
		img, err := os.ReadFile(filepath.Join(p.storage, "vm1", "disk0.img"))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("kill at %s landed %s; the replica came back at cycle %d (N=%d)", when, phase, applied, n)
		switch {
		case applied == n-1 && when == "intent":
			t.Fatalf("kill at intent: the replica came back at cycle %d though the intent for %d was durable", applied, n)
		case applied == n-1:
			if !bytes.Equal(img, prev) {
				t.Fatalf("kill at %s: replica at cycle %d but its image is not the primary's at barrier %d", when, applied, applied)
			}
		case applied == n:
			if !bytes.Equal(img, next) {
				t.Fatalf("kill at %s: replica at cycle %d but its image is not the primary's at barrier %d", when, applied, applied)
			}
		default:
			t.Fatalf("kill at %s: replica came back at cycle %d, want %d or %d", when, applied, n-1, n)
		}
		if !r.Replicas[0].Consistent {
			t.Fatalf("kill at %s: replica at cycle %d not marked consistent", when, applied)
		}

		px.unblock()
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		p.checkEqual(t, "vm1", "disk0")
		checkRecovered(t, p, "vm1", n)
		if left, _ := filepath.Glob(filepath.Join(staging, "*")); len(left) > 0 {
			t.Errorf("kill at %s: staging holds %v after the cycle applied", when, left)
		}
	}
}

// TestPrimaryKilledUnderWriteLoad kills -9 the primary while fio writes to
// its export and 1 s cycles ship, restarts it with the same state and
// flags, and checks `replication sync` makes the replica equal without a
// resync (a process crash keeps the page cache: the journal tail is enough).
func TestPrimaryKilledUnderWriteLoad(t *testing.T) {
	need(t, "fio", "nbdcopy")
	p := newPair(t)
	p.prim.addVM("vm1", "64M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1s")
	p.prim.run("replication", "sync", "vm1")
	before := primaryStatus(t, p.prim, "vm1")

	// fio writes until the daemon dies under it; --rate keeps the journal
	// under its cap (half the disk) whatever the machine's speed. After the
	// kill fio's nbd engine retries for ever, so the test ends it (--thread:
	// one process, no forked job left behind) and keeps its chatter in a file.
	fioLog, err := os.Create(filepath.Join(t.TempDir(), "fio.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer fioLog.Close()
	fio := exec.Command("fio", "--name=load", "--thread", "--ioengine=nbd", "--uri="+p.prim.uri("vm1/disk0"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=48m", "--rate=8m",
		"--time_based", "--runtime=60s")
	fio.Stdout, fio.Stderr = fioLog, fioLog
	fio.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fio.Wait() }()
	var stopOnce sync.Once
	stopFio := func() {
		stopOnce.Do(func() {
			syscall.Kill(-fio.Process.Pid, syscall.SIGKILL)
			<-fioDone
		})
	}
	defer stopFio()

	// Kill in the middle: cycles written under load have shipped, fio is
	// still writing.
	waitFor(t, "three cycles shipped under fio load", func() bool {
		return primaryStatus(t, p.prim, "vm1").Metrics.CyclesShippedTotal >= before.Metrics.CyclesShippedTotal+3
	})
	select {
	case err := <-fioDone:
		fioDone <- err
		t.Fatalf("fio ended before the kill: %v", err)
	default:
	}
	p.prim.kill()
	stopFio()

	p.prim.start()
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")
	after := checkRecovered(t, p, "vm1", before.LastApplied+4)
	if after.Metrics.SyncWireBytesTotal != before.Metrics.SyncWireBytesTotal {
		t.Errorf("a process crash of the primary cost a resync of %d bytes (reason %q)",
			after.Metrics.SyncWireBytesTotal-before.Metrics.SyncWireBytesTotal, after.Reason)
	}
	t.Logf("cycles shipped %d -> %d, wire bytes %d", before.Metrics.CyclesShippedTotal, after.Metrics.CyclesShippedTotal,
		after.Metrics.CycleWireBytesTotal-before.Metrics.CycleWireBytesTotal)
}

// TestPrimaryKilledAfterShipSendsNoAppliedCycle kills -9 the primary just
// after a 16 MiB cycle was applied on the replica (and an empty one after
// it, so the primary's state file records the first as applied). Restarted,
// the primary must not upload that cycle again: the replica has it, and the
// primary knows it.
func TestPrimaryKilledAfterShipSendsNoAppliedCycle(t *testing.T) {
	p, px := newProxiedPair(t, "32M")
	writeRandom(t, p.prim, "vm1/disk0", 16<<20)
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	before := primaryStatus(t, p.prim, "vm1")
	p.prim.kill()
	up0 := px.upstream()
	p.prim.start()
	// Let the restarted primary catch up with the cycles its journal kept
	// before sealing another (a seal during that is TestProxyOutageBacklogCatchesUp).
	waitFor(t, "the restarted primary to ship what its journal kept", func() bool {
		f := primaryStatus(t, p.prim, "vm1")
		return f.Metrics.PendingCycles == 0 && f.LastApplied >= before.LastApplied
	})
	sent := px.upstream() - up0
	t.Logf("the restarted primary sent %d bytes through the proxy for cycles up to %d, all applied before the kill", sent, before.LastApplied)
	if sent > proxySlack {
		t.Errorf("the restarted primary sent %d bytes to replicate nothing new: it uploaded cycles the replica had applied (up to %d)",
			sent, before.LastApplied)
	}
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")
	checkRecovered(t, p, "vm1", before.LastApplied+1)
}

// TestProxyOutageBacklogCatchesUp: the replica is unreachable (the proxy
// refuses every connection) while cycles pile up on the primary. When it is
// back, the primary ships the backlog, releasing each cycle as the replica
// applies it, while an admin's `replication sync` seals new cycles. Every
// sync must succeed, no cycle may go missing (which would force a resync),
// and the replica must end equal.
func TestProxyOutageBacklogCatchesUp(t *testing.T) {
	need(t, "qemu-io")
	p, px := newProxiedPair(t, "32M")
	before := primaryStatus(t, p.prim, "vm1")
	px.block()
	const backlog = 8
	for i := range backlog {
		sh(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x%02x %dM 1M", 0x10+i, 2*i), p.prim.uri("vm1/disk0"))
		// The sync seals the cycle, then gives up waiting for the replica.
		if _, _, err := p.prim.try("replication", "sync", "vm1", "--timeout", "50ms"); err == nil {
			t.Fatal("replication sync succeeded with the replica unreachable")
		}
	}
	if f := primaryStatus(t, p.prim, "vm1"); f.Metrics.PendingCycles != backlog {
		t.Fatalf("%d cycles pending after %d seals with the replica unreachable", f.Metrics.PendingCycles, backlog)
	}

	px.unblock()
	// Seal while the backlog ships: start a sync each time another backlog
	// cycle was applied (each writes 64 KiB into a gap the backlog left).
	var waits []func() error
	shipped := before.Metrics.CyclesShippedTotal
	deadline := time.Now().Add(30 * time.Second)
	for {
		f := primaryStatus(t, p.prim, "vm1")
		// Only while backlog cycles ship: each sync adds a cycle of its own.
		if f.Metrics.CyclesShippedTotal > shipped && f.Metrics.CyclesShippedTotal < before.Metrics.CyclesShippedTotal+backlog {
			shipped = f.Metrics.CyclesShippedTotal
			sh(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x%02x %dM 64k", 0x40+len(waits), 2*len(waits)+1), p.prim.uri("vm1/disk0"))
			waits = append(waits, syncInBackground(t, p.prim, "vm1"))
		}
		if f.Metrics.PendingCycles == 0 || f.State == "resync-required" || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	for i, wait := range waits {
		if err := wait(); err != nil {
			t.Errorf("sync %d of %d started while the backlog shipped: %v", i+1, len(waits), err)
		}
	}
	if f := primaryStatus(t, p.prim, "vm1"); f.Metrics.PendingCycles != 0 || f.State != "replicating" {
		t.Fatalf("after the backlog shipped: state %s (%s), %d cycles pending, last error %q",
			f.State, f.Reason, f.Metrics.PendingCycles, f.LastError)
	}
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")
	after := checkRecovered(t, p, "vm1", before.LastApplied+backlog)
	if after.Metrics.SyncWireBytesTotal != before.Metrics.SyncWireBytesTotal {
		t.Errorf("catching up after an outage cost a resync (%s)", after.Reason)
	}
	t.Logf("%d syncs started while %d backlog cycles shipped", len(waits), backlog)
}
