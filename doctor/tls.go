package doctor

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/internal/pki"
)

// TLSFiles are the paths of a host's certificate, key and CA certificate.
type TLSFiles struct {
	Cert, Key, CA string
}

// Identity is this host's key material as the network checks present it.
// Unlike pki.Load it takes a certificate that is expired or lacks a usage,
// so that the replica's view of such a certificate can be shown as well.
type Identity struct {
	Files TLSFiles
	Cert  tls.Certificate
	Leaf  *x509.Certificate
	CA    *x509.Certificate
	Pool  *x509.CertPool
}

// Name is the certificate's name, the one allow-lists match.
func (id *Identity) Name() string { return certName(id.Leaf) }

// LoadIdentity loads this host's certificate, key and CA and checks the
// certificate as a peer will: issued by the CA, valid now and for the next
// pki.WarnBefore, usable as TLS server and client. The Identity is nil when
// the files cannot be used at all.
func LoadIdentity(files TLSFiles, now time.Time) (*Identity, []Finding) {
	f := Finding{Check: CheckIdentity, Severity: Problem}
	switch {
	case files.Cert == "" && files.Key == "" && files.CA == "":
		f.Cause = "this host has no TLS certificate configured, so it cannot replicate"
		f.Fix = "start the daemon with --tls-cert, --tls-key and --tls-ca (made with `vdrepl pki init` and `vdrepl pki issue`), or give them to doctor"
		return nil, []Finding{f}
	case files.Cert == "" || files.Key == "" || files.CA == "":
		f.Cause = "only some of --tls-cert, --tls-key and --tls-ca are given"
		f.Fix = "give all three"
		return nil, []Finding{f}
	}
	f.Subject = files.Cert
	cert, err := tls.LoadX509KeyPair(files.Cert, files.Key)
	if err != nil {
		f.Cause = fmt.Sprintf("cannot use the certificate with the key %s: %v", files.Key, err)
		f.Fix = "give the key issued with the certificate (`vdrepl pki show FILE` tells what a certificate holds)"
		if errors.Is(err, fs.ErrNotExist) {
			f.Fix = "issue them with `vdrepl pki issue`, or correct --tls-cert and --tls-key"
		}
		return nil, []Finding{f}
	}
	pool, ca, err := loadCA(files.CA)
	if err != nil {
		f.Subject = files.CA
		f.Cause = err.Error()
		f.Fix = "give --tls-ca the ca.crt made by `vdrepl pki init`"
		return nil, []Finding{f}
	}
	id := &Identity{Files: files, Cert: cert, Leaf: cert.Leaf, CA: ca, Pool: pool}
	bad := certFindings(certCheck{
		check: CheckIdentity, subject: files.Cert,
		who:  fmt.Sprintf("this host's certificate %q", id.Name()),
		leaf: id.Leaf, pool: pool, ca: ca, now: now,
		usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		reissue: func(flags string) string {
			return fmt.Sprintf("issue this host a new one with `vdrepl pki issue --name %s%s` from the CA %q", id.Name(), flags, ca.Subject.CommonName)
		},
	})
	if d := ca.NotAfter.Sub(now); d <= pki.WarnBefore {
		sev, what := Warning, fmt.Sprintf("the CA %q expires on %s", ca.Subject.CommonName, day(ca.NotAfter))
		if d <= 0 {
			sev, what = Problem, fmt.Sprintf("the CA %q expired on %s", ca.Subject.CommonName, day(ca.NotAfter))
		}
		bad = append(bad, Finding{Check: CheckIdentity, Subject: files.CA, Severity: sev, Cause: what + ", and every certificate it issued with it",
			Fix: "create a new CA with `vdrepl pki init` and issue every host a certificate from it"})
	}
	if len(bad) > 0 {
		return id, bad
	}
	return id, []Finding{{Check: CheckIdentity, Subject: files.Cert, Severity: OK,
		Cause: fmt.Sprintf("this host's certificate %q is valid until %s, issued by the CA %q", id.Name(), day(id.Leaf.NotAfter), ca.Subject.CommonName)}}
}

// loadCA reads the CA certificates of file: the first is the CA, all go
// into the pool.
func loadCA(file string) (*x509.CertPool, *x509.Certificate, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read the CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	var first *x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("the CA file %s holds a certificate that does not parse: %w", file, err)
		}
		if first == nil {
			first = c
		}
		pool.AddCert(c)
	}
	if first == nil {
		return nil, nil, fmt.Errorf("the CA file %s holds no PEM certificate", file)
	}
	if !first.IsCA {
		return nil, nil, fmt.Errorf("%s is not a CA certificate (subject %q)", file, first.Subject)
	}
	return pool, first, nil
}

// certCheck is a certificate to check and how to talk about it.
type certCheck struct {
	check, subject string
	who            string // "the replica's certificate \"r1\""
	leaf           *x509.Certificate
	inter          []*x509.Certificate
	pool           *x509.CertPool
	ca             *x509.Certificate // ours
	host           string            // the name it must be valid for ("": none)
	usages         []x509.ExtKeyUsage
	reissue        func(flags string) string // how to get a good one, issued with more flags
	mitm           string                    // a hint when a proxy may stand in between
	now            time.Time
}

// certFindings lists everything wrong with a certificate, each fault as
// its own finding; none means it is fine.
func certFindings(c certCheck) []Finding {
	var out []Finding
	add := func(sev Severity, cause, fix string) {
		out = append(out, Finding{Check: c.check, Subject: c.subject, Severity: sev, Cause: cause, Fix: fix})
	}
	leaf := c.leaf
	// Trust, at a time inside the certificate's validity so that an
	// expired one is reported as such and not as untrusted too.
	at := c.now
	if at.Before(leaf.NotBefore) {
		at = leaf.NotBefore
	}
	if at.After(leaf.NotAfter) {
		at = leaf.NotAfter
	}
	inter := x509.NewCertPool()
	for _, ic := range c.inter {
		inter.AddCert(ic)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: c.pool, Intermediates: inter, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	var unknown x509.UnknownAuthorityError
	switch {
	case err == nil:
	case errors.As(err, &unknown):
		cause := fmt.Sprintf("%s was issued by %q, not by this host's CA %q, so the TLS handshake fails%s", c.who, leaf.Issuer.CommonName, c.ca.Subject.CommonName, c.mitm)
		if leaf.Issuer.CommonName == c.ca.Subject.CommonName {
			cause = fmt.Sprintf("%s was issued by a CA that only has the same name as this host's, %q (was the CA made again with `vdrepl pki init`?), so the TLS handshake fails%s",
				c.who, leaf.Issuer.CommonName, c.mitm)
		}
		add(Problem, cause, "give both hosts certificates from one CA: "+c.reissue("")+", or give --tls-ca the CA that issued it")
	default:
		add(Problem, fmt.Sprintf("%s does not verify against this host's CA %q: %v", c.who, c.ca.Subject.CommonName, err), c.reissue(""))
	}
	switch left := leaf.NotAfter.Sub(c.now); {
	case c.now.Before(leaf.NotBefore):
		add(Problem, fmt.Sprintf("%s is not valid until %s: a clock is wrong, this host's or that of the host that issued it", c.who, leaf.NotBefore.UTC().Format(time.RFC3339)),
			"set the clocks right (NTP: chrony or systemd-timesyncd)")
	case left <= 0:
		add(Problem, fmt.Sprintf("%s expired on %s", c.who, day(leaf.NotAfter)), c.reissue(""))
	case left <= pki.WarnBefore:
		add(Warning, fmt.Sprintf("%s expires in %s (%s)", c.who, durText(left), day(leaf.NotAfter)), c.reissue(""))
	}
	for _, u := range c.usages {
		if len(leaf.ExtKeyUsage) > 0 && !slices.Contains(leaf.ExtKeyUsage, u) && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny) {
			name, role := "serverAuth", "server"
			if u == x509.ExtKeyUsageClientAuth {
				name, role = "clientAuth", "client"
			}
			add(Problem, fmt.Sprintf("%s lacks the %s extended key usage, so peers refuse it as a TLS %s", c.who, name, role), c.reissue("")+" (it has both usages)")
		}
	}
	if c.host != "" {
		if err := leaf.VerifyHostname(c.host); err != nil {
			add(Problem, fmt.Sprintf("%s is for %s, not %q", c.who, certNames(leaf), c.host),
				"connect by one of its names (--replica NAME:PORT), or "+c.reissue(" --san "+c.host))
		}
	}
	return out
}

// certName is a certificate's name: its common name, else its first SAN.
func certName(c *x509.Certificate) string {
	switch {
	case c.Subject.CommonName != "":
		return c.Subject.CommonName
	case len(c.DNSNames) > 0:
		return c.DNSNames[0]
	case len(c.IPAddresses) > 0:
		return c.IPAddresses[0].String()
	}
	return ""
}

// certNames lists the names a certificate is valid for.
func certNames(c *x509.Certificate) string {
	names := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 {
		return fmt.Sprintf("no name at all (common name %q, which TLS no longer uses, and no SAN)", c.Subject.CommonName)
	}
	return strings.Join(names, ", ")
}

func day(t time.Time) string { return t.UTC().Format("2006-01-02") }

// durText renders a duration for people: "45s", "1m40s", "40m", "3h10m", "12 days".
func durText(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()+0.5))
	case d < 10*time.Minute:
		d = d.Round(time.Second)
		if s := int(d.Seconds()) % 60; s != 0 {
			return fmt.Sprintf("%dm%ds", int(d.Minutes()), s)
		}
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()+0.5))
	case d < 48*time.Hour:
		d = d.Round(time.Minute)
		if m := int(d.Minutes()) % 60; m != 0 {
			return fmt.Sprintf("%dh%dm", int(d.Hours()), m)
		}
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%d days", int(d.Hours()/24))
}
