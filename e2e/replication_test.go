package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pair is a primary and a replica daemon on loopback, with certificates made
// by `vdrepl pki` and the primary on the replica's allow-list.
type pair struct {
	prim, rep   *host
	pki         string
	storage     string // the replica's storage directory for the primary
	replicaAddr string
}

func vdrepl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(vdreplBin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("vdrepl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func tlsFlags(dir, name string) []string {
	return []string{"--tls-cert", filepath.Join(dir, name+".crt"), "--tls-key", filepath.Join(dir, name+".key"), "--tls-ca", filepath.Join(dir, "ca.crt")}
}

func newPair(t *testing.T) *pair {
	t.Helper()
	return newPairWith(t, pairOpts{primExtra: []string{"--metrics-listen", "127.0.0.1:0"}})
}

// pairOpts changes what newPairWith builds.
type pairOpts struct {
	primExtra []string // extra `serve` flags of the primary
	storage   string   // the replica's storage directory for primary.test (default: a new temporary one)
}

// newPairWith is newPair with options: a primary with extra serve flags, a
// replica storage directory the test prepared (e.g. a small filesystem).
func newPairWith(t *testing.T, o pairOpts) *pair {
	t.Helper()
	p := &pair{pki: t.TempDir(), storage: o.storage}
	if p.storage == "" {
		p.storage = filepath.Join(t.TempDir(), "replicas")
	}
	vdrepl(t, "pki", "init", "--dir", p.pki)
	vdrepl(t, "pki", "issue", "--dir", p.pki, "--name", "primary.test", "--san", "127.0.0.1")
	vdrepl(t, "pki", "issue", "--dir", p.pki, "--name", "replica.test", "--san", "127.0.0.1")
	p.rep = newHost(t, append(tlsFlags(p.pki, "replica.test"), "--replica-listen", "127.0.0.1:0")...)
	prim := append(tlsFlags(p.pki, "primary.test"), "--retry-scale", "0.0005")
	p.prim = newHost(t, append(prim, o.primExtra...)...)
	p.rep.run("replica", "allow", "add", "--primary", "primary.test", "--storage", p.storage)
	var st struct {
		ReplicaListen string `json:"replica_listen"`
	}
	if err := json.Unmarshal([]byte(p.rep.run("status", "--json")), &st); err != nil || st.ReplicaListen == "" {
		t.Fatalf("replica status has no listen address: %v %+v", err, st)
	}
	p.replicaAddr = st.ReplicaListen
	return p
}

// exportBytes reads a whole NBD export of h.
func exportBytes(t *testing.T, h *host, export string) []byte {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "export.img")
	sh(t, "nbdcopy", h.uri(export), dst)
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkEqual compares the primary's export with the replica's image file.
func (p *pair) checkEqual(t *testing.T, vm, disk string) {
	t.Helper()
	want := exportBytes(t, p.prim, vm+"/"+disk)
	got, err := os.ReadFile(filepath.Join(p.storage, vm, disk+".img"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("replica image is %d bytes, primary %d", len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("replica differs from primary at byte %d (block %d)", i, i/4096)
			}
		}
	}
}

type replStatus struct {
	Primaries []primStatus `json:"primaries"`
	Replicas  []struct {
		VM         string `json:"vm"`
		Primary    string `json:"primary"`
		Applied    uint64 `json:"applied"`
		Consistent bool   `json:"consistent"`
		State      string `json:"state"`
	} `json:"replicas"`
}

func (h *host) replication(vm string) replStatus {
	h.t.Helper()
	var s replStatus
	if err := json.Unmarshal([]byte(h.run("replication", "status", vm, "--json")), &s); err != nil {
		h.t.Fatal(err)
	}
	return s
}

// primStatus is what a script reads from `replication status VM --json` on
// the primary.
type primStatus struct {
	VM          string    `json:"vm"`
	Replica     string    `json:"replica"`
	State       string    `json:"state"`
	Health      string    `json:"health"`
	Reason      string    `json:"reason"`
	LastApplied uint64    `json:"last_applied_cycle"`
	LastError   string    `json:"last_error"`
	NextRetry   time.Time `json:"next_retry"`
	// OldestUnshipped is set once a closed cycle waits for the replica.
	OldestUnshipped time.Time `json:"oldest_unshipped"`
	// Verified is the last cycle the replica checked against our roots.
	Verified uint64 `json:"verified_cycle"`
	Diverged *struct {
		Cycle uint64   `json:"cycle"`
		Disks []string `json:"disks"`
	} `json:"diverged"`
	Metrics struct {
		Health              int     `json:"health"`
		LagSeconds          float64 `json:"lag_seconds"`
		PendingBytes        int64   `json:"pending_bytes"`
		PendingCycles       int     `json:"pending_cycles"`
		JournalCapBytes     int64   `json:"journal_cap_bytes"`
		CyclesShippedTotal  int64   `json:"cycles_shipped_total"`
		CycleWireBytesTotal int64   `json:"cycle_wire_bytes_total"`
		SyncWireBytesTotal  int64   `json:"sync_wire_bytes_total"`
		SyncReadBytesTotal  int64   `json:"sync_read_bytes_total"`
		RetriesTotal        int64   `json:"retries_total"`
	} `json:"metrics"`
}

// primaryStatus is the primary-side status of vm on h.
func primaryStatus(t *testing.T, h *host, vm string) primStatus {
	t.Helper()
	out := h.run("replication", "status", vm, "--json")
	var s struct {
		Primaries []primStatus `json:"primaries"`
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("replication status %s --json: %v\n%s", vm, err, out)
	}
	for _, p := range s.Primaries {
		if p.VM == vm {
			return p
		}
	}
	t.Fatalf("replication status %s --json lists no primary entry for it:\n%s", vm, out)
	return primStatus{}
}

func fioVerify(t *testing.T, uri, size string) {
	t.Helper()
	sh(t, "fio", "--name=repl", "--ioengine=nbd", "--uri="+uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size="+size,
		"--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1")
}

// TestReplicationEndToEnd: fio with verify on the primary, an initial copy,
// cycles, `replication sync`, and the replica equal to the primary byte for
// byte after each step.
func TestReplicationEndToEnd(t *testing.T) {
	need(t, "fio", "nbdcopy", "qemu-io")
	p := newPair(t)
	p.prim.addVM("vm1", "64M")
	fioVerify(t, p.prim.uri("vm1/disk0"), "16m")

	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1")
	p.checkEqual(t, "vm1", "disk0")

	// Writes after the initial copy travel as cycles.
	fioVerify(t, p.prim.uri("vm1/disk0"), "32m")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 40M 1M", "-c", "discard 8M 4M", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1")
	p.checkEqual(t, "vm1", "disk0")

	s := p.rep.replication("vm1")
	if len(s.Replicas) != 1 || s.Replicas[0].Primary != "primary.test" || !s.Replicas[0].Consistent || s.Replicas[0].Applied == 0 {
		t.Fatalf("replica status: %+v", s)
	}
	ps := p.prim.replication("vm1")
	if len(ps.Primaries) != 1 || ps.Primaries[0].State != "replicating" || ps.Primaries[0].Health != "normal" {
		t.Fatalf("primary status: %+v", ps)
	}

	// The same figures for Prometheus.
	var st struct {
		MetricsListen string `json:"metrics_listen"`
	}
	if err := json.Unmarshal([]byte(p.prim.run("status", "--json")), &st); err != nil || st.MetricsListen == "" {
		t.Fatalf("no metrics address in status: %v", err)
	}
	resp, err := http.Get("http://" + st.MetricsListen + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`vdrepl_replication_health{vm="vm1"} 0`,
		`vdrepl_replication_frequency_seconds{vm="vm1"} 3600`,
		`vdrepl_replication_state{state="replicating",vm="vm1"} 1`,
		`vdrepl_replication_last_applied_cycle{vm="vm1"} ` + fmt.Sprint(s.Replicas[0].Applied),
		`vdrepl_replication_configured_vms 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
}

// An unusable certificate turns replication off, not the disks: the daemon
// still serves NBD and says why in status.
func TestBadCertificateKeepsDisksServed(t *testing.T) {
	need(t, "qemu-io")
	a, b := t.TempDir(), t.TempDir()
	vdrepl(t, "pki", "init", "--dir", a)
	vdrepl(t, "pki", "init", "--dir", b)
	vdrepl(t, "pki", "issue", "--dir", a, "--name", "host.test")
	// host.test's certificate with the other CA: it does not chain.
	h := newHost(t, "--tls-cert", filepath.Join(a, "host.test.crt"), "--tls-key", filepath.Join(a, "host.test.key"),
		"--tls-ca", filepath.Join(b, "ca.crt"))
	h.addVM("vm1", "8M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k", h.uri("vm1/disk0"))
	var st struct {
		Warnings []string `json:"warnings"`
	}
	if err := json.Unmarshal([]byte(h.run("status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Warnings) == 0 || !strings.Contains(st.Warnings[0], "TLS identity unusable") {
		t.Fatalf("status warnings %q lack the certificate problem", st.Warnings)
	}
	_, errOut, err := h.try("replication", "enable", "vm1", "--replica", "127.0.0.1:1")
	if err == nil || !strings.Contains(errOut, "TLS identity unusable") {
		t.Fatalf("enable with an unusable certificate: %v %s", err, errOut)
	}
}
