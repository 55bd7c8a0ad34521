// Package tlscost measures what encryption costs vdrepl's replication, in
// two benchmarks. Take the machine's benchmark lock around every run (other
// benchmarks share the machine), e.g.:
//
//	flock /tmp/vdrepl-bench.lock go test -run '^$' -bench Replicate -benchtime 10x -v -timeout 30m ./bench/tlscost
//	flock /tmp/vdrepl-bench.lock go test -run '^$' -bench 'Put|AESGCM' -benchtime 3s ./bench/tlscost
//
// The first runs 10 rounds of each of its two cases, raw and zstd (about
// 6 minutes, up to 8 GiB under /var/tmp at a time); `go test -run X -bench .
// ./bench/tlscost` runs everything, BenchmarkReplicate for one round of
// each case (about a minute). The tests (TestHandshake, TestReplicate)
// take seconds.
//
// BenchmarkReplicate (replicate_test.go) is replication itself: the real
// shipper (package ship) ships closed cycles of a real journal (package
// journal, on a real disk under /var/tmp) to the real replica server
// (package apply: staging, verification, commit and apply to a replica
// image on disk), once over mutual TLS and once over plain HTTP on
// loopback, and reports throughput and the process's CPU time per GiB of
// each, and the difference. Only it says what TLS costs replication.
//
// BenchmarkPut is the transport alone: an HTTP PUT of one wire.MaxChunk
// chunk (8 MiB) over loopback, plain HTTP against HTTPS with the TLS 1.3
// mutual-authentication configuration vdrepl uses (ECDSA P-256 certificates
// made by internal/pki, pki.Identity.ServerConfig and ClientConfig).
// bench/repl.sh runs it and puts the two rates and their ratio in its table.
// Both sides mirror the daemon's: the replica's http.Server serves a
// tls.NewListener (HTTP/1.1, as in daemon.serveReplica), the primary's
// http.Transport has its own TLS config and dialer (so HTTP/1.1 too, as in
// ship.newClient) and keeps one connection alive across chunks, as ship does
// while it uploads a stream. The handler reads the body and answers a small
// JSON document, like apply's chunk PUT; it does not stage anything, so disk
// speed stays out of the figure. The chunk is random bytes: compression is
// not in the path either. On loopback a plain PUT is little more than a
// memory copy, so this figure is an upper bound of TLS's share, far above
// what it costs replication.
package tlscost

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// identities makes a CA and two host certificates with internal/pki, as
// `vdrepl pki init` and `vdrepl pki issue` do, and loads them.
func identities(tb testing.TB) (primary, replica *pki.Identity) {
	primary, replica, _ = identitiesCA(tb)
	return primary, replica
}

// identitiesCA is identities and the CA certificate.
func identitiesCA(tb testing.TB) (primary, replica *pki.Identity, ca *x509.Certificate) {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "pki")
	files, err := pki.Init(dir, pki.InitOptions{Name: "bench"})
	if err != nil {
		tb.Fatal(err)
	}
	caPEM, err := os.ReadFile(files.CA)
	if err != nil {
		tb.Fatal(err)
	}
	blk, _ := pem.Decode(caPEM)
	if blk == nil {
		tb.Fatalf("%s: no PEM block", files.CA)
	}
	if ca, err = x509.ParseCertificate(blk.Bytes); err != nil {
		tb.Fatal(err)
	}
	load := func(name string, sans ...string) *pki.Identity {
		f, err := pki.Issue(dir, name, pki.IssueOptions{SANs: sans})
		if err != nil {
			tb.Fatal(err)
		}
		id, err := pki.Load(f.Cert, f.Key, f.CA)
		if err != nil {
			tb.Fatal(err)
		}
		return id
	}
	return load("primary.bench"), load("replica.bench", "127.0.0.1"), ca
}

// server is a loopback HTTP server whose handler drains the body and
// answers with the byte count, as apply answers a chunk with an Upload.
func server(tb testing.TB, conf *tls.Config) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, err := io.Copy(io.Discard, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"staged":`+strconv.FormatInt(n, 10)+`}`)
		}),
		ReadHeaderTimeout: 30 * time.Second,
	}
	scheme := "http"
	if conf != nil {
		scheme = "https"
		l = tls.NewListener(l, conf)
	}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	return scheme + "://" + l.Addr().String() + "/v1/replicas/bench/uploads/c1"
}

// client is an HTTP/1.1 client with one kept-alive connection, built like
// ship's (its own dialer and TLS config, no HTTP/2, net/http's 4 KiB
// buffers). buf other than 0 sets the buffers; h2 asks for HTTP/2.
func client(conf *tls.Config, buf int, h2 bool) *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:     conf,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout: 30 * time.Second,
		MaxIdleConnsPerHost: 2,
		WriteBufferSize:     buf,
		ReadBufferSize:      buf,
		ForceAttemptHTTP2:   h2,
	}}
}

// put sends one chunk, checks the answer and returns the HTTP version.
func put(tb testing.TB, c *http.Client, url string, chunk []byte) int {
	req, err := http.NewRequest(http.MethodPut, url+"?offset=0", bytes.NewReader(chunk))
	if err != nil {
		tb.Fatal(err)
	}
	req.ContentLength = int64(len(chunk))
	resp, err := c.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		tb.Fatal(err)
	}
	if want := `{"staged":` + strconv.Itoa(len(chunk)) + `}`; resp.StatusCode != http.StatusOK || string(b) != want {
		tb.Fatalf("PUT: HTTP %d %q, want 200 %q", resp.StatusCode, b, want)
	}
	return resp.ProtoMajor
}

// BenchmarkPut reports MB/s of 8 MiB chunk PUTs over loopback: "plain" is
// HTTP, "tls" is HTTPS with vdrepl's mutual TLS 1.3 configuration. The
// handshake happens once, before the timer starts, as it does once per
// connection in ship. The other cases answer what else might change the
// cost: "plain_64k" and "tls_64k" use 64 KiB transport buffers instead of
// net/http's 4 KiB (so TLS records of 16 KiB rather than 4 KiB), "tls_h2"
// is HTTP/2 over the same TLS.
func BenchmarkPut(b *testing.B) {
	chunk := make([]byte, wire.MaxChunk)
	rand.Read(chunk)
	primary, replica := identities(b)
	h2srv := replica.ServerConfig()
	h2srv.NextProtos = append([]string{"h2"}, h2srv.NextProtos...)
	for _, tc := range []struct {
		name     string
		srv, cli *tls.Config
		buf      int
		h2       bool
	}{
		{name: "plain"},
		{name: "tls", srv: replica.ServerConfig(), cli: primary.ClientConfig("127.0.0.1")},
		{name: "plain_64k", buf: 64 << 10},
		{name: "tls_64k", srv: replica.ServerConfig(), cli: primary.ClientConfig("127.0.0.1"), buf: 64 << 10},
		{name: "tls_h2", srv: h2srv, cli: primary.ClientConfig("127.0.0.1"), h2: true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			url := server(b, tc.srv)
			c := client(tc.cli, tc.buf, tc.h2)
			defer c.CloseIdleConnections()
			if proto := put(b, c, url, chunk); tc.h2 != (proto == 2) {
				b.Fatalf("HTTP/%d, want HTTP/2 %v", proto, tc.h2)
			}
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for b.Loop() {
				put(b, c, url, chunk)
			}
		})
	}
}

// BenchmarkAESGCM is the CPU ceiling of TLS's encryption here: AES-128-GCM
// sealing and opening 16 KiB records (TLS's largest) on one core, what
// each 8 MiB chunk costs the primary and the replica over plain HTTP.
func BenchmarkAESGCM(b *testing.B) {
	block, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		b.Fatal(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	nonce := make([]byte, gcm.NonceSize())
	record := make([]byte, 16<<10)
	rand.Read(record)
	sealed := gcm.Seal(nil, nonce, record, nil)
	out := make([]byte, 0, len(sealed))
	b.Run("seal", func(b *testing.B) {
		b.SetBytes(int64(len(record)))
		for b.Loop() {
			gcm.Seal(out[:0], nonce, record, nil)
		}
	})
	b.Run("open", func(b *testing.B) {
		b.SetBytes(int64(len(record)))
		for b.Loop() {
			if _, err := gcm.Open(out[:0], nonce, sealed, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestHandshake checks that the "tls" case really negotiates TLS 1.3 with
// both certificates, so the benchmark measures what vdrepl runs.
func TestHandshake(t *testing.T) {
	primary, replica := identities(t)
	l, err := tls.Listen("tcp", "127.0.0.1:0", replica.ServerConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan tls.ConnectionState, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(done)
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if tc.Handshake() != nil {
			close(done)
			return
		}
		done <- tc.ConnectionState()
	}()
	c, err := tls.Dial("tcp", l.Addr().String(), primary.ClientConfig("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cs := c.ConnectionState()
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want TLS 1.3", cs.Version)
	}
	t.Logf("cipher suite %s, curve %v", tls.CipherSuiteName(cs.CipherSuite), cs.CurveID)
	ss, ok := <-done
	if !ok {
		t.Fatal("server handshake failed")
	}
	if name := pki.PeerName(&ss); name != "primary.bench" {
		t.Errorf("server sees client %q, want primary.bench", name)
	}
	if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].PublicKeyAlgorithm.String() != "ECDSA" {
		t.Errorf("server certificate is not ECDSA")
	}
}
