package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The tests here are about changing what replicates where: the check
// `replication enable` makes before it enables anything, and `replication
// set` changing a running replication.

// deadAddr is a loopback address nothing listens on.
func deadAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// notEnabled checks that vm on h has no replication: no primary entry in
// its status, and no replication in `vm list --json`.
func notEnabled(t *testing.T, h *host, vm string) {
	t.Helper()
	var vms []struct {
		Name        string          `json:"name"`
		Replication json.RawMessage `json:"replication"`
	}
	if err := json.Unmarshal([]byte(h.run("vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.Name == vm && len(v.Replication) > 0 && string(v.Replication) != "null" {
			t.Fatalf("replication of %s is enabled after a refused enable: %s", vm, v.Replication)
		}
	}
	if out, _, err := h.try("replication", "status", vm, "--json"); err == nil {
		t.Fatalf("replication status of %s after a refused enable answered:\n%s", vm, out)
	}
}

// TestEnableChecksReplica: `replication enable` asks the replica first. A
// replica that does not answer, or that does not let this primary in, is
// named with the fix, the command fails and nothing is enabled; --no-check
// and an offline initial copy enable anyway.
func TestEnableChecksReplica(t *testing.T) {
	need(t, "qemu-io")
	p := newPair(t)
	p.prim.addVM("vm1", "16M")

	// Nothing listens there.
	dead := deadAddr(t)
	_, errOut, err := p.prim.try("replication", "enable", "vm1", "--replica", dead, "--frequency", "1h")
	if err == nil || !strings.Contains(errOut, "does not answer") || !strings.Contains(errOut, "--replica-listen") || !strings.Contains(errOut, "--no-check") {
		t.Fatalf("enable to a replica that is down: %v\n%s", err, errOut)
	}
	t.Logf("replica down: %s", strings.TrimSpace(errOut))
	notEnabled(t, p.prim, "vm1")

	// A primary with a certificate from another CA: no TLS handshake.
	otherCA := t.TempDir()
	vdrepl(t, "pki", "init", "--dir", otherCA, "--name", "other")
	stranger := extraPrimary(t, otherCA, "stranger.test")
	stranger.addVM("vma", "16M")
	_, errOut, err = stranger.try("replication", "enable", "vma", "--replica", p.replicaAddr, "--frequency", "1h")
	if err == nil || !strings.Contains(errOut, "TLS handshake with the replica") || !strings.Contains(errOut, "one CA") {
		t.Fatalf("enable from a host of another CA: %v\n%s", err, errOut)
	}
	t.Logf("another CA: %s", strings.TrimSpace(errOut))
	notEnabled(t, stranger, "vma")

	// A primary from the right CA that the replica does not allow.
	unlisted := extraPrimary(t, p.pki, "unlisted.test")
	unlisted.addVM("vmb", "16M")
	_, errOut, err = unlisted.try("replication", "enable", "vmb", "--replica", p.replicaAddr, "--frequency", "1h")
	want := "`vdrepl replica allow add --primary unlisted.test"
	if err == nil || !strings.Contains(errOut, "refuses this primary") || !strings.Contains(errOut, want) {
		t.Fatalf("enable to a replica that does not allow this primary: %v\n%s", err, errOut)
	}
	t.Logf("not allowed: %s", strings.TrimSpace(errOut))
	notEnabled(t, unlisted, "vmb")
	noReplicaVM(t, p.rep, "vmb", p.storage)

	// The admin follows the fix; the same command enables it.
	p.rep.run("replica", "allow", "add", "--primary", "unlisted.test", "--storage", filepath.Join(t.TempDir(), "unlisted"))
	unlisted.run("replication", "enable", "vmb", "--replica", p.replicaAddr, "--frequency", "1h")
	unlisted.run("replication", "sync", "vmb", "--timeout", "30s")

	// An offline initial copy needs no replica until it is imported.
	offline := t.TempDir()
	p.prim.run("replication", "enable", "vm1", "--replica", dead, "--frequency", "1h", "--initial", "offline:"+offline)
	waitFor(t, "the offline copy to be written", func() bool {
		_, err := os.Stat(filepath.Join(offline, "manifest.json"))
		return err == nil
	})
	p.prim.run("replication", "disable", "vm1")

	// --no-check enables without asking.
	p.prim.run("replication", "enable", "vm1", "--replica", dead, "--frequency", "1h", "--no-check")
	if s := primaryStatus(t, p.prim, "vm1"); s.VM != "vm1" {
		t.Fatalf("--no-check did not enable: %+v", s)
	}
}

// TestReplicationSet: `replication set` changes the frequency and the
// recovery points of a running replication without a resync (the sync
// bytes on the wire stay what the initial copy sent), status shows the new
// values, and the replica gets the point policy; a new replica address is
// accepted when it reaches the same replica, refused when it is another
// replica host unless --force, which makes a new initial copy there.
func TestReplicationSet(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	p := newPair(t)
	p.prim.addVM("vm1", "16M")
	writePattern(t, p.prim, "vm1/disk0", 0x31, 1)
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	before := primaryStatus(t, p.prim, "vm1")
	if before.Metrics.SyncWireBytesTotal == 0 {
		t.Fatalf("the initial copy sent nothing? %+v", before)
	}

	out := p.prim.run("replication", "set", "vm1", "--frequency", "1s", "--recovery-points", "3", "--recovery-point-interval", "1s")
	if !strings.Contains(out, "frequency 1s") || !strings.Contains(out, "recovery-points 3") {
		t.Fatalf("set said %q", out)
	}
	t.Logf("set: %s", strings.TrimSpace(out))
	text := p.prim.run("replication", "status", "vm1")
	if !strings.Contains(text, "frequency:    1s") || !strings.Contains(text, "3 kept on the replica, one per 1s") {
		t.Fatalf("status does not show the new settings:\n%s", text)
	}
	// The new frequency applies at once: cycles arrive without a sync.
	writePattern(t, p.prim, "vm1/disk0", 0x32, 3)
	applied := before.LastApplied
	s := waitStatus(t, p.prim, "vm1", "a cycle shipped at the new frequency", func(s primStatus) bool {
		return s.LastApplied >= applied+1 && s.Metrics.PendingCycles == 0
	})
	if s.Metrics.SyncWireBytesTotal != before.Metrics.SyncWireBytesTotal || s.State != "replicating" {
		t.Fatalf("set resynced: sync bytes %d before, %d after; %+v", before.Metrics.SyncWireBytesTotal, s.Metrics.SyncWireBytesTotal, s)
	}
	t.Logf("after set: cycle %d applied without a sync; sync bytes on the wire %d before, %d after", s.LastApplied, before.Metrics.SyncWireBytesTotal, s.Metrics.SyncWireBytesTotal)
	p.checkEqual(t, "vm1", "disk0")
	var rep struct {
		Replicas []struct {
			RecoveryPoints int     `json:"recovery_points"`
			Frequency      float64 `json:"frequency_seconds"`
		} `json:"replicas"`
	}
	if err := json.Unmarshal([]byte(p.rep.run("replication", "status", "vm1", "--json")), &rep); err != nil || len(rep.Replicas) != 1 {
		t.Fatalf("replica status: %v %+v", err, rep)
	}
	if rep.Replicas[0].RecoveryPoints != 3 || rep.Replicas[0].Frequency != 1 {
		t.Fatalf("the replica did not get the new policy: %+v", rep.Replicas[0])
	}
	p.prim.run("replication", "set", "vm1", "--frequency", "1h")

	// The same replica at another address (a TCP proxy in front of it;
	// the certificate's SAN 127.0.0.1 still matches).
	proxy := newFaultProxy(t, p.replicaAddr)
	var changed struct {
		Changed     []string `json:"changed"`
		SameReplica bool     `json:"same_replica"`
		NewReplica  bool     `json:"new_replica"`
		Spec        struct {
			Replica string `json:"replica"`
		} `json:"spec"`
	}
	if err := json.Unmarshal([]byte(p.prim.run("replication", "set", "vm1", "--replica", proxy.addr(), "--json")), &changed); err != nil {
		t.Fatal(err)
	}
	if !changed.SameReplica || changed.NewReplica || changed.Spec.Replica != proxy.addr() || fmt.Sprint(changed.Changed) != "[replica]" {
		t.Fatalf("set --replica to the same replica: %+v", changed)
	}
	writePattern(t, p.prim, "vm1/disk0", 0x33, 5)
	up := proxy.upstream()
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	if proxy.upstream() == up {
		t.Fatal("the cycle after set --replica did not go to the new address")
	}
	p.checkEqual(t, "vm1", "disk0")
	if s := primaryStatus(t, p.prim, "vm1"); s.Metrics.SyncWireBytesTotal != before.Metrics.SyncWireBytesTotal {
		t.Fatalf("the same replica at a new address got a resync: %+v", s)
	}

	// Another replica host: refused without --force.
	pki := p.pki
	vdrepl(t, "pki", "issue", "--dir", pki, "--name", "replica2.test", "--san", "127.0.0.1")
	rep2 := newHost(t, append(tlsFlags(pki, "replica2.test"), "--replica-listen", "127.0.0.1:0")...)
	storage2 := filepath.Join(t.TempDir(), "replicas2")
	rep2.run("replica", "allow", "add", "--primary", "primary.test", "--storage", storage2)
	addr2 := listenAddr(t, rep2)
	_, errOut, err := p.prim.try("replication", "set", "vm1", "--replica", addr2)
	if err == nil || !strings.Contains(errOut, "another replica") || !strings.Contains(errOut, "--force") {
		t.Fatalf("set --replica to another replica host: %v\n%s", err, errOut)
	}
	if s := primaryStatus(t, p.prim, "vm1"); s.Replica != proxy.addr() {
		t.Fatalf("a refused set changed the replica: %+v", s)
	}
	out = p.prim.run("replication", "set", "vm1", "--replica", addr2, "--force")
	if !strings.Contains(out, "initial copy") {
		t.Fatalf("set --force said %q", out)
	}
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	checkEqualAt(t, p.prim, storage2, "vm1")
}
