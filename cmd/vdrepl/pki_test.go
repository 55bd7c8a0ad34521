package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/internal/pki"
)

// run runs the vdrepl CLI with args as main does and returns its output.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	app := newApp()
	var out bytes.Buffer
	app.Writer, app.ErrWriter = &out, io.Discard
	err := app.Run(interspersed(app, append([]string{"vdrepl"}, args...)))
	return out.String(), err
}

func TestPKICommands(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	out, err := run(t, "pki", "init", "--dir", dir, "--name", "test")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"), "next: vdrepl pki issue --dir " + dir + " --name HOST\n"} {
		if !strings.Contains(out, want) {
			t.Fatalf("init output lacks %q:\n%s", want, out)
		}
	}

	out, err = run(t, "pki", "issue", "--dir", dir, "--name", "replica1", "--san", "10.0.0.7", "--san", "replica1.example.com")
	if err != nil {
		t.Fatal(err)
	}
	crt, key, ca := filepath.Join(dir, "replica1.crt"), filepath.Join(dir, "replica1.key"), filepath.Join(dir, "ca.crt")
	if want := "vdrepl serve --tls-cert " + crt + " --tls-key " + key + " --tls-ca " + ca + "\n"; !strings.Contains(out, want) {
		t.Fatalf("issue output lacks %q:\n%s", want, out)
	}

	// Flags may follow the file, as interspersed allows.
	out, err = run(t, "pki", "show", crt, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var shown struct {
		pki.Info
		Warnings []string `json:"warnings"`
	}
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		t.Fatalf("show --json: %v\n%s", err, out)
	}
	if shown.CommonName != "replica1" || shown.Issuer != "CN=vdrepl CA test" || !slices.Equal(shown.IPs, []string{"10.0.0.7"}) ||
		!slices.Equal(shown.DNSNames, []string{"replica1", "replica1.example.com"}) || shown.Warnings == nil || len(shown.Warnings) != 0 {
		t.Fatalf("show --json:\n%s", out)
	}

	out, err = run(t, "pki", "show", ca)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "subject:   CN=vdrepl CA test\n") || !strings.Contains(out, "CA:        yes\n") || strings.Contains(out, "warning") {
		t.Fatalf("show CA:\n%s", out)
	}

	if _, err := run(t, "pki", "issue", "--dir", dir, "--name", "soon", "--days", "10", "--rsa"); err != nil {
		t.Fatal(err)
	}
	out, err = run(t, "pki", "show", filepath.Join(dir, "soon.crt"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "key:       RSA 3072\n") || !strings.Contains(out, "usage:     serverAuth, clientAuth\n") ||
		!strings.Contains(out, "warning: certificate expires in 9 days") {
		t.Fatalf("show soon.crt:\n%s", out)
	}
}

func TestPKICommandErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := run(t, "pki", "init", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want error // nil: any error
	}{
		{[]string{"pki", "init", "--dir", dir}, pki.ErrExists},
		{[]string{"pki", "issue", "--dir", dir, "--name", "bad name"}, pki.ErrInvalid},
		{[]string{"pki", "issue", "--dir", dir, "--name", "h", "--san", "no way"}, pki.ErrInvalid},
		{[]string{"pki", "issue", "--dir", t.TempDir(), "--name", "h"}, pki.ErrNotFound},
		{[]string{"pki", "issue", "--dir", dir, "--name", "h", "--days", "0"}, nil},
		{[]string{"pki", "issue", "--dir", dir}, nil}, // --name is required
		{[]string{"pki", "show", filepath.Join(dir, "ca.key")}, pki.ErrInvalid},
		{[]string{"pki", "show", filepath.Join(dir, "nope.crt")}, nil},
		{[]string{"pki", "show"}, nil},
	} {
		_, err := run(t, tc.args...)
		if err == nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%q: error %v, want %v", tc.args, err, tc.want)
		}
	}
}
