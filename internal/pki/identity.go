package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// Identity is a host's loaded key material: its certificate and key, and
// the CA it trusts. It is immutable and safe for concurrent use.
type Identity struct {
	certFile, caFile string
	cert             tls.Certificate
	ca               *x509.Certificate
	pool             *x509.CertPool
}

// Load reads a host's certificate, key and CA certificate and checks them
// as a peer would: the key belongs to the certificate, the CA issued it, it
// is valid now and usable both as TLS server and as TLS client. Errors name
// the file at fault and wrap ErrNotFound, ErrInvalid, ErrKeyMismatch,
// ErrUntrusted, ErrExpired or ErrUsage.
func Load(certFile, keyFile, caFile string) (*Identity, error) {
	fsys := vfs.Default
	caPEM, err := readFile(fsys, caFile, "CA certificate")
	if err != nil {
		return nil, err
	}
	ca, err := parseCert(caFile, caPEM)
	if err != nil {
		return nil, err
	}
	if !ca.IsCA {
		return nil, errorf(ErrInvalid, "%s is not a CA certificate (subject %q); give the ca.crt made by `vdrepl pki init`", caFile, ca.Subject)
	}
	certPEM, err := readFile(fsys, certFile, "certificate")
	if err != nil {
		return nil, err
	}
	leaf, err := parseCert(certFile, certPEM)
	if err != nil {
		return nil, err
	}
	keyPEM, err := readFile(fsys, keyFile, "key")
	if err != nil {
		return nil, err
	}
	key, err := parseKey(keyFile, keyPEM)
	if err != nil {
		return nil, err
	}
	if err := matchKey(leaf, certFile, key, keyFile); err != nil {
		return nil, err
	}
	id := &Identity{
		certFile: certFile,
		caFile:   caFile,
		cert:     tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf},
		ca:       ca,
		pool:     x509.NewCertPool(),
	}
	id.pool.AddCert(ca)
	now := time.Now()
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: id.pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{u}})
		if err != nil {
			return nil, explain(err, leaf, "certificate "+certFile, ca, "CA "+caFile, now)
		}
	}
	return id, nil
}

// ServerConfig is a TLS 1.3 server configuration that presents our
// certificate and requires a client certificate issued by our CA for client
// authentication. After the handshake, PeerName names the client.
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert, // with ExtKeyUsageClientAuth
		ClientCAs:    id.pool,
	}
}

// ClientConfig is a TLS 1.3 client configuration that presents our
// certificate and accepts only a server certificate issued by our CA for
// server authentication and valid for serverName.
func (id *Identity) ClientConfig(serverName string) *tls.Config {
	cert := id.cert
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		RootCAs:    id.pool,
		// Present our certificate even when the server names other CAs it
		// accepts, so the server can say why it refuses it.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}
}

// Name is our certificate's name: its common name, else its first DNS SAN.
func (id *Identity) Name() string { return certName(id.cert.Leaf) }

// Leaf is our certificate.
func (id *Identity) Leaf() *x509.Certificate { return id.cert.Leaf }

// Warnings says, for our certificate and the CA's, if it expires within
// WarnBefore after now, with what to do about it.
func (id *Identity) Warnings(now time.Time) []string {
	var w []string
	if s := expiryWarning("certificate "+id.certFile, id.cert.Leaf.NotAfter, false, now); s != "" {
		w = append(w, s)
	}
	if s := expiryWarning("CA certificate "+id.caFile, id.ca.NotAfter, true, now); s != "" {
		w = append(w, s)
	}
	return w
}

// Explain turns a TLS handshake error of a connection made with our
// ServerConfig or ClientConfig into one an admin can act on: which peer
// certificate we refused and why (wrapping ErrUntrusted, ErrExpired or
// ErrUsage, and err), or that the peer refused the connection, maybe our
// certificate (ErrRefused). Other errors come back unchanged.
func (id *Identity) Explain(err error) error {
	var verr *tls.CertificateVerificationError
	if errors.As(err, &verr) && len(verr.UnverifiedCertificates) > 0 {
		peer := verr.UnverifiedCertificates[0]
		return explain(err, peer, fmt.Sprintf("peer certificate %q", certName(peer)), id.ca, fmt.Sprintf("our CA %q", id.ca.Subject.CommonName), time.Now())
	}
	// A TLS alert from the peer: crypto/tls gives no type for it, only
	// this Op. In TLS 1.3 a server's refusal of our client certificate
	// arrives so, on the first read after the handshake.
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "remote error" {
		return errorf(ErrRefused, "the peer refused the TLS connection (%w); if it refused our certificate %s (%q, issued by %q), its log says why",
			err, id.certFile, id.Name(), id.ca.Subject.CommonName)
	}
	return err
}

// explain turns an x509 verification error about cert into a sentinel
// error that names the certificate (what) and our CA (caWhat).
func explain(err error, cert *x509.Certificate, what string, ca *x509.Certificate, caWhat string, now time.Time) error {
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var host x509.HostnameError
	switch {
	case errors.As(err, &unknown):
		issuer := fmt.Sprintf("its issuer is %q", cert.Issuer.CommonName)
		if cert.Issuer.CommonName == ca.Subject.CommonName {
			issuer = fmt.Sprintf("its issuer is another CA named %q: was the CA made again with `vdrepl pki init`?", cert.Issuer.CommonName)
		}
		return errorf(ErrUntrusted, "%s was not issued by %s (%s); issue it from this CA with `vdrepl pki issue`: %w", what, caWhat, issuer, err)
	case errors.As(err, &host):
		return errorf(ErrUntrusted, "%s is for %s, not %q; connect by one of those names or issue it with `--san %s`: %w",
			what, strings.Join(names(cert), ", "), host.Host, host.Host, err)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		isCA := invalid.Cert != nil && invalid.Cert.IsCA
		if isCA {
			what, cert = caWhat, invalid.Cert
		}
		if now.Before(cert.NotBefore) {
			return errorf(ErrExpired, "%s is not valid until %s; check the clocks: %w", what, cert.NotBefore.UTC().Format(time.RFC3339), err)
		}
		return errorf(ErrExpired, "%s: %w", expiryWarning(what, cert.NotAfter, isCA, now), err)
	case errors.As(err, &invalid) && invalid.Reason == x509.IncompatibleUsage:
		var missing []string
		for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if len(cert.ExtKeyUsage) > 0 && !slices.Contains(cert.ExtKeyUsage, u) && !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageAny) {
				missing = append(missing, ekuName(u))
			}
		}
		if len(missing) > 0 {
			return errorf(ErrUsage, "%s lacks the %s extended key usage that vdrepl needs (it has %s); issue one with `vdrepl pki issue`: %w",
				what, strings.Join(missing, " and "), strings.Join(describe(cert).EKU, ", "), err)
		}
		return errorf(ErrUsage, "%s: %w", what, err)
	}
	return errorf(ErrUntrusted, "%s: %w", what, err)
}

// names lists the DNS and IP SANs of c.
func names(c *x509.Certificate) []string {
	n := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		n = append(n, ip.String())
	}
	return n
}

// PeerName is the name (common name, else first DNS SAN) of the verified
// peer certificate of a connection, or "" if the peer was not verified.
func PeerName(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	return certName(cs.VerifiedChains[0][0])
}

// CertName is the name of a certificate: its common name, else its first
// DNS SAN.
func CertName(c *x509.Certificate) string { return certName(c) }
