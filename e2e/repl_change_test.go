package e2e

import (
	"encoding/json"
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
