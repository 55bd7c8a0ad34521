package e2e

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// `vdrepl doctor` against real misconfigurations: real daemons over real
// TLS on loopback, certificates from `vdrepl pki` (or signed by its CA when
// pki would refuse to make them), a proxy that breaks uploads, a network
// namespace with IPv6 off, a read-only state directory.

type docFinding struct {
	Check    string `json:"check"`
	Subject  string `json:"subject"`
	Severity string `json:"severity"`
	Cause    string `json:"cause"`
	Fix      string `json:"fix"`
}

type docReport struct {
	Findings []docFinding `json:"findings"`
	Problems int          `json:"problems"`
	Warnings int          `json:"warnings"`
}

// runDoctor runs `vdrepl --state STATE doctor --json ARGS...`, under
// prefix (e.g. unshare) if given, and returns its report and whether it
// exited 0.
func runDoctor(t *testing.T, state string, prefix []string, args ...string) (docReport, bool) {
	t.Helper()
	argv := append(append(append([]string{}, prefix...), vdreplBin, "--state", state, "doctor", "--json", "--timeout", "5s"), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, errOut.String())
	}
	var r docReport
	if jerr := json.Unmarshal([]byte(out.String()), &r); jerr != nil {
		t.Fatalf("doctor --json: %v\nstdout:\n%s\nstderr:\n%s", jerr, out.String(), errOut.String())
	}
	for _, f := range r.Findings {
		t.Logf("  %-8s %-12s %s: %s; %s", f.Severity, f.Check, f.Subject, f.Cause, f.Fix)
	}
	if (err == nil) != (r.Problems == 0) {
		t.Fatalf("doctor exited %v with %d problems; a problem, and only a problem, makes it fail", err, r.Problems)
	}
	return r, err == nil
}

// want checks for a finding of check with severity sev whose cause and
// fix contain all words; problems and warnings must name a fix.
func (r docReport) want(t *testing.T, check, sev string, words ...string) {
	t.Helper()
	for _, f := range r.Findings {
		if f.Check != check || f.Severity != sev {
			continue
		}
		text := f.Subject + ": " + f.Cause + "; " + f.Fix
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(text, w)
		}
		if ok {
			if sev != "ok" && f.Fix == "" {
				t.Errorf("%s %s without a fix: %s", sev, check, f.Cause)
			}
			return
		}
	}
	t.Fatalf("doctor reported no %s %s with %q", sev, check, words)
}

// none checks that no finding of check has severity sev.
func (r docReport) none(t *testing.T, check, sev string) {
	t.Helper()
	for _, f := range r.Findings {
		if f.Check == check && f.Severity == sev {
			t.Fatalf("unexpected %s %s: %s", sev, check, f.Cause)
		}
	}
}

// signCert writes dir/name.crt and .key: a certificate signed by the CA
// `vdrepl pki init` made in dir, shaped by edit, for faults `vdrepl pki
// issue` refuses to make.
func signCert(t *testing.T, dir, name string, edit func(*x509.Certificate)) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	ca, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = os.ReadFile(filepath.Join(dir, "ca.key")); err != nil {
		t.Fatal(err)
	}
	blk, _ = pem.Decode(b)
	caKey, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	edit(tmpl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey.(crypto.Signer))
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// newCADir makes a CA with `vdrepl pki init` and issues names with SAN
// 127.0.0.1.
func newCADir(t *testing.T, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	vdrepl(t, "pki", "init", "--dir", dir)
	for _, n := range names {
		vdrepl(t, "pki", "issue", "--dir", dir, "--name", n, "--san", "127.0.0.1")
	}
	return dir
}

// startReplica runs a replica daemon with cert (from certDir, trusting
// caDir's CA) that allows primary.test, and returns it and its address.
func startReplica(t *testing.T, certDir, caDir, cert string, allow bool) (*host, string) {
	t.Helper()
	flags := []string{"--tls-cert", filepath.Join(certDir, cert+".crt"), "--tls-key", filepath.Join(certDir, cert+".key"),
		"--tls-ca", filepath.Join(caDir, "ca.crt"), "--replica-listen", "127.0.0.1:0"}
	rep := newHost(t, flags...)
	if allow {
		rep.run("replica", "allow", "add", "--primary", "primary.test", "--storage", filepath.Join(t.TempDir(), "replicas"))
	}
	var st struct {
		ReplicaListen string `json:"replica_listen"`
	}
	if err := json.Unmarshal([]byte(rep.run("status", "--json")), &st); err != nil || st.ReplicaListen == "" {
		t.Fatalf("replica status has no listen address: %v %+v", err, st)
	}
	return rep, st.ReplicaListen
}

// TestDoctorPair: a healthy pair with a replicated VM is all ok (exit 0);
// paused replication is a warning; a replica that went away is a problem,
// and the lag it causes is named.
func TestDoctorPair(t *testing.T) {
	p := newPair(t)
	p.prim.addVM("vm1", "8M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1s")
	p.prim.run("replication", "sync", "vm1")

	r, ok := runDoctor(t, p.prim.state, nil, "vm1")
	if !ok {
		t.Fatal("doctor failed on a healthy pair")
	}
	for _, c := range []string{"daemon", "fuse", "state-dir", "journal-room", "nbd", "tls-identity", "resolve", "ip-family", "tcp",
		"tls-server", "tls-client", "allow-list", "clock", "upload", "vm-replica", "vm", "vm-journal"} {
		r.want(t, c, "ok")
	}
	r.want(t, "nbd", "ok", "held by the running daemon")
	r.want(t, "journal-room", "ok", "the journals of vm1")
	r.want(t, "allow-list", "ok", `"primary.test"`)
	r.want(t, "vm", "ok", "replicating to "+p.replicaAddr)
	r.none(t, "proxy", "ok") // no proxy configured: none checked

	// Without a VM, the replicas of the host's VMs are checked.
	r, _ = runDoctor(t, p.prim.state, nil)
	r.want(t, "upload", "ok", p.replicaAddr)

	p.prim.run("replication", "pause", "vm1")
	r, ok = runDoctor(t, p.prim.state, nil, "vm1")
	if !ok {
		t.Fatal("paused replication is a warning, not a problem")
	}
	r.want(t, "vm", "warning", "paused", "vdrepl replication resume vm1")
	p.prim.run("replication", "resume", "vm1")

	p.rep.kill()
	waitStatus(t, p.prim, "vm1", "lag over two cycles", func(s primStatus) bool { return s.Metrics.LagSeconds > 2.5 })
	r, _ = runDoctor(t, p.prim.state, nil, "vm1")
	r.want(t, "tcp", "problem", "nothing listens", "--replica-listen")
	r.want(t, "vm-lag", "warning", "against a frequency of 1s")
}

// TestDoctorNotAllowed: a primary missing from the replica's allow-list is
// named with the command that adds it, and its stopped replication too.
func TestDoctorNotAllowed(t *testing.T) {
	p := newPair(t)
	p.prim.addVM("vm1", "8M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1")
	p.rep.run("replica", "allow", "remove", "--primary", "primary.test")
	p.prim.try("replication", "sync", "vm1", "--timeout", "10s")
	waitStatus(t, p.prim, "vm1", "replication stopped", func(s primStatus) bool { return s.Health == "critical" })

	r, ok := runDoctor(t, p.prim.state, nil, "vm1")
	if ok {
		t.Fatal("doctor exited 0 with the primary off the allow-list")
	}
	r.want(t, "tls-client", "ok")
	r.want(t, "allow-list", "problem", `"primary.test"`, "vdrepl replica allow add --primary primary.test")
	r.want(t, "vm", "problem", "stopped", "vdrepl replication resume vm1")
	r.none(t, "upload", "ok")
}

// TestDoctorCertificates: each certificate fault against a real replica
// daemon, named with its fix.
func TestDoctorCertificates(t *testing.T) {
	// doctor with the primary's files and no primary daemon; unix NBD
	// only, so that no port of another test is taken for ours.
	run := func(t *testing.T, pkiDir, cert, addr string) (docReport, bool) {
		state := t.TempDir()
		return runDoctor(t, state, nil, "--replica", addr, "--nbd", "unix:"+filepath.Join(state, "nbd.sock"),
			"--tls-cert", filepath.Join(pkiDir, cert+".crt"), "--tls-key", filepath.Join(pkiDir, cert+".key"), "--tls-ca", filepath.Join(pkiDir, "ca.crt"))
	}

	t.Run("replica from another CA", func(t *testing.T) {
		ours := newCADir(t, "primary.test")
		theirs := newCADir(t, "replica.test")
		_, addr := startReplica(t, theirs, theirs, "replica.test", true)
		r, ok := run(t, ours, "primary.test", addr)
		if ok {
			t.Fatal("exit 0")
		}
		r.want(t, "tls-server", "problem", `the replica's certificate "replica.test" was issued by a CA that only has the same name`, "one CA")
		r.want(t, "tls-client", "problem", "refused", "unknown certificate authority", "--tls-ca")
	})

	t.Run("primary lacks clientAuth", func(t *testing.T) {
		dir := newCADir(t, "replica.test")
		signCert(t, dir, "primary.test", func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} })
		_, addr := startReplica(t, dir, dir, "replica.test", true)
		// The primary's daemon runs (its disks are served) with replication
		// off; doctor takes its certificate from it.
		prim := newHost(t, tlsFlags(dir, "primary.test")...)
		r, ok := runDoctor(t, prim.state, nil, "--replica", addr)
		if ok {
			t.Fatal("exit 0")
		}
		r.want(t, "tls-identity", "problem", "lacks the clientAuth", "vdrepl pki issue --name primary.test")
		r.want(t, "tls-client", "problem", "refused", "lacks the clientAuth usage")
	})

	t.Run("address not in the replica's SAN", func(t *testing.T) {
		dir := newCADir(t, "primary.test")
		signCert(t, dir, "replica.test", func(c *x509.Certificate) { c.IPAddresses = nil })
		_, addr := startReplica(t, dir, dir, "replica.test", true)
		r, ok := run(t, dir, "primary.test", addr)
		if ok {
			t.Fatal("exit 0")
		}
		r.want(t, "tls-server", "problem", `is for replica.test, not "127.0.0.1"`, "vdrepl pki issue --name replica.test --san 127.0.0.1`")
	})

	t.Run("replica certificate expiring", func(t *testing.T) {
		dir := newCADir(t, "primary.test")
		signCert(t, dir, "replica.test", func(c *x509.Certificate) { c.NotAfter = time.Now().Add(10 * 24 * time.Hour) })
		_, addr := startReplica(t, dir, dir, "replica.test", true)
		r, ok := run(t, dir, "primary.test", addr)
		if !ok {
			t.Fatal("an expiring certificate is a warning, not a problem")
		}
		r.want(t, "tls-server", "warning", "expires in 9 days", "vdrepl pki issue --name replica.test")
		r.want(t, "upload", "ok")
	})
}

// TestDoctorProxy: the primary's daemon ships through HTTPS_PROXY, and the
// proxy cuts uploads after 1 MiB: doctor names it, with --bypass-proxy as
// the fix; checked directly, the way is fine. The replica is addressed by
// name (a loopback address never goes through a proxy): doctor runs in a
// mount namespace whose /etc/hosts names it.
func TestDoctorProxy(t *testing.T) {
	needRoot(t)
	need(t, "unshare", "mount")
	dir := newCADir(t, "primary.test", "replica.test")
	_, addr := startReplica(t, dir, dir, "replica.test", true)
	_, port, _ := net.SplitHostPort(addr)
	px := newConnectProxy(t, addr, 1<<20)
	t.Setenv("HTTPS_PROXY", "http://"+px.addr())
	t.Setenv("https_proxy", "")
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")
	prim := newHost(t, tlsFlags(dir, "primary.test")...) // its environment has the proxy

	hosts := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(hosts, []byte("127.0.0.1 localhost\n127.0.0.1 replica.test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	withHosts := []string{"unshare", "-m", "--propagation", "private", "sh", "-c", `mount --bind "$0" /etc/hosts && exec "$@"`, hosts}
	replica := "replica.test:" + port

	r, ok := runDoctor(t, prim.state, withHosts, "--replica", replica)
	if ok {
		t.Fatal("exit 0 through a proxy that cuts uploads")
	}
	r.want(t, "proxy", "ok", "the daemon's HTTPS_PROXY", "opens a tunnel to "+replica)
	r.want(t, "allow-list", "ok")
	r.want(t, "upload", "problem", "through the proxy http://"+px.addr(), "broke off", "while directly it goes through", "--bypass-proxy")
	if px.tunnels() == 0 {
		t.Fatal("the proxy saw no tunnel")
	}

	r, ok = runDoctor(t, prim.state, withHosts, "--replica", replica, "--bypass-proxy")
	if !ok {
		t.Fatal("doctor --bypass-proxy found a problem")
	}
	r.none(t, "proxy", "ok")
	r.want(t, "upload", "ok")
}

// TestDoctorIPv6Off: in a network namespace with IPv6 disabled, a replica
// name that resolves only to ::1 is named as such (a problem), and
// localhost resolving to ::1 as well as 127.0.0.1 as a warning.
func TestDoctorIPv6Off(t *testing.T) {
	needRoot(t)
	need(t, "unshare", "mount", "ip")
	hosts := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(hosts, []byte("::1 localhost ip6only.test\n127.0.0.1 localhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ns := []string{"unshare", "-n", "-m", "--propagation", "private", "sh", "-c",
		`mount --bind "$0" /etc/hosts && ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && exec "$@"`, hosts}
	state := t.TempDir()
	r, ok := runDoctor(t, state, ns, "--replica", "ip6only.test:8443")
	if ok {
		t.Fatal("exit 0")
	}
	r.want(t, "resolve", "ok", "ip6only.test resolves to ::1 (IPv6)")
	r.want(t, "ip-family", "problem", "resolves only to ::1 (IPv6), but IPv6 is disabled on this host", "IPv4 address")
	r.none(t, "tcp", "ok")

	r, _ = runDoctor(t, state, ns, "--replica", "localhost:8443")
	r.want(t, "ip-family", "warning", "::1 (IPv6) too, but IPv6 is disabled", "only 127.0.0.1 (IPv4) can be reached")
	r.want(t, "tcp", "problem", "nothing listens on port 8443 of 127.0.0.1")
}

// TestDoctorLocal: a read-only state directory, journal caps the
// filesystem cannot hold, an NBD port another process holds.
func TestDoctorLocal(t *testing.T) {
	needRoot(t)
	need(t, "unshare", "mount")
	state := t.TempDir()
	ro := []string{"unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"`, state}
	r, ok := runDoctor(t, state, ro, "--nbd", "unix:"+filepath.Join(state, "nbd.sock"))
	if ok {
		t.Fatal("exit 0 with a read-only state directory")
	}
	r.want(t, "state-dir", "problem", "read-only file system", "remount it read-write")

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, _ = runDoctor(t, state, nil, "--nbd", "tcp:"+l.Addr().String())
	r.want(t, "nbd", "problem", "another process listens", "--nbd")

	// A journal cap far beyond the free space, for a replicated VM.
	dir := newCADir(t, "primary.test")
	prim := newHost(t, append(tlsFlags(dir, "primary.test"), "--journal-cap", "1000T")...)
	prim.addVM("vm1", "8M")
	// --no-check: no replica listens there, and none needs to for this check.
	prim.run("replication", "enable", "vm1", "--replica", "127.0.0.1:1", "--frequency", "1h", "--no-check")
	r, _ = runDoctor(t, prim.state, nil, "vm1")
	r.want(t, "journal-room", "problem", "the journals of vm1 may grow", "--journal-cap")
}

// connectProxy is an HTTP CONNECT proxy on loopback that sends every
// tunnel to target (whatever name the client asked for) and cuts it after
// limit bytes from the client: a proxy that drops large uploads.
type connectProxy struct {
	ln     net.Listener
	target string
	limit  int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	n      int
	conns  []net.Conn
}

func newConnectProxy(t *testing.T, target string, limit int64) *connectProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{ln: ln, target: target, limit: limit}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.track(c)
			p.wg.Add(1)
			go p.serve(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *connectProxy) addr() string { return p.ln.Addr().String() }

func (p *connectProxy) tunnels() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

func (p *connectProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

func (p *connectProxy) serve(down net.Conn) {
	defer p.wg.Done()
	defer down.Close()
	br := bufio.NewReader(down)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		return
	}
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		io.WriteString(down, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
		return
	}
	p.track(up)
	defer up.Close()
	p.mu.Lock()
	p.n++
	p.mu.Unlock()
	io.WriteString(down, "HTTP/1.1 200 Connection established\r\n\r\n")
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		io.Copy(down, up)
		down.Close()
	}()
	io.Copy(up, io.LimitReader(br, p.limit))
}
