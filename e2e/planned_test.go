package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// twoWay is two hosts that may each replicate to the other: both run the
// replica role and allow the other one.
type twoWay struct {
	a, b         *host
	aAddr, bAddr string // replica listeners
	pki          string
}

func newTwoWay(t *testing.T) *twoWay {
	t.Helper()
	w := &twoWay{pki: t.TempDir()}
	vdrepl(t, "pki", "init", "--dir", w.pki)
	vdrepl(t, "pki", "issue", "--dir", w.pki, "--name", "primary.test", "--san", "127.0.0.1")
	vdrepl(t, "pki", "issue", "--dir", w.pki, "--name", "replica.test", "--san", "127.0.0.1")
	common := []string{"--replica-listen", "127.0.0.1:0", "--retry-scale", "0.0005"}
	w.a = newHost(t, append(tlsFlags(w.pki, "primary.test"), common...)...)
	w.b = newHost(t, append(tlsFlags(w.pki, "replica.test"), common...)...)
	w.a.run("replica", "allow", "add", "--primary", "replica.test", "--storage", filepath.Join(t.TempDir(), "on-a"))
	w.b.run("replica", "allow", "add", "--primary", "primary.test", "--storage", filepath.Join(t.TempDir(), "on-b"))
	w.aAddr, w.bAddr = listenAddr(t, w.a), listenAddr(t, w.b)
	return w
}

func listenAddr(t *testing.T, h *host) string {
	t.Helper()
	var st struct {
		ReplicaListen string `json:"replica_listen"`
	}
	if err := json.Unmarshal([]byte(h.run("status", "--json")), &st); err != nil || st.ReplicaListen == "" {
		t.Fatalf("no replica listener in status: %v", err)
	}
	return st.ReplicaListen
}

// imageOf is where h keeps vm1's disk0 as a VM of its own.
func imageOf(t *testing.T, h *host) string {
	t.Helper()
	var vms []struct {
		Name  string `json:"name"`
		Disks []struct {
			Path string `json:"path"`
		} `json:"disks"`
	}
	if err := json.Unmarshal([]byte(h.run("vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.Name == "vm1" {
			return v.Disks[0].Path
		}
	}
	t.Fatalf("vm1 is not a VM of this host")
	return ""
}

func hasVM(t *testing.T, h *host, name string) bool {
	t.Helper()
	return strings.Contains(h.run("vm", "list"), name)
}

// replicaEqual waits until the replica side has applied everything of a
// `replication sync` and compares the replica image file with want.
func fileEquals(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs from the primary's disk", path)
	}
}

// TestPlannedFailoverAndBack: a planned failover hands vm1 from A to B with
// no data lost; B replicates back to A, whose images are kept as the
// replica (a resync finds them equal: no data sent); B is killed -9 and
// restarted; a planned failover back to A; the images equal at each step.
func TestPlannedFailoverAndBack(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	w := newTwoWay(t)
	aImg := w.a.addVM("vm1", "16M")
	writePattern(t, w.a, "vm1/disk0", 0x31, 0)
	w.a.run("replication", "enable", "vm1", "--replica", w.bAddr, "--frequency", "1h")
	w.a.run("replication", "sync", "vm1")
	writePattern(t, w.a, "vm1/disk0", 0x32, 3) // shipped by the failover itself
	want := exportBytes(t, w.a, "vm1/disk0")

	// A would not take replication back from B: refused, nothing changed.
	w.a.run("replica", "allow", "remove", "--primary", "replica.test")
	if _, errOut, err := w.a.try("failover", "planned", "vm1"); err == nil || !strings.Contains(errOut, "allow add --primary replica.test") {
		t.Fatalf("planned failover to a host A does not allow back: %v %s", err, errOut)
	}
	writePattern(t, w.a, "vm1/disk0", 0x32, 4) // still writable
	want = exportBytes(t, w.a, "vm1/disk0")
	w.a.run("replica", "allow", "add", "--primary", "replica.test", "--storage", filepath.Join(t.TempDir(), "on-a"))
	out := w.a.run("failover", "planned", "vm1")
	if !strings.Contains(out, "replication reversed") {
		t.Fatalf("planned failover said:\n%s", out)
	}
	if hasVM(t, w.a, "vm1") {
		t.Fatal("vm1 is still a VM of A after the handover")
	}
	if !bytes.Equal(exportBytes(t, w.b, "vm1/disk0"), want) {
		t.Fatal("B serves something else than A had")
	}
	// B resyncs against A's images: equal, so no data travels.
	waitFor(t, "B to finish the resync back to A", func() bool {
		st := primaryStatus(t, w.b, "vm1")
		return st.State == "replicating" && st.LastApplied > 0
	})
	if st := primaryStatus(t, w.b, "vm1"); st.Metrics.SyncWireBytesTotal > 256<<10 {
		t.Fatalf("the resync back sent %d bytes for equal images", st.Metrics.SyncWireBytesTotal)
	} else {
		t.Logf("resync back to A over equal 16 MiB images: %d bytes of pieces sent", st.Metrics.SyncWireBytesTotal)
	}
	fileEquals(t, aImg, want)

	// B is the primary: it writes, crashes, comes back, ships.
	writePattern(t, w.b, "vm1/disk0", 0x33, 5)
	w.b.kill()
	w.b.start()
	w.b.run("replication", "sync", "vm1")
	want = exportBytes(t, w.b, "vm1/disk0")
	fileEquals(t, aImg, want)

	// And back to A.
	bImg := imageOf(t, w.b)
	out = w.b.run("failover", "planned", "vm1")
	if !strings.Contains(out, "replication reversed") {
		t.Fatalf("planned failover back said:\n%s", out)
	}
	if imageOf(t, w.a) != aImg {
		t.Fatal("A serves vm1 from another image than its own")
	}
	if !bytes.Equal(exportBytes(t, w.a, "vm1/disk0"), want) {
		t.Fatal("A serves something else than B had")
	}
	writePattern(t, w.a, "vm1/disk0", 0x34, 7)
	waitFor(t, "A to finish the resync back to B", func() bool {
		st := primaryStatus(t, w.a, "vm1")
		return st.State == "replicating" && st.LastApplied > 0
	})
	w.a.run("replication", "sync", "vm1")
	fileEquals(t, bImg, exportBytes(t, w.a, "vm1/disk0"))
	if st := primaryStatus(t, w.a, "vm1"); st.Health != "normal" {
		t.Fatalf("A's replication after failing back: %+v", st)
	}
}

// TestReverseAfterUnplannedFailover: the primary A is lost; B fails over
// to an older point and its VM writes; A comes back; B replicates back to
// A with a checksum resync that sends only the blocks that differ (counted:
// the resync's bytes on the wire against the differing 16 KiB blocks).
func TestReverseAfterUnplannedFailover(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	w := newTwoWay(t)
	aImg := w.a.addVM("vm1", "16M")
	w.a.run("replication", "enable", "vm1", "--replica", w.bAddr, "--frequency", "1h",
		"--recovery-points", "3", "--recovery-point-interval", "1s")
	w.a.run("replication", "sync", "vm1") // its cycle is a point
	cycles, _ := pointedCycles(t, w.a, 3, 0x41, 2)
	w.a.kill()

	w.b.run("failover", "unplanned", "vm1", "--point", fmt.Sprint(cycles[0]))
	writePattern(t, w.b, "vm1/disk0", 0x99, 8)
	aData, err := os.ReadFile(aImg)
	if err != nil {
		t.Fatal(err)
	}
	bData := exportBytes(t, w.b, "vm1/disk0")
	const block = 16 << 10 // the default resync block
	// Differing blocks that read as zeroes on B travel as ranges, the
	// others as data.
	differ, withData := 0, 0
	zero := make([]byte, block)
	for off := 0; off < len(aData); off += block {
		if !bytes.Equal(aData[off:off+block], bData[off:off+block]) {
			differ++
			if !bytes.Equal(bData[off:off+block], zero) {
				withData++
			}
		}
	}
	if differ != 3*(1<<20)/block {
		t.Fatalf("%d blocks differ before the reverse, want the 3 MiB of patterns", differ)
	}

	// A is back: its shipper finds the VM failed over and stops.
	w.a.start()
	w.aAddr = listenAddr(t, w.a) // a new port: it listens on 127.0.0.1:0
	waitFor(t, "A's replication to stop on the failed-over replica", func() bool {
		return primaryStatus(t, w.a, "vm1").Health == "critical"
	})
	if st := primaryStatus(t, w.a, "vm1"); !strings.Contains(st.Reason+st.LastError, "failed over") {
		t.Fatalf("A's status does not say the VM failed over: %+v", st)
	}
	// A fences its stale copy; the reverse below ends the fence with the
	// VM's place in A's registry.
	waitFor(t, "A to fence vm1", func() bool { return vmFence(t, w.a, "vm1") != nil })
	w.b.run("replication", "reverse", "vm1", "--replica", w.aAddr, "--frequency", "1h", "--compression=false")
	waitFor(t, "B's resync back to A", func() bool {
		st := primaryStatus(t, w.b, "vm1")
		return st.State == "replicating" && st.LastApplied > 0
	})
	w.b.run("replication", "sync", "vm1")
	fileEquals(t, aImg, exportBytes(t, w.b, "vm1/disk0"))
	if hasVM(t, w.a, "vm1") {
		t.Fatal("vm1 is still a VM of A after the reverse")
	}
	sent := primaryStatus(t, w.b, "vm1").Metrics.SyncWireBytesTotal
	want := int64(withData * block)
	if withData != (1<<20)/block || sent < want || sent > want+want/8+(64<<10) {
		t.Fatalf("the reverse resync sent %d bytes for %d differing blocks, %d of them with data (%d bytes); a full copy is %d", sent, differ, withData, want, len(aData))
	}
	t.Logf("reverse resync: %d differing %d KiB blocks (%d with data), %d bytes on the wire (full copy: %d)", differ, block>>10, withData, sent, len(aData))
	if _, errOut, err := w.b.try("replication", "points", "vm1"); err == nil || !strings.Contains(errOut, "not a replica VM") {
		t.Fatalf("B still keeps recovery points of vm1 after reverse completed the failover: %v %s", err, errOut)
	}
}

// TestPlannedFailoverRefusedWhileOpen: a planned failover is refused while
// a client has the VM's disk open for writing; --force makes the disk
// read-only under it (its writes fail) and hands the VM over.
func TestPlannedFailoverRefusedWhileOpen(t *testing.T) {
	need(t, "nbdcopy", "qemu-io")
	w := newTwoWay(t)
	w.a.addVM("vm1", "16M")
	w.a.run("replication", "enable", "vm1", "--replica", w.bAddr, "--frequency", "1h")
	w.a.run("replication", "sync", "vm1")
	mp := t.TempDir()
	w.a.mount(mp)
	f, err := os.OpenFile(filepath.Join(mp, "vm1", "disk0.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x5e}, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := w.a.try("failover", "planned", "vm1"); err == nil || !strings.Contains(errOut, "file(s) open through FUSE") {
		t.Fatalf("planned failover with the disk open: %v %s", err, errOut)
	}
	// A keeps the VM (read-only) until nothing has it open: the command
	// waits for B to replicate back, which needs the file closed.
	done := background(w.a, "failover", "planned", "vm1", "--force")
	waitFor(t, "B to serve vm1", func() bool { _, ok := vmList(t, w.b)["vm1"]; return ok })
	if _, err := f.WriteAt([]byte("late"), 0); err == nil {
		if err = f.Sync(); err == nil {
			t.Fatal("a write to the handed-over disk through the open file went through")
		}
	}
	f.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, ok := vmList(t, w.a)["vm1"]; ok {
		t.Fatal("A did not become the replica once the file was closed")
	}
	got := exportBytes(t, w.b, "vm1/disk0")
	if !bytes.Equal(got[1<<20:1<<20+4096], bytes.Repeat([]byte{0x5e}, 4096)) || bytes.Equal(got[:4], []byte("late")) {
		t.Fatal("the new primary does not hold exactly what was written before the handover")
	}
}
