package pki

import (
	"crypto/x509"
	"strings"
)

// Match reports whether a (verified) peer certificate matches an allow-list
// pattern. Patterns name certificates, not addresses; case does not matter.
// The pattern "*" matches any peer with a certificate from our CA.
// "host.example.com" matches a certificate whose common name or a DNS SAN is
// host.example.com. "*.example.com" matches one whose common name or a DNS
// SAN ends in ".example.com" after one label or more: a.example.com and
// a.b.example.com match, example.com does not.
//
// Names in the certificate are taken literally: a certificate issued for
// "*.example.com" matches the patterns "*.example.com" and "*" (its name
// ends in ".example.com"), not "a.example.com". An invalid pattern matches
// nothing.
func Match(pattern string, cert *x509.Certificate) bool {
	if cert == nil || ValidPattern(pattern) != nil {
		return false
	}
	if pattern == "*" {
		return true
	}
	pattern = strings.ToLower(pattern)
	suffix, wild := strings.CutPrefix(pattern, "*")
	for _, name := range append([]string{cert.Subject.CommonName}, cert.DNSNames...) {
		name = strings.ToLower(name)
		if name == "" {
			continue
		}
		if wild && len(name) > len(suffix) && strings.HasSuffix(name, suffix) || !wild && name == pattern {
			return true
		}
	}
	return false
}

// ValidPattern checks an allow-list pattern for Match, returning ErrInvalid
// with what is wrong and how a pattern looks.
func ValidPattern(pattern string) error {
	if pattern == "*" {
		return nil
	}
	if pattern == "" {
		return errorf(ErrInvalid, "empty peer pattern; use a certificate name (host.example.com), *.example.com, or * for any peer with a certificate from the CA")
	}
	if err := validName(pattern); err != nil {
		return errorf(ErrInvalid, "peer pattern %q: %v; use a certificate name (host.example.com), *.example.com, or *", pattern, err)
	}
	return nil
}
