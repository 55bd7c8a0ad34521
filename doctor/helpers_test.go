package doctor

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/pki"
)

// newCA makes a CA with pki.Init in a temporary directory.
func newCA(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := pki.Init(dir, pki.InitOptions{Name: name}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// issue makes dir/name.crt and .key as `vdrepl pki issue --san 127.0.0.1`
// does, and loads them.
func issue(t *testing.T, dir, name string) TLSFiles {
	t.Helper()
	f, err := pki.Issue(dir, name, pki.IssueOptions{SANs: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	return TLSFiles{Cert: f.Cert, Key: f.Key, CA: f.CA}
}

// issueBad makes dir/name.crt and .key signed by the CA in dir, shaped by
// edit: a certificate `vdrepl pki issue` would never make (no clientAuth,
// expired, without the right name).
func issueBad(t *testing.T, dir, name string, edit func(*x509.Certificate)) TLSFiles {
	t.Helper()
	caCert := readCert(t, filepath.Join(dir, "ca.crt"))
	b, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	caKey, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	edit(tmpl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey.(crypto.Signer))
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	files := TLSFiles{Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"), CA: filepath.Join(dir, "ca.crt")}
	write(t, files.Cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	write(t, files.Key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	return files
}

func readCert(t *testing.T, file string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func write(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(name, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func identity(t *testing.T, files TLSFiles) *Identity {
	t.Helper()
	id, _ := LoadIdentity(files, time.Now())
	if id == nil {
		t.Fatalf("LoadIdentity(%+v) gave no identity", files)
	}
	return id
}

// replica is the real replica handler (apply.Server) behind TLS on
// loopback, presenting files and trusting clientCA, the way `vdrepl serve
// --replica-listen` serves it. allow lists the primaries it lets in.
type replica struct {
	addr string
	srv  *apply.Server
}

func newReplica(t *testing.T, files TLSFiles, clientCA string, allow ...string) *replica {
	t.Helper()
	return newReplicaWith(t, files, clientCA, nil, allow...)
}

// newReplicaWith is newReplica with a wrapper around the handler.
func newReplicaWith(t *testing.T, files TLSFiles, clientCA string, wrap func(http.Handler) http.Handler, allow ...string) *replica {
	t.Helper()
	srv, err := apply.New(apply.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range allow {
		if err := srv.Allow(apply.AllowEntry{Primary: p, Storage: t.TempDir()}); err != nil {
			t.Fatal(err)
		}
	}
	cert, err := tls.LoadX509KeyPair(files.Cert, files.Key)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, clientCA))
	var h http.Handler = srv.Handler()
	if wrap != nil {
		h = wrap(h)
	}
	ts := httptest.NewUnstartedServer(h)
	ts.TLS = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are what some tests are about
	ts.StartTLS()
	t.Cleanup(func() {
		ts.Close()
		srv.Close()
	})
	return &replica{addr: ts.Listener.Addr().String(), srv: srv}
}

// connectProxy is an HTTP CONNECT proxy on loopback with the faults of the
// proxies that break replication: it refuses tunnels, or cuts or stalls
// one after limit bytes from the client.
type connectProxy struct {
	t      *testing.T
	ln     net.Listener
	mode   string // "", "refuse", "cut" or "stall"
	limit  int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
	closed chan struct{}
}

func newConnectProxy(t *testing.T, mode string, limit int64) *connectProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{t: t, ln: ln, mode: mode, limit: limit, closed: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *connectProxy) url() *url.URL { return &url.URL{Scheme: "http", Host: p.ln.Addr().String()} }

func (p *connectProxy) close() {
	close(p.closed)
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *connectProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

func (p *connectProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.track(c)
		p.wg.Add(1)
		go p.serve(c)
	}
}

func (p *connectProxy) serve(down net.Conn) {
	defer p.wg.Done()
	defer down.Close()
	br := bufio.NewReader(down)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		return
	}
	if p.mode == "refuse" {
		io.WriteString(down, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
		return
	}
	up, err := net.Dial("tcp", req.Host)
	if err != nil {
		io.WriteString(down, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
		return
	}
	p.track(up)
	defer up.Close()
	io.WriteString(down, "HTTP/1.1 200 Connection established\r\n\r\n")
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		io.Copy(down, up)
		down.Close()
	}()
	var src io.Reader = br
	if p.mode == "cut" || p.mode == "stall" {
		src = io.LimitReader(br, p.limit)
	}
	io.Copy(up, src)
	if p.mode == "stall" {
		<-p.closed // hold the tunnel open, forwarding nothing more
	}
}

// finding returns the findings of check.
func findings(fs []Finding, check string) []Finding {
	var out []Finding
	for _, f := range fs {
		if f.Check == check {
			out = append(out, f)
		}
	}
	return out
}

// want checks that fs has a finding of check with severity sev whose
// sentence contains each of words.
func want(t *testing.T, fs []Finding, check string, sev Severity, words ...string) Finding {
	t.Helper()
	for _, f := range findings(fs, check) {
		if f.Severity != sev {
			continue
		}
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(f.Sentence(), w)
		}
		if ok {
			if sev != OK && f.Fix == "" {
				t.Errorf("%s finding without a fix: %s", check, f.Sentence())
			}
			return f
		}
	}
	t.Fatalf("no %s %s finding with %q among:\n%s", sev, check, words, dump(fs))
	return Finding{}
}

// none checks that fs has no finding of check with severity sev.
func none(t *testing.T, fs []Finding, check string, sev Severity) {
	t.Helper()
	for _, f := range findings(fs, check) {
		if f.Severity == sev {
			t.Fatalf("unexpected %s %s finding: %s\nall:\n%s", sev, check, f.Sentence(), dump(fs))
		}
	}
}

func dump(fs []Finding) string {
	var b strings.Builder
	for _, f := range fs {
		b.WriteString("  " + string(f.Severity) + " " + f.Check + ": " + f.Sentence() + "\n")
	}
	return b.String()
}
