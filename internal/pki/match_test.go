package pki

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"testing"
)

func TestMatch(t *testing.T) {
	host := &x509.Certificate{Subject: pkix.Name{CommonName: "Host1.Example.com"}, DNSNames: []string{"host1.example.com", "alias.example.org"}}
	cnOnly := &x509.Certificate{Subject: pkix.Name{CommonName: "db1"}}
	sanOnly := &x509.Certificate{DNSNames: []string{"replica.dc2.example.net"}}
	wildcard := &x509.Certificate{Subject: pkix.Name{CommonName: "*.example.com"}, DNSNames: []string{"*.example.com"}}
	for _, tc := range []struct {
		pattern string
		cert    *x509.Certificate
		want    bool
	}{
		{"*", host, true},
		{"*", sanOnly, true},
		{"*", nil, false},
		{"host1.example.com", host, true},
		{"HOST1.EXAMPLE.COM", host, true},    // case-insensitive
		{"alias.example.org", host, true},    // a SAN, not the CN
		{"host1.example.org", host, false},   // not a name of it
		{"host1", host, false},               // no prefix matches
		{"example.com", host, false},         // nor suffixes
		{"ost1.example.com", host, false},    // nor substrings
		{"*.example.com", host, true},        // one label before
		{"*.EXAMPLE.org", host, true},        // via a SAN, any case
		{"*.com", host, true},                // several labels before
		{"*.host1.example.com", host, false}, // needs a label before host1
		{"*.example.net", host, false},
		{"db1", cnOnly, true},
		{"*.db1", cnOnly, false},
		{"db2", cnOnly, false},
		{"replica.dc2.example.net", sanOnly, true},
		{"*.example.net", sanOnly, true},
		{"*.dc2.example.net", sanOnly, true},
		{"*.dc1.example.net", sanOnly, false},
		{"*.example.com", wildcard, true},  // names are literal
		{"a.example.com", wildcard, false}, // a wildcard certificate is not every host
		{"", host, false},                  // invalid patterns match nothing
		{"host1.*.com", host, false},
		{"*example.com", host, false},
		{"host1.example.com.", host, false},
	} {
		if got := Match(tc.pattern, tc.cert); got != tc.want {
			name := "<nil>"
			if tc.cert != nil {
				name = certName(tc.cert)
			}
			t.Errorf("Match(%q, %s) = %v, want %v", tc.pattern, name, got, tc.want)
		}
	}
}

func TestValidPattern(t *testing.T) {
	for _, p := range []string{"*", "host1", "host1.example.com", "*.example.com", "Under_score.x", "10.0.0.5"} {
		if err := ValidPattern(p); err != nil {
			t.Errorf("ValidPattern(%q): %v", p, err)
		}
	}
	for _, p := range []string{"", "**", "*.", "a.*.com", "*example.com", "host one", "a..b", ".a", "a/b", "10.0.0.0/8"} {
		if err := ValidPattern(p); !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidPattern(%q) = %v, want %v", p, err, ErrInvalid)
		}
	}
}
