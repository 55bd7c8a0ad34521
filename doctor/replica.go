package doctor

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/units"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// ReplicaCheck says how to check the way to one replica.
type ReplicaCheck struct {
	// Addr is the replica's HOST:PORT, as `replication enable --replica`.
	Addr string
	// VM, if set, is also looked up on the replica.
	VM string
	// Identity is this host's; nil skips everything from the TLS
	// handshake on (LoadIdentity says why).
	Identity *Identity
	// Proxy is the proxy shipping goes through (nil: directly), and
	// ProxySource where that setting comes from, for messages.
	Proxy       *url.URL
	ProxySource string
	// Timeout bounds each step, UploadTimeout the upload of a full chunk.
	Timeout, UploadTimeout time.Duration
	Now                    func() time.Time
}

// clockSkew is how far the clocks of the hosts may be apart before the
// doctor says so, and clockSkewBad how far before it is a problem: a
// certificate just issued is backdated by five minutes (pki), so beyond
// that the other host takes it as not yet valid.
const (
	clockSkew    = 5 * time.Second
	clockSkewBad = 5 * time.Minute
)

// ReplicaPath checks the way to a replica step by step, as shipping
// takes it: name, address family, TCP directly, the proxy, the TLS
// handshake both ways, the allow-list, the clocks, an upload of a full
// chunk (wire.MaxChunk), and the VM on the replica. A step that fails ends
// the steps that need it.
func ReplicaPath(ctx context.Context, rc ReplicaCheck) []Finding {
	if rc.Timeout <= 0 {
		rc.Timeout = 10 * time.Second
	}
	if rc.UploadTimeout <= 0 {
		rc.UploadTimeout = 2 * time.Minute
	}
	if rc.Now == nil {
		rc.Now = time.Now
	}
	var out []Finding
	add := func(fs ...Finding) {
		for _, f := range fs {
			if f.Subject == "" {
				f.Subject = rc.Addr
			}
			out = append(out, f)
		}
	}
	host, port, err := net.SplitHostPort(rc.Addr)
	if err != nil || host == "" || port == "" {
		add(Finding{Check: CheckReplica, Severity: Problem, Cause: "not a HOST:PORT address",
			Fix: "give the replica's --replica-listen address, e.g. replica.example.com:8443"})
		return out
	}
	via := rc.Proxy != nil
	ips, f := resolve(ctx, host, via, rc.Timeout)
	add(f)
	direct := false
	if len(ips) > 0 {
		usable, f := families(host, port, ips, via)
		add(f)
		if len(usable) > 0 {
			direct, f = tcpReach(ctx, host, port, usable, via, rc.Timeout)
			add(f)
		}
	}
	if via {
		ok, f := proxyReach(ctx, rc.Proxy, rc.ProxySource, rc.Addr, direct, rc.Timeout)
		add(f)
		if !ok {
			return out
		}
	} else if !direct {
		return out
	}
	if rc.Identity == nil {
		return out
	}
	r := route{addr: rc.Addr, proxy: rc.Proxy}
	s := newSession(rc, r)
	defer s.close()
	verified, allowed, fs := s.probe(ctx, host)
	add(fs...)
	if !verified || !allowed {
		return out
	}
	add(upload(ctx, rc, s, direct))
	if rc.VM != "" {
		add(s.replicaVM(ctx))
	}
	return out
}

// session is HTTPS to the replica over one route, with this host's
// certificate, recording what the replica presented.
type session struct {
	rc ReplicaCheck
	r  route
	hc *http.Client
	tr *http.Transport

	mu   sync.Mutex
	peer []*x509.Certificate
	conn *countingConn // the last connection made
}

func newSession(rc ReplicaCheck, r route) *session {
	s := &session{rc: rc, r: r}
	cert := rc.Identity.Cert
	host, _, _ := net.SplitHostPort(r.addr)
	tc := &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: host,
		// The replica's certificate is checked by certFindings, which
		// names every fault and not only the first; nothing that needs
		// the replica to be genuine is sent before it passed.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			s.mu.Lock()
			s.peer = cs.PeerCertificates
			s.mu.Unlock()
			return nil
		},
		// Present our certificate even when the replica names other CAs.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}
	s.tr = &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := r.dial(ctx, rc.Timeout)
			if err != nil {
				return nil, err
			}
			cc := &countingConn{Conn: c}
			s.mu.Lock()
			s.conn = cc
			s.mu.Unlock()
			return cc, nil
		},
		TLSClientConfig:     tc,
		TLSHandshakeTimeout: rc.Timeout,
		DisableKeepAlives:   true,
	}
	s.hc = &http.Client{Transport: s.tr}
	return s
}

func (s *session) close() { s.tr.CloseIdleConnections() }

func (s *session) peerCerts() []*x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peer
}

func (s *session) written() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return 0
	}
	return s.conn.written.Load()
}

func (s *session) url(path string) string {
	return (&url.URL{Scheme: "https", Host: s.r.addr, Path: path}).String()
}

// probe makes the TLS handshake and asks the replica's probe whether this
// host is on its allow-list. verified: the replica's certificate passed.
func (s *session) probe(ctx context.Context, host string) (verified, allowed bool, out []Finding) {
	rc := s.rc
	id := rc.Identity
	ctx, cancel := context.WithTimeout(ctx, rc.Timeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url(wire.PeerPath), nil)
	t0 := rc.Now()
	resp, err := s.hc.Do(req)
	t1 := rc.Now()
	peer := s.peerCerts()
	if len(peer) == 0 {
		f := Finding{Check: CheckTLSServer, Severity: Problem,
			Cause: fmt.Sprintf("no TLS handshake with the replica: %v", unwrapURL(err)),
			Fix:   "check that the address is the replica's --replica-listen address: something else may answer on that port"}
		return false, false, []Finding{f}
	}
	mitm := ""
	if rc.Proxy != nil {
		mitm = " (or the proxy on the way intercepts TLS: then replicate with --bypass-proxy or list the replica in NO_PROXY)"
	}
	name := certName(peer[0])
	bad := certFindings(certCheck{
		check: CheckTLSServer,
		who:   fmt.Sprintf("the replica's certificate %q", name),
		leaf:  peer[0], inter: peer[1:], pool: id.Pool, ca: id.CA, host: host, now: rc.Now(),
		usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		reissue: func(flags string) string {
			return fmt.Sprintf("issue the replica a certificate with `vdrepl pki issue --name %s%s` from the CA %q and restart its daemon with it", name, flags, id.CA.Subject.CommonName)
		},
		mitm: mitm,
	})
	verified = true
	for _, f := range bad {
		verified = verified && f.Severity != Problem
	}
	out = bad
	if len(bad) == 0 {
		out = append(out, Finding{Check: CheckTLSServer, Severity: OK,
			Cause: fmt.Sprintf("the replica's certificate %q is valid for %q until %s, issued by this host's CA", name, host, day(peer[0].NotAfter))})
	}
	if err != nil {
		return verified, false, append(out, s.refused(err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	out = append(out, Finding{Check: CheckTLSClient, Severity: OK,
		Cause: fmt.Sprintf("the replica accepts this host's certificate %q", id.Name())})
	if f, ok := clockFinding(resp.Header.Get("Date"), t0, t1); ok {
		out = append(out, f)
	}
	f := Finding{Check: CheckAllowList, Severity: OK}
	switch resp.StatusCode {
	case http.StatusOK:
		var info wire.PeerInfo
		json.Unmarshal(body, &info)
		allowed = true
		f.Cause = fmt.Sprintf("the replica lets this host (%q) in by its allow-list entry %q", id.Name(), info.Pattern)
	case http.StatusForbidden:
		var e wire.Error
		json.Unmarshal(body, &e)
		f.Severity = Problem
		f.Cause = fmt.Sprintf("the replica does not let this host's certificate %q in (%s)", id.Name(), e.Message)
		f.Fix = fmt.Sprintf("on the replica run `vdrepl replica allow add --primary %s --storage DIR`", id.Name())
	case http.StatusNotFound:
		f.Severity = Warning
		f.Cause = "the replica does not answer the doctor's probe (an older vdrepl?), so its allow-list was not checked"
		f.Fix = "update vdrepl on the replica"
	default:
		f.Severity = Warning
		f.Cause = fmt.Sprintf("the replica answered the doctor's probe with %s, so its allow-list was not checked", resp.Status)
		f.Fix = "the replica's log says why"
	}
	return verified, allowed, append(out, f)
}

// refused explains an error after the handshake: in TLS 1.3 a server's
// refusal of our certificate arrives as an alert on the first read.
func (s *session) refused(err error) Finding {
	id := s.rc.Identity
	err = unwrapURL(err)
	f := Finding{Check: CheckTLSClient, Severity: Problem}
	var opErr *net.OpError
	if !errors.As(err, &opErr) || opErr.Op != "remote error" {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err) {
			f.Cause = fmt.Sprintf("the replica closed the connection after the handshake (%v): it may have refused this host's certificate %q", err, id.Name())
			f.Fix = "the replica's log says why"
			return f
		}
		f.Cause = fmt.Sprintf("no answer from the replica after the handshake: %v", err)
		f.Fix = "check the replica's log and load"
		return f
	}
	// Say why, from what we know of our certificate.
	now := s.rc.Now()
	lacks := len(id.Leaf.ExtKeyUsage) > 0 && !containsEKU(id.Leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	reissue := fmt.Sprintf("issue this host a new one with `vdrepl pki issue --name %s`", id.Name())
	switch {
	case lacks:
		f.Cause = fmt.Sprintf("the replica refused this host's certificate %q (%v): it lacks the clientAuth usage", id.Name(), err)
		f.Fix = reissue + " (it has both usages)"
	case now.After(id.Leaf.NotAfter):
		f.Cause = fmt.Sprintf("the replica refused this host's certificate %q (%v): it expired on %s", id.Name(), err, day(id.Leaf.NotAfter))
		f.Fix = reissue
	default:
		f.Cause = fmt.Sprintf("the replica refused this host's certificate %q (%v): most likely it trusts another CA than this host's %q", id.Name(), err, id.CA.Subject.CommonName)
		f.Fix = fmt.Sprintf("give the replica --tls-ca the CA that issued this host's certificate (%s), or issue this host a certificate from the replica's CA; both hosts need certificates from one CA", id.Files.CA)
	}
	return f
}

func containsEKU(list []x509.ExtKeyUsage, u x509.ExtKeyUsage) bool {
	for _, x := range list {
		if x == u || x == x509.ExtKeyUsageAny {
			return true
		}
	}
	return false
}

// clockFinding compares the replica's Date header (whole seconds) with the
// middle of the request on our clock.
func clockFinding(date string, t0, t1 time.Time) (Finding, bool) {
	d, err := http.ParseTime(date)
	if err != nil {
		return Finding{}, false
	}
	mid := t0.Add(t1.Sub(t0) / 2)
	skew := d.Add(500 * time.Millisecond).Sub(mid)
	slack := t1.Sub(t0)/2 + 500*time.Millisecond
	f := Finding{Check: CheckClock, Severity: OK, Cause: fmt.Sprintf("the clocks of this host and the replica agree within %s", clockSkew)}
	abs := skew.Abs() - slack
	if abs <= clockSkew {
		return f, true
	}
	dir := "ahead of"
	if skew < 0 {
		dir = "behind"
	}
	f.Severity = Warning
	f.Cause = fmt.Sprintf("the replica's clock is %s %s this host's: the times in status and recovery points of the two hosts disagree", durText(skew.Abs()), dir)
	f.Fix = "run NTP (chrony or systemd-timesyncd) on both hosts"
	if abs > clockSkewBad {
		f.Severity = Problem
		f.Cause = fmt.Sprintf("the replica's clock is %s %s this host's: a certificate issued on one host is not yet valid on the other, and times in status and recovery points disagree", durText(skew.Abs()), dir)
	}
	return f, true
}

// upload sends a full chunk to the replica's probe, the way shipping
// sends a cycle. When it breaks through a proxy, the direct way is tried
// too, to tell whether bypassing the proxy helps.
func upload(ctx context.Context, rc ReplicaCheck, s *session, direct bool) Finding {
	f := Finding{Check: CheckUpload, Severity: OK}
	took, err := s.upload(ctx)
	if err == nil {
		if rc.Proxy != nil {
			f.Cause = fmt.Sprintf("a full upload chunk (%s) went through the proxy %s in %s", units.FormatBytes(wire.MaxChunk), rc.Proxy.Redacted(), took.Round(time.Millisecond))
		} else {
			f.Cause = fmt.Sprintf("a full upload chunk (%s) went through in %s", units.FormatBytes(wire.MaxChunk), took.Round(time.Millisecond))
		}
		return f
	}
	f.Severity = Problem
	if rc.Proxy == nil {
		f.Cause = "a full upload chunk " + err.Error()
		f.Fix = "a firewall or middlebox on the way limits large or long connections: lift that limit"
		return f
	}
	proxied := fmt.Sprintf("a full upload chunk through the proxy %s (%s) %v", rc.Proxy.Redacted(), rc.ProxySource, err)
	if !direct {
		f.Cause = proxied + ", and the replica cannot be reached directly"
		f.Fix = "lift the proxy's limits on upload size and duration for the replica"
		return f
	}
	ds := newSession(rc, route{addr: rc.Addr})
	defer ds.close()
	if _, derr := ds.upload(ctx); derr != nil {
		f.Cause = fmt.Sprintf("%s, and directly one %v", proxied, derr)
		f.Fix = "a firewall or middlebox on the way limits large or long connections: lift that limit"
		return f
	}
	f.Cause = proxied + ", while directly it goes through"
	f.Fix = "replicate with --bypass-proxy (or list the replica in NO_PROXY in the daemon's environment), or lift the proxy's limits on upload size and duration"
	return f
}

// uploadError says how an upload failed, in words that follow "a full
// upload chunk".
type uploadError struct {
	sent    int64
	timeout time.Duration // non-zero: it did not finish in time
	err     error
	status  string
}

func (e *uploadError) Error() string {
	switch {
	case e.timeout > 0:
		return fmt.Sprintf("did not get through within %s (about %s sent)", e.timeout, units.FormatBytes(e.sent))
	case e.status != "":
		return fmt.Sprintf("was answered with %s", e.status)
	}
	return fmt.Sprintf("broke off after about %s (%v)", units.FormatBytes(e.sent), e.err)
}

func (s *session) upload(ctx context.Context) (time.Duration, error) {
	body := make([]byte, wire.MaxChunk)
	rand.Read(body) // incompressible, like compressed cycle data
	ctx, cancel := context.WithTimeout(ctx, s.rc.UploadTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.url(wire.PeerPath), bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/octet-stream")
	start := time.Now()
	resp, err := s.hc.Do(req)
	if err != nil {
		ue := &uploadError{sent: s.written(), err: unwrapURL(err)}
		if ctx.Err() != nil {
			ue.timeout = s.rc.UploadTimeout
		}
		return 0, ue
	}
	defer resp.Body.Close()
	var info wire.PeerInfo
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return 0, &uploadError{status: resp.Status}
	}
	if json.Unmarshal(b, &info) != nil || info.Received != wire.MaxChunk {
		return 0, &uploadError{sent: s.written(), err: fmt.Errorf("the replica received %d bytes of %d", info.Received, wire.MaxChunk)}
	}
	return time.Since(start), nil
}

// replicaVM asks the replica about the VM, as the primary sees it.
func (s *session) replicaVM(ctx context.Context) Finding {
	vm := s.rc.VM
	f := Finding{Check: CheckVMReplica, Subject: vm, Severity: OK}
	ctx, cancel := context.WithTimeout(ctx, s.rc.Timeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url(wire.ReplicasPath+url.PathEscape(vm)), nil)
	resp, err := s.hc.Do(req)
	if err != nil {
		f.Severity, f.Cause, f.Fix = Warning, fmt.Sprintf("the replica did not say how it holds the VM: %v", unwrapURL(err)), "run doctor again"
		return f
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var e wire.Error
	switch resp.StatusCode {
	case http.StatusOK:
		var r wire.Replica
		json.Unmarshal(b, &r)
		f.Cause = fmt.Sprintf("the replica %s holds the VM: state %s, cycle %d applied", s.r.addr, r.State, r.Applied)
		if !r.Consistent {
			f.Cause += ", not consistent yet (a copy or resync is unfinished)"
		}
	case http.StatusForbidden:
		json.Unmarshal(b, &e)
		f.Severity = Problem
		f.Cause = fmt.Sprintf("the replica %s refuses this host the VM: %s", s.r.addr, e.Message)
		f.Fix = "the VM there belongs to another primary: remove it there (`vdrepl replication disable` on its primary) or replicate under another name"
	case http.StatusNotFound:
		json.Unmarshal(b, &e)
		f.Severity = Warning
		f.Cause = fmt.Sprintf("the replica %s does not hold the VM (%s)", s.r.addr, e.Message)
		f.Fix = "the initial copy creates it: `vdrepl replication status` shows whether it runs"
	default:
		f.Severity = Warning
		f.Cause = fmt.Sprintf("the replica %s answered %s about the VM", s.r.addr, resp.Status)
		f.Fix = "the replica's log says why"
	}
	return f
}

// unwrapURL drops net/http's *url.Error, which only repeats the URL.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
