package blockdev_test

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"path"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/blockdev"
)

const repErrTLSReqd = 1<<31 | 5

// testCA makes certificates for the TLS tests: a CA, and leaves it signs.
type testCA struct {
	t    testing.TB
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{t: t, cert: cert, key: key, pool: pool}
}

// leaf issues a certificate named cn for usage.
func (ca *testCA) leaf(cn string, usage x509.ExtKeyUsage) tls.Certificate {
	ca.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		ca.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		DNSNames: []string{cn}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		ca.t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (ca *testCA) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{ca.leaf("server", x509.ExtKeyUsageServerAuth)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.pool,
	}
}

// clientConfig presents cert (none if nil) and trusts the server's CA ca.
func (ca *testCA) clientConfig(cert *tls.Certificate) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.pool, ServerName: "server"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return cfg
}

// rules is a test Authorize: client name -> export pattern -> access.
type rules struct {
	mu sync.Mutex
	m  map[string]map[string]blockdev.NBDAccess
}

func (r *rules) set(client, pattern string, acc blockdev.NBDAccess) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m[client] == nil {
		r.m[client] = map[string]blockdev.NBDAccess{}
	}
	r.m[client][pattern] = acc
}

func (r *rules) authorize(cert *x509.Certificate, export string) blockdev.NBDAccess {
	if cert == nil {
		return blockdev.NBDDeny
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	best := blockdev.NBDDeny
	for p, acc := range r.m[cert.Subject.CommonName] {
		if ok, _ := path.Match(p, export); ok {
			best = max(best, acc)
		}
	}
	return best
}

// startTLS asks for TLS and, after the ACK, runs the client's side of the
// TLS handshake; it returns the handshake's error.
func (c *rawClient) startTLS(cfg *tls.Config) error {
	c.t.Helper()
	c.opt(optStartTLS, nil)
	if typ, msg := c.optReply(optStartTLS); typ != repAck {
		c.t.Fatalf("STARTTLS: reply %#x %q, want ACK", typ, msg)
	}
	tc := tls.Client(c.c, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	// TLS 1.3 tells the client of a refused certificate only at its first
	// read: a LIST is that read.
	c.c, c.br = tc, bufio.NewReader(tc)
	return nil
}

// list sends NBD_OPT_LIST and returns the names, or the error reply.
func (c *rawClient) list() ([]string, uint32) {
	c.t.Helper()
	c.opt(optList, nil)
	var names []string
	for {
		typ, d := c.optReply(optList)
		switch typ {
		case repAck:
			return names, 0
		case repServer:
			n := int(d[0])<<24 | int(d[1])<<16 | int(d[2])<<8 | int(d[3])
			names = append(names, string(d[4:4+n]))
		default:
			return names, typ
		}
	}
}

func tlsFixture(t *testing.T) (*fixture, *testCA, *rules) {
	ca := newTestCA(t, "test CA")
	r := &rules{m: map[string]map[string]blockdev.NBDAccess{}}
	f := newFixture(t, blockdev.NBDConfig{TLS: ca.serverConfig(), Authorize: r.authorize},
		exportSpec{name: "vm1/disk0", size: 1 << 20},
		exportSpec{name: "vm1/disk1", size: 1 << 20},
		exportSpec{name: "vm2/disk0", size: 1 << 20},
	)
	return f, ca, r
}

// TestNBDForcedTLS checks the spec's FORCEDTLS rules on a TLS-only listener.
func TestNBDForcedTLS(t *testing.T) {
	f, ca, r := tlsFixture(t)
	r.set("alice", "vm1/*", blockdev.NBDReadWrite)
	alice := ca.leaf("alice", x509.ExtKeyUsageClientAuth)

	t.Run("options before STARTTLS", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		for _, tt := range []struct {
			name string
			opt  uint32
			data []byte
		}{
			{"list", optList, nil},
			{"info", optInfo, infoData("vm1/disk0")},
			{"go", optGo, infoData("vm1/disk0")},
			{"go unknown", optGo, infoData("nope/nope")},
			{"structured reply", optStructured, nil},
			{"list meta context", 9, nil},
			{"unknown option", 4242, []byte("x")},
			{"huge unknown option", 4243, make([]byte, 1<<20)},
		} {
			c.opt(tt.opt, tt.data)
			if typ, _ := c.optReply(tt.opt); typ != repErrTLSReqd {
				t.Errorf("%s before TLS: reply %#x, want NBD_REP_ERR_TLS_REQD", tt.name, typ)
			}
		}
		c.opt(optStartTLS, []byte{1})
		if typ, _ := c.optReply(optStartTLS); typ != repErrInvalid {
			t.Errorf("STARTTLS with data: reply %#x, want NBD_REP_ERR_INVALID", typ)
		}
		// Negotiation goes on: TLS, then the export.
		if err := c.startTLS(ca.clientConfig(&alice)); err != nil {
			t.Fatal(err)
		}
		if _, errTyp := c.info(optGo, "vm1/disk0"); errTyp != 0 {
			t.Fatalf("GO over TLS: error %#x", errTyp)
		}
		c.mustDo(cmdWrite, 0, 0, 4, []byte("tls!"))
		if got := f.fileBytes("vm1/disk0", 0, 4); string(got) != "tls!" {
			t.Fatalf("image holds %q", got)
		}
	})

	t.Run("export name before STARTTLS", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optExportName, []byte("vm1/disk0"))
		c.expectClosed()
	})

	t.Run("abort before STARTTLS", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optAbort, nil)
		if typ, _ := c.optReply(optAbort); typ != repAck {
			t.Fatalf("ABORT: reply %#x, want ACK", typ)
		}
		c.expectClosed()
	})

	t.Run("STARTTLS twice", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		if err := c.startTLS(ca.clientConfig(&alice)); err != nil {
			t.Fatal(err)
		}
		c.opt(optStartTLS, nil)
		if typ, _ := c.optReply(optStartTLS); typ != repErrInvalid {
			t.Fatalf("second STARTTLS: reply %#x, want NBD_REP_ERR_INVALID", typ)
		}
	})

	t.Run("no client certificate", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		err := c.startTLS(ca.clientConfig(nil))
		if err == nil {
			_, err = c.br.Peek(1) // TLS 1.3: the refusal comes with the first read
		}
		if err == nil {
			t.Fatal("TLS without a client certificate was accepted")
		}
	})

	t.Run("certificate from another CA", func(t *testing.T) {
		other := newTestCA(t, "other CA")
		mallory := other.leaf("alice", x509.ExtKeyUsageClientAuth) // the right name, the wrong CA
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		err := c.startTLS(ca.clientConfig(&mallory))
		if err == nil {
			_, err = c.br.Peek(1)
		}
		var alert tls.AlertError
		if err == nil || !errors.As(err, &alert) && !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("certificate from another CA: %v, want a TLS alert", err)
		}
	})

	t.Run("plain listener refuses STARTTLS", func(t *testing.T) {
		plain := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "a", size: 4096})
		c := dial(t, plain.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optStartTLS, nil)
		if typ, _ := c.optReply(optStartTLS); typ != repErrPolicy {
			t.Fatalf("STARTTLS on a plain listener: reply %#x, want NBD_REP_ERR_POLICY", typ)
		}
	})

	t.Run("ServeTLS without a TLS config", func(t *testing.T) {
		s := blockdev.NewNBDServer(blockdev.NBDConfig{})
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.ServeTLS(t.Context(), l); !errors.Is(err, blockdev.ErrNBDNoTLS) {
			t.Fatalf("ServeTLS without TLS: %v", err)
		}
	})
}

// TestNBDTLSAccess checks per-export access over TLS: what a client may
// not open is neither listed nor distinguishable from a missing export.
func TestNBDTLSAccess(t *testing.T) {
	f, ca, r := tlsFixture(t)
	r.set("alice", "vm1/*", blockdev.NBDReadWrite)
	r.set("bob", "vm2/disk0", blockdev.NBDReadOnly)
	r.set("bob", "vm9/*", blockdev.NBDReadWrite)
	alice := ca.leaf("alice", x509.ExtKeyUsageClientAuth)
	bob := ca.leaf("bob", x509.ExtKeyUsageClientAuth)
	carol := ca.leaf("carol", x509.ExtKeyUsageClientAuth) // no rule at all

	connect := func(t *testing.T, cert *tls.Certificate) *rawClient {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		if err := c.startTLS(ca.clientConfig(cert)); err != nil {
			t.Fatal(err)
		}
		return c
	}

	t.Run("list", func(t *testing.T) {
		for _, tt := range []struct {
			who  string
			cert *tls.Certificate
			want []string
		}{
			{"alice", &alice, []string{"vm1/disk0", "vm1/disk1"}},
			{"bob", &bob, []string{"vm2/disk0"}},
			{"carol", &carol, nil},
		} {
			c := connect(t, tt.cert)
			names, errTyp := c.list()
			if errTyp != 0 || !slices.Equal(names, tt.want) {
				t.Errorf("%s: LIST = %q (error %#x), want %q", tt.who, names, errTyp, tt.want)
			}
		}
	})

	t.Run("refused exports look alike", func(t *testing.T) {
		c := connect(t, &carol)
		for _, name := range []string{"vm1/disk0", "vm2/disk0", "no/such", ""} {
			for _, opt := range []uint32{optInfo, optGo} {
				if _, typ := c.info(opt, name); typ != repErrPolicy {
					t.Errorf("carol %d %q: reply %#x, want NBD_REP_ERR_POLICY", opt, name, typ)
				}
			}
		}
		c = connect(t, &bob)
		if _, typ := c.info(optGo, "vm1/disk0"); typ != repErrPolicy {
			t.Errorf("bob GO vm1/disk0: reply %#x, want NBD_REP_ERR_POLICY", typ)
		}
		// An allowed name that does not exist is simply unknown.
		if _, typ := c.info(optGo, "vm9/disk0"); typ != repErrUnknown {
			t.Errorf("bob GO vm9/disk0: reply %#x, want NBD_REP_ERR_UNKNOWN", typ)
		}
		// Export name: refused by hanging up, as for a missing export.
		c = connect(t, &bob)
		c.opt(optExportName, []byte("vm1/disk0"))
		c.expectClosed()
	})

	t.Run("default export is the only one visible", func(t *testing.T) {
		c := connect(t, &bob)
		e, typ := c.info(optGo, "", infoName)
		if typ != 0 || e.name != "vm2/disk0" {
			t.Fatalf("bob GO default = %+v (error %#x), want vm2/disk0", e, typ)
		}
	})

	t.Run("read-only entry", func(t *testing.T) {
		c := connect(t, &bob)
		e, typ := c.info(optGo, "vm2/disk0")
		if typ != 0 || e.flags&flagReadOnly == 0 {
			t.Fatalf("bob GO vm2/disk0 = %+v (error %#x), want read-only", e, typ)
		}
		c.mustDo(cmdRead, 0, 0, 512, nil)
		c.expectError("write on a read-only entry", errEPERM, cmdWrite, 0, 0, 4, []byte("nope"))
		if got := f.fileBytes("vm2/disk0", 0, 4); string(got) != "\x00\x00\x00\x00" {
			t.Fatalf("image holds %q after a refused write", got)
		}
	})

	t.Run("reauthorize ends revoked connections", func(t *testing.T) {
		c := connect(t, &alice)
		if _, typ := c.info(optGo, "vm1/disk1"); typ != 0 {
			t.Fatalf("GO: %#x", typ)
		}
		c.mustDo(cmdWrite, 0, 0, 4, []byte("keep"))
		if n := f.srv.Reauthorize(); n != 0 {
			t.Fatalf("Reauthorize with unchanged rules ended %d connections", n)
		}
		r.set("alice", "vm1/*", blockdev.NBDReadOnly)
		if n := f.srv.Reauthorize(); n != 1 {
			t.Fatalf("Reauthorize after a write access was taken ended %d connections, want 1", n)
		}
		c.expectClosed()
		cl := f.srv.Clients()
		if len(cl) != 0 {
			t.Fatalf("clients after revoke: %+v", cl)
		}
	})
}

// benchTLS is a server and client TLS configuration pair for the TLS
// benchmarks.
func benchTLS(b *testing.B) *[2]*tls.Config {
	ca := newTestCA(b, "bench CA")
	cert := ca.leaf("bench", x509.ExtKeyUsageClientAuth)
	return &[2]*tls.Config{ca.serverConfig(), ca.clientConfig(&cert)}
}

func BenchmarkNBDTLSRandWrite4KQD16(b *testing.B) {
	benchPipelineOn(b, cmdWrite, 4096, 16, benchTLS(b))
}

func BenchmarkNBDTLSSeqWrite1MQD4(b *testing.B) {
	benchPipelineOn(b, cmdWrite, 1<<20, 4, benchTLS(b))
}
