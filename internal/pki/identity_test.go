package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// handMade issues dir/name.{crt,key} from the CA in dir like Issue does, but
// with edit applied to the template, to make certificates Issue would not.
func handMade(t *testing.T, dir, name string, edit func(*x509.Certificate)) Files {
	t.Helper()
	ca, caKey, err := loadCA(vfs.Default, dir)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name},
		DNSNames:    []string{name},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	edit(tmpl)
	files := Files{Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"), CA: filepath.Join(dir, "ca.crt")}
	if err := create(vfs.Default, files, tmpl, ca, key, caKey); err != nil {
		t.Fatal(err)
	}
	return files
}

// fixture is three CAs: a, b, and c, another CA named like a, each with
// host certificates.
type fixture struct{ a, b, c string }

func newFixture(t *testing.T) fixture {
	t.Helper()
	root := t.TempDir()
	f := fixture{filepath.Join(root, "a"), filepath.Join(root, "b"), filepath.Join(root, "c")}
	day := 24 * time.Hour
	mustInit(t, f.a, InitOptions{Name: "a"})
	mustIssue(t, f.a, "server1", IssueOptions{SANs: []string{"127.0.0.1"}})
	mustIssue(t, f.a, "client1", IssueOptions{})
	mustIssue(t, f.a, "expired", IssueOptions{Now: func() time.Time { return time.Now().Add(-1000 * day) }})
	mustIssue(t, f.a, "future", IssueOptions{Now: func() time.Time { return time.Now().Add(day) }})
	handMade(t, f.a, "serveronly", func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} })
	handMade(t, f.a, "clientonly", func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} })
	mustInit(t, f.b, InitOptions{Name: "b"})
	mustIssue(t, f.b, "client1", IssueOptions{})
	mustInit(t, f.c, InitOptions{Name: "a"})
	mustIssue(t, f.c, "client1", IssueOptions{})
	return f
}

func (f fixture) load(t *testing.T, dir, name string) *Identity {
	t.Helper()
	id, err := Load(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// keyPair loads a certificate without Load's checks, to present it anyway.
func keyPair(t *testing.T, dir, name string) *tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return &c
}

func TestLoadErrors(t *testing.T) {
	f := newFixture(t)
	old := filepath.Join(t.TempDir(), "old")
	mustInit(t, old, InitOptions{Name: "old", Validity: 40 * 24 * time.Hour, Now: func() time.Time { return time.Now().Add(-50 * 24 * time.Hour) }})
	handMade(t, old, "host", func(*x509.Certificate) {})

	p := filepath.Join
	for _, tc := range []struct {
		name          string
		cert, key, ca string
		want          error
		text          string
	}{
		{"missing cert", p(f.a, "nope.crt"), p(f.a, "client1.key"), p(f.a, "ca.crt"), ErrNotFound, "vdrepl pki issue"},
		{"missing key", p(f.a, "client1.crt"), p(f.a, "nope.key"), p(f.a, "ca.crt"), ErrNotFound, "nope.key"},
		{"missing CA", p(f.a, "client1.crt"), p(f.a, "client1.key"), p(f.a, "nope.crt"), ErrNotFound, "vdrepl pki init"},
		{"key of another cert", p(f.a, "client1.crt"), p(f.a, "server1.key"), p(f.a, "ca.crt"), ErrKeyMismatch, "server1.key does not belong to certificate " + p(f.a, "client1.crt")},
		{"other CA", p(f.b, "client1.crt"), p(f.b, "client1.key"), p(f.a, "ca.crt"), ErrUntrusted,
			"certificate " + p(f.b, "client1.crt") + " was not issued by CA " + p(f.a, "ca.crt") + ` (its issuer is "vdrepl CA b")`},
		{"CA made again", p(f.c, "client1.crt"), p(f.c, "client1.key"), p(f.a, "ca.crt"), ErrUntrusted, "made again"},
		{"no clientAuth", p(f.a, "serveronly.crt"), p(f.a, "serveronly.key"), p(f.a, "ca.crt"), ErrUsage, "lacks the clientAuth extended key usage"},
		{"no serverAuth", p(f.a, "clientonly.crt"), p(f.a, "clientonly.key"), p(f.a, "ca.crt"), ErrUsage, "lacks the serverAuth extended key usage"},
		{"expired", p(f.a, "expired.crt"), p(f.a, "expired.key"), p(f.a, "ca.crt"), ErrExpired, "certificate " + p(f.a, "expired.crt") + " expired on"},
		{"not yet valid", p(f.a, "future.crt"), p(f.a, "future.key"), p(f.a, "ca.crt"), ErrExpired, "not valid until"},
		{"CA expired", p(old, "host.crt"), p(old, "host.key"), p(old, "ca.crt"), ErrExpired, "CA " + p(old, "ca.crt") + " expired on"},
		{"CA not a CA", p(f.a, "client1.crt"), p(f.a, "client1.key"), p(f.a, "server1.crt"), ErrInvalid, "not a CA certificate"},
		{"key given as cert", p(f.a, "client1.key"), p(f.a, "client1.key"), p(f.a, "ca.crt"), ErrInvalid, "no CERTIFICATE in it, only PRIVATE KEY"},
		{"cert given as key", p(f.a, "client1.crt"), p(f.a, "client1.crt"), p(f.a, "ca.crt"), ErrInvalid, "no PRIVATE KEY in it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(tc.cert, tc.key, tc.ca)
			wantIs(t, err, tc.want)
			if !strings.Contains(err.Error(), tc.text) || !strings.HasPrefix(err.Error(), "pki: ") {
				t.Fatalf("error %q does not say %q", err, tc.text)
			}
		})
	}
}

// handshake connects a client using cc to a server using sc over loopback
// TCP, and the server sends one byte. It returns each side's error and the
// name each side sees for its peer.
func handshake(t *testing.T, sc, cc *tls.Config) (serverErr, clientErr error, serverSees, clientSees string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		err  error
		peer string
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, sc)
		var r result
		if r.err = tc.Handshake(); r.err == nil {
			cs := tc.ConnectionState()
			r.peer = PeerName(&cs)
			_, r.err = tc.Write([]byte{1})
		}
		// Wait for the client to close, so that it reads our alert, not a
		// reset caused by closing with its data unread.
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		done <- r
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, cc)
	// In TLS 1.3 the client finishes its handshake before the server has
	// checked the client's certificate: the server's verdict comes with
	// the first read.
	if clientErr = tc.Handshake(); clientErr == nil {
		cs := tc.ConnectionState()
		clientSees = PeerName(&cs)
		_, clientErr = io.ReadFull(tc, make([]byte, 1))
	}
	c.Close()
	r := <-done
	return r.err, clientErr, r.peer, clientSees
}

func TestHandshake(t *testing.T) {
	f := newFixture(t)
	server := f.load(t, f.a, "server1")
	client := f.load(t, f.a, "client1")
	other := f.load(t, f.b, "client1")
	// presenting makes a client config of client1 that presents cert.
	presenting := func(cert *tls.Certificate) *tls.Config {
		cc := client.ClientConfig("server1")
		cc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		return cc
	}
	otherCA := other.ClientConfig("server1")
	otherCA.RootCAs = client.pool // trusts the server, but is from CA b

	t.Run("good", func(t *testing.T) {
		for _, name := range []string{"server1", "127.0.0.1"} {
			serr, cerr, serverSees, clientSees := handshake(t, server.ServerConfig(), client.ClientConfig(name))
			if serr != nil || cerr != nil {
				t.Fatalf("server: %v, client: %v", serr, cerr)
			}
			if serverSees != "client1" || clientSees != "server1" {
				t.Fatalf("server sees %q, client sees %q", serverSees, clientSees)
			}
		}
	})
	for _, tc := range []struct {
		name      string
		cc        *tls.Config
		serverErr error  // of server.Explain; nil: the client refuses
		text      string // in the explained error of the refusing side
		clientErr error  // of client.Explain, when the server refuses
	}{
		{"client from other CA", otherCA, ErrUntrusted, `peer certificate "client1" was not issued by our CA "vdrepl CA a" (its issuer is "vdrepl CA b")`, ErrRefused},
		{"client without clientAuth", presenting(keyPair(t, f.a, "serveronly")), ErrUsage, `peer certificate "serveronly" lacks the clientAuth`, ErrRefused},
		{"client expired", presenting(keyPair(t, f.a, "expired")), ErrExpired, `peer certificate "expired" expired on`, ErrRefused},
		{"server name mismatch", client.ClientConfig("server2"), nil, `peer certificate "server1" is for server1, 127.0.0.1, not "server2"`, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			serr, cerr, serverSees, _ := handshake(t, server.ServerConfig(), tc.cc)
			if serr == nil || cerr == nil {
				t.Fatalf("server: %v, client: %v; want both to fail", serr, cerr)
			}
			if serverSees != "" {
				t.Fatalf("server sees peer %q", serverSees)
			}
			refusal := client.Explain(cerr)
			if tc.serverErr != nil {
				refusal = server.Explain(serr)
				wantIs(t, refusal, tc.serverErr)
				var verr *tls.CertificateVerificationError
				if !errors.As(refusal, &verr) {
					t.Fatalf("explained error %v does not wrap the TLS error", refusal)
				}
				wantIs(t, client.Explain(cerr), tc.clientErr)
			} else {
				wantIs(t, refusal, ErrUntrusted)
			}
			if !strings.Contains(refusal.Error(), tc.text) {
				t.Fatalf("error %q does not say %q", refusal, tc.text)
			}
			t.Log(refusal)
		})
	}
	t.Run("other errors unchanged", func(t *testing.T) {
		if err := io.EOF; client.Explain(err) != err {
			t.Fatal("Explain changed io.EOF")
		}
	})
}

func TestPeerNameUnverified(t *testing.T) {
	f := newFixture(t)
	cert := keyPair(t, f.a, "client1")
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range []*tls.ConnectionState{nil, {}, {PeerCertificates: []*x509.Certificate{leaf}}} {
		if name := PeerName(cs); name != "" {
			t.Fatalf("PeerName of an unverified peer: %q", name)
		}
	}
	if name := PeerName(&tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}}); name != "client1" {
		t.Fatalf("PeerName %q", name)
	}
}
