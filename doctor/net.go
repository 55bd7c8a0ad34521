package doctor

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// route is how this host reaches a replica: directly or through a proxy.
type route struct {
	addr  string   // the replica's HOST:PORT
	proxy *url.URL // nil: directly
}

func (r route) dial(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	if r.proxy == nil {
		d := net.Dialer{Timeout: timeout}
		return d.DialContext(ctx, "tcp", r.addr)
	}
	return dialConnect(ctx, r.proxy, r.addr, timeout)
}

// proxyError is a proxy failing to open a tunnel.
type proxyError struct {
	stage  string // "dial", "tls" or "connect"
	status string // the proxy's answer to CONNECT, if not 200
	err    error
}

func (e *proxyError) Error() string {
	if e.status != "" {
		return "the proxy answered CONNECT with " + e.status
	}
	return e.stage + ": " + e.err.Error()
}

func (e *proxyError) Unwrap() error { return e.err }

// dialConnect opens a tunnel to target through an HTTP(S) proxy with
// CONNECT, as net/http's transport does for HTTPS through a proxy.
func dialConnect(ctx context.Context, proxy *url.URL, target string, timeout time.Duration) (net.Conn, error) {
	hostport := proxy.Host
	if proxy.Port() == "" {
		port := "80"
		if proxy.Scheme == "https" {
			port = "443"
		}
		hostport = net.JoinHostPort(proxy.Hostname(), port)
	}
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return nil, &proxyError{stage: "dial", err: err}
	}
	conn.SetDeadline(time.Now().Add(timeout))
	if proxy.Scheme == "https" {
		tc := tls.Client(conn, &tls.Config{ServerName: proxy.Hostname()})
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, &proxyError{stage: "tls", err: err}
		}
		conn = tc
	}
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Opaque: target}, Host: target, Header: http.Header{}}
	if u := proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	br := bufio.NewReader(conn)
	err = req.Write(conn)
	var resp *http.Response
	if err == nil {
		resp, err = http.ReadResponse(br, req)
	}
	if err != nil {
		conn.Close()
		return nil, &proxyError{stage: "connect", err: err}
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		conn.Close()
		return nil, &proxyError{stage: "connect", status: resp.Status, err: errors.New(resp.Status)}
	}
	conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// bufferedConn reads what the proxy sent after its answer first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// countingConn counts the bytes written to a connection.
type countingConn struct {
	net.Conn
	written atomic.Int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.written.Add(int64(n))
	return n, err
}

func family(ip netip.Addr) string {
	if ip.Unmap().Is4() {
		return "IPv4"
	}
	return "IPv6"
}

func addrList(ips []netip.Addr) string {
	var s []string
	for _, ip := range ips {
		s = append(s, fmt.Sprintf("%s (%s)", ip, family(ip)))
	}
	return strings.Join(s, " and ")
}

// resolve looks the replica's host up. via: replication goes through a
// proxy, which resolves the name itself.
func resolve(ctx context.Context, host string, via bool, timeout time.Duration) ([]netip.Addr, Finding) {
	f := Finding{Check: CheckResolve, Severity: OK}
	if ip, err := netip.ParseAddr(host); err == nil {
		f.Cause = fmt.Sprintf("the replica is given by its %s address", family(ip))
		return []netip.Addr{ip}, f
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		f.Severity = Problem
		f.Cause = fmt.Sprintf("the name %q does not resolve on this host (%v)", host, err)
		f.Fix = "add it to DNS or /etc/hosts, or give --replica the replica's IP address"
		if via {
			f.Severity = Warning
			f.Fix = "the proxy resolves it while replication goes through the proxy; with --bypass-proxy, add it to DNS or /etc/hosts"
		}
		return nil, f
	}
	for i := range ips {
		ips[i] = ips[i].Unmap()
	}
	f.Cause = fmt.Sprintf("%s resolves to %s", host, addrList(ips))
	return ips, f
}

// unusable says why this host cannot send to ip at all, or "" if it can:
// a UDP "connection" asks the kernel for a route without sending anything.
func unusable(ip netip.Addr, port string) string {
	c, err := net.Dial("udp", net.JoinHostPort(ip.String(), port))
	if err == nil {
		c.Close()
		return ""
	}
	fam := family(ip)
	if fam == "IPv6" {
		if errors.Is(err, syscall.EAFNOSUPPORT) {
			return "this kernel runs without IPv6 (ipv6.disable=1 at boot)"
		}
		if sysctlIs("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1") {
			return "IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6 = 1)"
		}
		if ip.IsLoopback() && sysctlIs("/proc/sys/net/ipv6/conf/lo/disable_ipv6", "1") {
			return "IPv6 is disabled on the loopback interface (net.ipv6.conf.lo.disable_ipv6 = 1)"
		}
	}
	if errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EADDRNOTAVAIL) {
		return fmt.Sprintf("this host has no %s address or route to reach it", fam)
	}
	return fmt.Sprintf("this host cannot send %s to it (%v)", fam, err)
}

func sysctlIs(path, want string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.TrimSpace(string(b)) == want
}

// families checks that this host can use the address families of ips and
// returns the addresses it can use.
func families(host, port string, ips []netip.Addr, via bool) ([]netip.Addr, Finding) {
	var ok, bad []netip.Addr
	var why string
	for _, ip := range ips {
		if r := unusable(ip, port); r != "" {
			bad = append(bad, ip)
			if why == "" {
				why = r
			}
		} else {
			ok = append(ok, ip)
		}
	}
	f := Finding{Check: CheckFamily, Severity: OK}
	fams := map[string]bool{}
	for _, ip := range ok {
		fams[family(ip)] = true
	}
	switch {
	case len(bad) == 0:
		list := []string{}
		for _, fam := range []string{"IPv4", "IPv6"} {
			if fams[fam] {
				list = append(list, fam)
			}
		}
		f.Cause = "this host can reach it over " + strings.Join(list, " and ")
	case len(ok) == 0:
		f.Severity = Problem
		what := fmt.Sprintf("%s resolves only to %s", host, addrList(bad))
		if _, err := netip.ParseAddr(host); err == nil {
			what = fmt.Sprintf("%s is an %s address", host, family(bad[0]))
		}
		f.Cause = what + ", but " + why
		f.Fix = fixFamily(family(bad[0]))
		if via {
			f.Severity = Warning
			f.Fix = "replication goes through the proxy, so this matters only with --bypass-proxy: then " + f.Fix
		}
	default:
		f.Severity = Warning
		f.Cause = fmt.Sprintf("%s resolves to %s too, but %s: only %s can be reached, and a program that tries the other address first fails or waits",
			host, addrList(bad), why, addrList(ok))
		f.Fix = fmt.Sprintf("drop %s from the name in /etc/hosts or DNS, or %s", addrList(bad), enableFamily(family(bad[0])))
	}
	return ok, f
}

func fixFamily(fam string) string {
	other := map[string]string{"IPv4": "IPv6", "IPv6": "IPv4"}[fam]
	return fmt.Sprintf("give --replica an %s address or a name that has one (DNS, /etc/hosts), or %s", other, enableFamily(fam))
}

func enableFamily(fam string) string {
	if fam == "IPv6" {
		return "enable IPv6 (sysctl net.ipv6.conf.all.disable_ipv6=0)"
	}
	return "give this host an IPv4 route to the replica"
}

// tcpReach connects to port on each address and reports whether any took
// the connection.
func tcpReach(ctx context.Context, host, port string, ips []netip.Addr, via bool, timeout time.Duration) (bool, Finding) {
	var ok []netip.Addr
	var failed []netip.Addr
	var firstErr error
	for _, ip := range ips {
		d := net.Dialer{Timeout: timeout}
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip.String(), port))
		if err != nil {
			failed = append(failed, ip)
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		c.Close()
		ok = append(ok, ip)
	}
	f := Finding{Check: CheckTCP, Severity: OK}
	switch {
	case len(failed) == 0:
		f.Cause = fmt.Sprintf("port %s takes TCP connections on %s", port, addrList(ok))
	case len(ok) > 0:
		f.Severity = Warning
		f.Cause = fmt.Sprintf("port %s takes connections on %s but not on %s (%v)", port, addrList(ok), addrList(failed), firstErr)
		f.Fix = fmt.Sprintf("let the replica listen on every address (--replica-listen [::]:%s) or drop %s from the name %s", port, addrList(failed), host)
	default:
		f.Severity = Problem
		switch {
		case errors.Is(firstErr, syscall.ECONNREFUSED):
			f.Cause = fmt.Sprintf("nothing listens on port %s of %s (connection refused)", port, addrList(failed))
			f.Fix = fmt.Sprintf("start the replica's daemon with --replica-listen on port %s, or correct the port in --replica", port)
		case isTimeout(firstErr):
			f.Cause = fmt.Sprintf("port %s of %s does not answer within %s: something on the way drops the connection", port, addrList(failed), timeout)
			f.Fix = fmt.Sprintf("open TCP port %s from this host to the replica in the firewalls on the way, or set HTTPS_PROXY in the daemon's environment if only a proxy may go out", port)
		default:
			f.Cause = fmt.Sprintf("cannot connect to port %s of %s: %v", port, addrList(failed), firstErr)
			f.Fix = "check the route and the firewalls between this host and the replica"
		}
		if via {
			f.Severity = Warning
			f.Fix = "replication goes through the proxy, so the direct way matters only with --bypass-proxy: then " + f.Fix
		}
	}
	return len(ok) > 0, f
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// proxyReach asks the proxy for a tunnel to addr.
func proxyReach(ctx context.Context, proxy *url.URL, source, addr string, direct bool, timeout time.Duration) (bool, Finding) {
	f := Finding{Check: CheckProxy, Severity: OK}
	name := fmt.Sprintf("the proxy %s (%s)", proxy.Redacted(), source)
	c, err := dialConnect(ctx, proxy, addr, timeout)
	if err == nil {
		c.Close()
		f.Cause = fmt.Sprintf("%s opens a tunnel to %s", name, addr)
		return true, f
	}
	f.Severity = Problem
	bypass := "replicate with --bypass-proxy or list the replica in NO_PROXY"
	if direct {
		bypass += " (this host reaches the replica directly)"
	}
	var pe *proxyError
	errors.As(err, &pe)
	switch {
	case pe != nil && pe.stage == "dial":
		f.Cause = fmt.Sprintf("%s cannot be reached: %v", name, pe.err)
		f.Fix = "correct HTTPS_PROXY in the daemon's environment, or " + bypass
	case pe != nil && pe.status != "":
		f.Cause = fmt.Sprintf("%s refuses a tunnel to %s: %s", name, addr, pe.status)
		f.Fix = fmt.Sprintf("allow CONNECT to %s on the proxy, or %s", addr, bypass)
	default:
		f.Cause = fmt.Sprintf("%s broke off the tunnel to %s: %v", name, addr, err)
		f.Fix = "check the proxy's log, or " + bypass
	}
	return false, f
}
