package pki

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Info describes a certificate for people and scripts.
type Info struct {
	Subject    string    `json:"subject"`
	Issuer     string    `json:"issuer"`
	CommonName string    `json:"common_name"`
	DNSNames   []string  `json:"dns_names"`
	IPs        []string  `json:"ips"`
	EKU        []string  `json:"eku"` // "serverAuth", "clientAuth", ...
	IsCA       bool      `json:"is_ca"`
	NotBefore  time.Time `json:"not_before"`
	NotAfter   time.Time `json:"not_after"`
	KeyType    string    `json:"key_type"` // "ECDSA P-256", "RSA 3072", "Ed25519"
	Serial     string    `json:"serial"`   // hexadecimal
}

// Describe describes the first certificate in PEM data.
func Describe(certPEM []byte) (Info, error) {
	der, err := pemBlock(certPEM, "CERTIFICATE")
	if err != nil {
		return Info{}, errorf(ErrInvalid, "%v", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return Info{}, errorf(ErrInvalid, "%v", err)
	}
	return describe(c), nil
}

func describe(c *x509.Certificate) Info {
	i := Info{
		Subject:    c.Subject.String(),
		Issuer:     c.Issuer.String(),
		CommonName: c.Subject.CommonName,
		DNSNames:   slices.Clone(c.DNSNames),
		IsCA:       c.IsCA,
		NotBefore:  c.NotBefore,
		NotAfter:   c.NotAfter,
		KeyType:    keyType(c.PublicKey),
		Serial:     c.SerialNumber.Text(16),
	}
	for _, ip := range c.IPAddresses {
		i.IPs = append(i.IPs, ip.String())
	}
	for _, u := range c.ExtKeyUsage {
		i.EKU = append(i.EKU, ekuName(u))
	}
	for _, oid := range c.UnknownExtKeyUsage {
		i.EKU = append(i.EKU, oid.String())
	}
	return i
}

// ExpiresWithin reports whether the certificate is invalid at now+d: it
// expires within d, or has expired.
func (i Info) ExpiresWithin(d time.Duration, now time.Time) bool {
	return now.Add(d).After(i.NotAfter)
}

// Warnings lists what is wrong or soon will be with the certificate at now:
// expired, not yet valid, expiring within WarnBefore, or (for a host
// certificate, not a client one) lacking the serverAuth or clientAuth usage vdrepl needs.
func (i Info) Warnings(now time.Time) []string {
	what := "certificate"
	if i.IsCA {
		what = "CA certificate"
	}
	var w []string
	if now.Before(i.NotBefore) {
		w = append(w, fmt.Sprintf("%s is not valid until %s; check this host's clock", what, i.NotBefore.UTC().Format(time.RFC3339)))
	}
	if s := expiryWarning(what, i.NotAfter, i.IsCA, now); s != "" {
		w = append(w, s)
	}
	// A client certificate (`pki issue --client`, clientAuth alone) is
	// meant never to serve.
	if !i.IsCA && !slices.Equal(i.EKU, []string{"clientAuth"}) {
		for _, u := range []string{"serverAuth", "clientAuth"} {
			if len(i.EKU) > 0 && !slices.Contains(i.EKU, u) && !slices.Contains(i.EKU, "any") {
				w = append(w, fmt.Sprintf("certificate lacks the %s usage, so peers refuse it as a TLS %s; issue one with `vdrepl pki issue`",
					u, strings.TrimSuffix(u, "Auth")))
			}
		}
	}
	return w
}

// expiryWarning is a warning about a certificate (what) that has expired or
// expires within WarnBefore after now, or "".
func expiryWarning(what string, notAfter time.Time, isCA bool, now time.Time) string {
	fix := "issue a new one with `vdrepl pki issue`"
	if isCA {
		fix = "create a new CA with `vdrepl pki init` and issue every host a certificate from it"
	}
	left := notAfter.Sub(now)
	switch {
	case left <= 0:
		return fmt.Sprintf("%s expired on %s; %s", what, day(notAfter), fix)
	case left < 24*time.Hour:
		return fmt.Sprintf("%s expires in %s (%s); %s", what, left.Round(time.Minute), notAfter.UTC().Format(time.RFC3339), fix)
	case left <= WarnBefore:
		return fmt.Sprintf("%s expires in %d days (%s); %s", what, int(left/(24*time.Hour)), day(notAfter), fix)
	}
	return ""
}

func keyType(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return fmt.Sprintf("%T", pub)
}

func ekuName(u x509.ExtKeyUsage) string {
	switch u {
	case x509.ExtKeyUsageAny:
		return "any"
	case x509.ExtKeyUsageServerAuth:
		return "serverAuth"
	case x509.ExtKeyUsageClientAuth:
		return "clientAuth"
	case x509.ExtKeyUsageCodeSigning:
		return "codeSigning"
	case x509.ExtKeyUsageEmailProtection:
		return "emailProtection"
	case x509.ExtKeyUsageTimeStamping:
		return "timeStamping"
	case x509.ExtKeyUsageOCSPSigning:
		return "OCSPSigning"
	}
	return fmt.Sprintf("ExtKeyUsage(%d)", int(u))
}

// certName is a certificate's name: its common name, else its first DNS
// SAN, else its first IP SAN.
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
