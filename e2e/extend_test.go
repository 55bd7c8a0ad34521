package e2e

import (
	"bytes"
	"net"
	"path/filepath"
	"testing"
)

// freeAddr is a loopback address with a port nobody listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestExtendedReplication: primary A -> replica B -> third host C. C gets an
// initial copy from B while B applies, then B's cycles; C's image equals
// A's at a cycle; with A and B gone, C fails over and serves A's last data.
func TestExtendedReplication(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	dir := t.TempDir()
	vdrepl(t, "pki", "init", "--dir", dir)
	for _, n := range []string{"primary.test", "replica.test", "third.test"} {
		vdrepl(t, "pki", "issue", "--dir", dir, "--name", n, "--san", "127.0.0.1")
	}
	// B keeps its port across its restart below.
	listen := func(addr string) []string { return []string{"--replica-listen", addr, "--retry-scale", "0.0005"} }
	a := newHost(t, append(tlsFlags(dir, "primary.test"), "--retry-scale", "0.0005")...)
	b := newHost(t, append(tlsFlags(dir, "replica.test"), listen(freeAddr(t))...)...)
	c := newHost(t, append(tlsFlags(dir, "third.test"), listen("127.0.0.1:0")...)...)
	onC := filepath.Join(t.TempDir(), "on-c")
	b.run("replica", "allow", "add", "--primary", "primary.test", "--storage", filepath.Join(t.TempDir(), "on-b"))
	c.run("replica", "allow", "add", "--primary", "replica.test", "--storage", onC)

	a.addVM("vm1", "16M")
	writePattern(t, a, "vm1/disk0", 0x51, 1)
	a.run("replication", "enable", "vm1", "--replica", listenAddr(t, b), "--frequency", "1h")
	a.run("replication", "sync", "vm1")
	if _, errOut, err := a.try("replication", "enable", "vm1", "--replica", listenAddr(t, c)); err == nil {
		t.Fatalf("a primary replicated to a second host directly: %s", errOut)
	}

	b.run("replication", "extend", "vm1", "--replica", listenAddr(t, c), "--frequency", "1h")
	// Writes go on while C's initial copy runs.
	writePattern(t, a, "vm1/disk0", 0x52, 3)
	a.run("replication", "sync", "vm1")
	b.run("replication", "sync", "vm1")
	want := exportBytes(t, a, "vm1/disk0")
	fileEquals(t, filepath.Join(onC, "vm1", "disk0.img"), want)

	// Cycles travel on: A -> B -> C.
	for i := range 3 {
		writePattern(t, a, "vm1/disk0", byte(0x60+i), 5+i)
		a.run("replication", "sync", "vm1")
	}
	b.run("replication", "sync", "vm1")
	want = exportBytes(t, a, "vm1/disk0")
	fileEquals(t, filepath.Join(onC, "vm1", "disk0.img"), want)
	if s := c.replication("vm1"); len(s.Replicas) != 1 || s.Replicas[0].Primary != "replica.test" || !s.Replicas[0].Consistent {
		t.Fatalf("C's status: %+v", s)
	}
	if st := primaryStatus(t, b, "vm1"); st.State != "replicating" || st.Health != "normal" {
		t.Fatalf("B's extended replication: %+v", st)
	}
	// B restarts: the extension goes on.
	b.stop()
	b.start()
	writePattern(t, a, "vm1/disk0", 0x70, 9)
	a.run("replication", "sync", "vm1")
	b.run("replication", "sync", "vm1")
	want = exportBytes(t, a, "vm1/disk0")
	fileEquals(t, filepath.Join(onC, "vm1", "disk0.img"), want)

	// Both primary and replica lost: fail over on the third host.
	a.kill()
	b.kill()
	c.run("failover", "unplanned", "vm1")
	if !bytes.Equal(exportBytes(t, c, "vm1/disk0"), want) {
		t.Fatal("the third host's failed-over disk is not the primary's last data")
	}
}
