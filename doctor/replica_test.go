package doctor

import (
	"context"
	"crypto/x509"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// check runs ReplicaPath with short timeouts.
func check(t *testing.T, rc ReplicaCheck) []Finding {
	t.Helper()
	if rc.Timeout == 0 {
		rc.Timeout = 5 * time.Second
	}
	if rc.UploadTimeout == 0 {
		rc.UploadTimeout = 30 * time.Second
	}
	fs := ReplicaPath(context.Background(), rc)
	t.Logf("findings:\n%s", dump(fs))
	return fs
}

func TestIdentity(t *testing.T) {
	ca := newCA(t, "one")
	good := issue(t, ca, "primary.test")
	id, fs := LoadIdentity(good, time.Now())
	if id == nil || id.Name() != "primary.test" {
		t.Fatalf("identity %+v", id)
	}
	want(t, fs, CheckIdentity, OK, "primary.test", "valid until")

	_, fs = LoadIdentity(TLSFiles{}, time.Now())
	want(t, fs, CheckIdentity, Problem, "no TLS certificate", "--tls-cert")
	_, fs = LoadIdentity(TLSFiles{Cert: good.Cert}, time.Now())
	want(t, fs, CheckIdentity, Problem, "only some")
	_, fs = LoadIdentity(TLSFiles{Cert: good.Cert, Key: filepath.Join(ca, "none.key"), CA: good.CA}, time.Now())
	want(t, fs, CheckIdentity, Problem, "no such file", "`vdrepl pki issue`")
	other := issue(t, ca, "other.test")
	_, fs = LoadIdentity(TLSFiles{Cert: good.Cert, Key: other.Key, CA: good.CA}, time.Now())
	want(t, fs, CheckIdentity, Problem, "does not match", "the key issued with")
	_, fs = LoadIdentity(TLSFiles{Cert: good.Cert, Key: good.Key, CA: good.Cert}, time.Now())
	want(t, fs, CheckIdentity, Problem, "not a CA certificate")

	// Certificates pki would not issue: still loaded, every fault named.
	bad := issueBad(t, ca, "bad.test", func(c *x509.Certificate) {
		c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		c.NotAfter = time.Now().Add(-time.Hour)
	})
	id, fs = LoadIdentity(bad, time.Now())
	if id == nil {
		t.Fatal("a certificate lacking clientAuth gave no identity")
	}
	want(t, fs, CheckIdentity, Problem, "lacks the clientAuth", "`vdrepl pki issue --name bad.test`")
	want(t, fs, CheckIdentity, Problem, "expired on")
	soon := issueBad(t, ca, "soon.test", func(c *x509.Certificate) { c.NotAfter = time.Now().Add(10 * 24 * time.Hour) })
	_, fs = LoadIdentity(soon, time.Now())
	want(t, fs, CheckIdentity, Warning, "expires in 9 days")
	none(t, fs, CheckIdentity, Problem)
	// Another CA of the same name: made again with `vdrepl pki init`.
	again := newCA(t, "one")
	_, fs = LoadIdentity(TLSFiles{Cert: good.Cert, Key: good.Key, CA: filepath.Join(again, "ca.crt")}, time.Now())
	want(t, fs, CheckIdentity, Problem, "only has the same name", "made again")
}

// The replica's certificate as this host checks it: each fault its own
// finding, with the fix.
func TestReplicaCertificate(t *testing.T) {
	ca := newCA(t, "one")
	prim := identity(t, issue(t, ca, "primary.test"))
	otherCA := newCA(t, "two")
	for _, tc := range []struct {
		name  string
		files func() TLSFiles
		sev   Severity
		words []string
	}{
		{"good", func() TLSFiles { return issue(t, ca, "replica.test") }, OK, []string{"valid for \"127.0.0.1\""}},
		{"other CA", func() TLSFiles { return issue(t, otherCA, "replica.test") }, Problem, []string{`issued by "vdrepl CA two"`, `not by this host's CA "vdrepl CA one"`, "one CA"}},
		{"no serverAuth", func() TLSFiles {
			return issueBad(t, ca, "noserver.test", func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} })
		}, Problem, []string{"lacks the serverAuth", "vdrepl pki issue --name noserver.test"}},
		{"expired", func() TLSFiles {
			return issueBad(t, ca, "expired.test", func(c *x509.Certificate) {
				c.NotBefore, c.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)
			})
		}, Problem, []string{"expired on"}},
		{"expiring", func() TLSFiles {
			return issueBad(t, ca, "soon.test", func(c *x509.Certificate) { c.NotAfter = time.Now().Add(20 * 24 * time.Hour) })
		}, Warning, []string{"expires in 19 days"}},
		{"wrong name", func() TLSFiles {
			return issueBad(t, ca, "named.test", func(c *x509.Certificate) { c.IPAddresses = nil })
		}, Problem, []string{`is for named.test, not "127.0.0.1"`, "vdrepl pki issue --name named.test --san 127.0.0.1`"}},
		{"no SAN", func() TLSFiles {
			return issueBad(t, ca, "cn-only.test", func(c *x509.Certificate) { c.IPAddresses, c.DNSNames = nil, nil })
		}, Problem, []string{"no name at all", `common name "cn-only.test"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := tc.files()
			rep := newReplica(t, files, filepath.Join(ca, "ca.crt"), "primary.test")
			fs := check(t, ReplicaCheck{Addr: rep.addr, Identity: prim})
			want(t, fs, CheckTLSServer, tc.sev, tc.words...)
			if tc.sev == Problem {
				// Nothing is uploaded to a replica that is not verified.
				if len(findings(fs, CheckUpload)) != 0 {
					t.Fatalf("uploaded to an unverified replica:\n%s", dump(fs))
				}
				return
			}
			want(t, fs, CheckTLSClient, OK)
			want(t, fs, CheckAllowList, OK, `entry "primary.test"`)
			want(t, fs, CheckUpload, OK, "8.0 MiB")
			want(t, fs, CheckClock, OK)
		})
	}
}

// This host's certificate as the replica takes it.
func TestReplicaRefusesUs(t *testing.T) {
	ca := newCA(t, "one")
	repFiles := issue(t, ca, "replica.test")

	// The replica trusts another CA.
	other := newCA(t, "two")
	rep := newReplica(t, repFiles, filepath.Join(other, "ca.crt"), "*")
	fs := check(t, ReplicaCheck{Addr: rep.addr, Identity: identity(t, issue(t, ca, "primary.test"))})
	want(t, fs, CheckTLSServer, OK)
	want(t, fs, CheckTLSClient, Problem, "refused this host's certificate", "another CA", "--tls-ca")
	none(t, fs, CheckAllowList, OK)

	// Our certificate lacks clientAuth.
	rep = newReplica(t, repFiles, filepath.Join(ca, "ca.crt"), "*")
	noClient := issueBad(t, ca, "noclient.test", func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} })
	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: identity(t, noClient)})
	want(t, fs, CheckTLSClient, Problem, "refused", "lacks the clientAuth usage", "vdrepl pki issue --name noclient.test")
}

func TestAllowList(t *testing.T) {
	ca := newCA(t, "one")
	repFiles := issue(t, ca, "replica.test")
	rep := newReplica(t, repFiles, filepath.Join(ca, "ca.crt"), "*.example.com")
	fs := check(t, ReplicaCheck{Addr: rep.addr, Identity: identity(t, issue(t, ca, "primary.test")), VM: "vm1"})
	want(t, fs, CheckTLSClient, OK)
	want(t, fs, CheckAllowList, Problem, `"primary.test" in`, "is not on the allow-list", "vdrepl replica allow add --primary primary.test")
	if len(findings(fs, CheckUpload)) != 0 {
		t.Fatal("uploaded although not allowed")
	}

	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: identity(t, issue(t, ca, "a.example.com")), VM: "vm1"})
	want(t, fs, CheckAllowList, OK, `entry "*.example.com"`)
	want(t, fs, CheckUpload, OK)
	want(t, fs, CheckVMReplica, Warning, "does not hold the VM")
	if got := rep.srv.AllowList(); len(got) != 1 {
		t.Fatalf("allow-list changed: %+v", got)
	}
}

// A replica whose clock is off, simulated by its Date header.
func TestClockSkew(t *testing.T) {
	ca := newCA(t, "one")
	prim := identity(t, issue(t, ca, "primary.test"))
	for _, tc := range []struct {
		skew  time.Duration
		sev   Severity
		words []string
	}{
		{0, OK, []string{"agree within 5s"}},
		{-2 * time.Second, OK, []string{"agree"}},
		{40 * time.Second, Warning, []string{"40s ahead of", "NTP"}},
		{-3 * time.Hour, Problem, []string{"3h behind", "not yet valid", "NTP"}},
	} {
		rep := newReplicaWith(t, issue(t, ca, "replica"+strings.ReplaceAll(tc.skew.String(), "-", "m")+".test"), filepath.Join(ca, "ca.crt"),
			func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					w.Header().Set("Date", time.Now().Add(tc.skew).UTC().Format(http.TimeFormat))
					h.ServeHTTP(w, r)
				})
			}, "*")
		fs := check(t, ReplicaCheck{Addr: rep.addr, Identity: prim})
		want(t, fs, CheckClock, tc.sev, tc.words...)
	}
}

// Proxies that break replication, each named with the fix.
func TestProxy(t *testing.T) {
	ca := newCA(t, "one")
	prim := identity(t, issue(t, ca, "primary.test"))
	rep := newReplica(t, issue(t, ca, "replica.test"), filepath.Join(ca, "ca.crt"), "primary.test")

	px := newConnectProxy(t, "", 0)
	fs := check(t, ReplicaCheck{Addr: rep.addr, Identity: prim, Proxy: px.url(), ProxySource: "HTTPS_PROXY"})
	want(t, fs, CheckProxy, OK, "opens a tunnel")
	want(t, fs, CheckUpload, OK, "through the proxy")

	px = newConnectProxy(t, "refuse", 0)
	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: prim, Proxy: px.url(), ProxySource: "HTTPS_PROXY"})
	want(t, fs, CheckProxy, Problem, "refuses a tunnel", "403 Forbidden", "--bypass-proxy", "reaches the replica directly")

	// Cuts a tunnel after 1 MiB: the handshake and probe pass, an upload
	// chunk does not; directly it does.
	px = newConnectProxy(t, "cut", 1<<20)
	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: prim, Proxy: px.url(), ProxySource: "HTTPS_PROXY"})
	want(t, fs, CheckAllowList, OK)
	f := want(t, fs, CheckUpload, Problem, "through the proxy", "broke off", "while directly it goes through")
	if !strings.Contains(f.Fix, "--bypass-proxy") {
		t.Fatalf("fix %q does not name --bypass-proxy", f.Fix)
	}

	// Stalls a tunnel: the upload does not finish in time.
	px = newConnectProxy(t, "stall", 1<<20)
	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: prim, Proxy: px.url(), ProxySource: "HTTPS_PROXY", UploadTimeout: time.Second})
	want(t, fs, CheckUpload, Problem, "did not get through within 1s", "--bypass-proxy")

	// A proxy nobody runs.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := &url.URL{Scheme: "http", Host: ln.Addr().String()}
	ln.Close()
	fs = check(t, ReplicaCheck{Addr: rep.addr, Identity: prim, Proxy: dead, ProxySource: "HTTPS_PROXY"})
	want(t, fs, CheckProxy, Problem, "cannot be reached", "correct HTTPS_PROXY")
}

func TestUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	fs := check(t, ReplicaCheck{Addr: addr})
	want(t, fs, CheckResolve, OK, "IPv4 address")
	want(t, fs, CheckFamily, OK, "over IPv4")
	want(t, fs, CheckTCP, Problem, "nothing listens", "--replica-listen")

	fs = check(t, ReplicaCheck{Addr: "no-such-host.invalid:8443", Timeout: 2 * time.Second})
	want(t, fs, CheckResolve, Problem, "does not resolve", "/etc/hosts")
	fs = check(t, ReplicaCheck{Addr: "replica.example.com"})
	want(t, fs, CheckReplica, Problem, "not a HOST:PORT")

	// Something that is no TLS server on the port.
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	go func() {
		for {
			c, err := plain.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n"))
			c.Close()
		}
	}()
	ca := newCA(t, "one")
	fs = check(t, ReplicaCheck{Addr: plain.Addr().String(), Identity: identity(t, issue(t, ca, "primary.test"))})
	want(t, fs, CheckTCP, OK)
	want(t, fs, CheckTLSServer, Problem, "no TLS handshake", "--replica-listen")
}
