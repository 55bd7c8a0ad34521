package pki

import (
	"bytes"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

func mustInit(t *testing.T, dir string, opt InitOptions) Files {
	t.Helper()
	f, err := Init(dir, opt)
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	return f
}

func mustIssue(t *testing.T, dir, name string, opt IssueOptions) Files {
	t.Helper()
	f, err := Issue(dir, name, opt)
	if err != nil {
		t.Fatalf("Issue %s: %v", name, err)
	}
	return f
}

func describeFile(t *testing.T, name string) Info {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	i, err := Describe(b)
	if err != nil {
		t.Fatalf("Describe %s: %v", name, err)
	}
	return i
}

func wantIs(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want %v", err, target)
	}
}

func wantMode(t *testing.T, name string, want os.FileMode) {
	t.Helper()
	st, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != want {
		t.Fatalf("%s has mode %v, want %v", name, st.Mode().Perm(), want)
	}
}

func TestInitIssueDescribe(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	ca := mustInit(t, dir, InitOptions{Name: "test"})
	if ca.Cert != filepath.Join(dir, "ca.crt") || ca.Key != filepath.Join(dir, "ca.key") || ca.CA != ca.Cert {
		t.Fatalf("Init files %+v", ca)
	}
	wantMode(t, dir, 0o700)
	wantMode(t, ca.Key, 0o600)
	ci := describeFile(t, ca.Cert)
	if !ci.IsCA || ci.CommonName != "vdrepl CA test" || ci.Subject != "CN=vdrepl CA test" || ci.KeyType != "ECDSA P-256" {
		t.Fatalf("CA info %+v", ci)
	}
	if life := ci.NotAfter.Sub(ci.NotBefore); life < DefaultCAValidity || life > DefaultCAValidity+time.Hour {
		t.Fatalf("CA valid for %v", life)
	}

	start := time.Now()
	f := mustIssue(t, dir, "host1", IssueOptions{SANs: []string{"10.0.0.5", "host1.example.com", "::1", "HOST1"}})
	if f.Cert != filepath.Join(dir, "host1.crt") || f.Key != filepath.Join(dir, "host1.key") || f.CA != ca.Cert {
		t.Fatalf("Issue files %+v", f)
	}
	wantMode(t, f.Key, 0o600)
	i := describeFile(t, f.Cert)
	if i.IsCA || i.CommonName != "host1" || i.Issuer != "CN=vdrepl CA test" || i.KeyType != "ECDSA P-256" ||
		!slices.Equal(i.DNSNames, []string{"host1", "host1.example.com"}) ||
		!slices.Equal(i.IPs, []string{"10.0.0.5", "::1"}) ||
		!slices.Equal(i.EKU, []string{"serverAuth", "clientAuth"}) {
		t.Fatalf("host info %+v", i)
	}
	if want := start.Add(DefaultHostValidity); i.NotAfter.Before(want.Add(-time.Second)) || i.NotAfter.After(want.Add(time.Minute)) {
		t.Fatalf("NotAfter %v, want about %v", i.NotAfter, want)
	}
	if i.ExpiresWithin(DefaultHostValidity-time.Hour, start) || !i.ExpiresWithin(DefaultHostValidity+time.Hour, start) {
		t.Fatalf("ExpiresWithin wrong around NotAfter %v", i.NotAfter)
	}
	if w := i.Warnings(time.Now()); len(w) != 0 {
		t.Fatalf("warnings for a fresh certificate: %q", w)
	}

	id, err := Load(f.Cert, f.Key, f.CA)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if id.Name() != "host1" || id.Leaf().KeyUsage != x509.KeyUsageDigitalSignature {
		t.Fatalf("Name %q, KeyUsage %v", id.Name(), id.Leaf().KeyUsage)
	}
	if w := id.Warnings(time.Now()); len(w) != 0 {
		t.Fatalf("warnings for a fresh identity: %q", w)
	}
}

func TestIssueRSA(t *testing.T) {
	dir := t.TempDir()
	mustInit(t, dir, InitOptions{Name: "test"})
	f := mustIssue(t, dir, "rsa-host", IssueOptions{RSA: true, Validity: 48 * time.Hour})
	id, err := Load(f.Cert, f.Key, f.CA)
	if err != nil {
		t.Fatal(err)
	}
	i := describe(id.Leaf())
	if i.KeyType != "RSA 3072" || id.Leaf().KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Fatalf("key %s, usage %v", i.KeyType, id.Leaf().KeyUsage)
	}
	if life := i.NotAfter.Sub(i.NotBefore); life != 48*time.Hour+backdate {
		t.Fatalf("valid for %v", life)
	}
}

func TestRefuseOverwrite(t *testing.T) {
	dir := t.TempDir()
	ca := mustInit(t, dir, InitOptions{Name: "test"})
	caBefore, _ := os.ReadFile(ca.Cert)
	_, err := Init(dir, InitOptions{Name: "test"})
	wantIs(t, err, ErrExists)
	if after, _ := os.ReadFile(ca.Cert); string(after) != string(caBefore) {
		t.Fatal("second Init changed ca.crt")
	}

	f := mustIssue(t, dir, "host1", IssueOptions{})
	keyBefore, _ := os.ReadFile(f.Key)
	_, err = Issue(dir, "host1", IssueOptions{})
	wantIs(t, err, ErrExists)
	if after, _ := os.ReadFile(f.Key); string(after) != string(keyBefore) {
		t.Fatal("second Issue changed host1.key")
	}

	// Half a pair is refused too.
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "ca.key"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Init(other, InitOptions{Name: "test"})
	wantIs(t, err, ErrExists)
	if err := os.WriteFile(filepath.Join(dir, "host2.crt"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Issue(dir, "host2", IssueOptions{})
	wantIs(t, err, ErrExists)
	if _, err := os.Stat(filepath.Join(dir, "host2.key")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused Issue left host2.key: %v", err)
	}
}

func TestIssueWithoutCA(t *testing.T) {
	_, err := Issue(t.TempDir(), "host1", IssueOptions{})
	wantIs(t, err, ErrNotFound)
	if !strings.Contains(err.Error(), "vdrepl pki init") {
		t.Fatalf("error does not say what to do: %v", err)
	}
}

func TestNames(t *testing.T) {
	dir := t.TempDir()
	mustInit(t, dir, InitOptions{Name: "test"})
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + ".example.com"
	for _, name := range []string{"host1", "Host-1.example.com", "under_score", "*.example.com", "10.0.0.5", long} {
		t.Run("good/"+name, func(t *testing.T) {
			f := mustIssue(t, dir, name, IssueOptions{})
			id, err := Load(f.Cert, f.Key, f.CA)
			if err != nil {
				t.Fatal(err)
			}
			if id.Name() != name {
				t.Fatalf("Name %q", id.Name())
			}
		})
	}
	for _, name := range []string{"", "a b", "../x", "a/b", "a..b", ".a", "a.", "a.*.b", "x*", "*x.com", "ca", "CA", "é", strings.Repeat("a.", 127)} {
		t.Run("bad/"+name, func(t *testing.T) {
			_, err := Issue(dir, name, IssueOptions{})
			wantIs(t, err, ErrInvalid)
		})
	}
	for _, san := range []string{"a b", "a..b", "", "fe80::1%eth0/64"} {
		if _, err := Issue(dir, "sanhost", IssueOptions{SANs: []string{san}}); !errors.Is(err, ErrInvalid) {
			t.Fatalf("SAN %q: %v, want %v", san, err, ErrInvalid)
		}
	}
	for _, name := range []string{"bad\nname", strings.Repeat("x", 55)} {
		_, err := Init(t.TempDir(), InitOptions{Name: name})
		wantIs(t, err, ErrInvalid)
	}
}

func TestDescribeErrors(t *testing.T) {
	dir := t.TempDir()
	f := mustInit(t, dir, InitOptions{Name: "test"})
	key, _ := os.ReadFile(f.Key)
	for _, in := range [][]byte{nil, []byte("not pem"), key} {
		_, err := Describe(in)
		wantIs(t, err, ErrInvalid)
	}
}

// TestWarnings issues certificates dated in the past so that they expire
// soon, and checks that the identity warns about each.
func TestWarnings(t *testing.T) {
	day := 24 * time.Hour
	t.Run("host", func(t *testing.T) {
		dir := t.TempDir()
		t0 := time.Now().Add(-(DefaultHostValidity - 12*day)).Truncate(time.Second)
		then := func() time.Time { return t0 }
		mustInit(t, dir, InitOptions{Name: "test", Now: then})
		f := mustIssue(t, dir, "soon", IssueOptions{Now: then})
		id, err := Load(f.Cert, f.Key, f.CA)
		if err != nil {
			t.Fatal(err)
		}
		w := id.Warnings(t0.Add(DefaultHostValidity - 12*day))
		want := "certificate " + f.Cert + " expires in 12 days (" + day0(t0.Add(DefaultHostValidity)) + "); issue a new one with `vdrepl pki issue`"
		if len(w) != 1 || w[0] != want {
			t.Fatalf("warnings %q, want %q", w, want)
		}
		if w := id.Warnings(t0.Add(DefaultHostValidity - 31*day)); len(w) != 0 {
			t.Fatalf("warnings 31 days before expiry: %q", w)
		}
	})
	t.Run("CA", func(t *testing.T) {
		// The host certificate is cut at the CA's expiry, so both warn.
		dir := t.TempDir()
		t0 := time.Now().Add(-20 * day).Truncate(time.Second)
		then := func() time.Time { return t0 }
		ca := mustInit(t, dir, InitOptions{Name: "test", Validity: 40 * day, Now: then})
		f := mustIssue(t, dir, "host", IssueOptions{Now: then})
		id, err := Load(f.Cert, f.Key, f.CA)
		if err != nil {
			t.Fatal(err)
		}
		if !id.Leaf().NotAfter.Equal(t0.Add(40 * day)) {
			t.Fatalf("host certificate expires %v, want the CA's expiry %v", id.Leaf().NotAfter, t0.Add(40*day))
		}
		w := id.Warnings(t0.Add(20 * day))
		if len(w) != 2 || !strings.HasPrefix(w[0], "certificate "+f.Cert+" expires in 20 days") ||
			!strings.HasPrefix(w[1], "CA certificate "+ca.Cert+" expires in 20 days") || !strings.Contains(w[1], "vdrepl pki init") {
			t.Fatalf("warnings %q", w)
		}
		if w := describe(id.Leaf()).Warnings(t0.Add(41 * day)); len(w) != 1 || !strings.Contains(w[0], "expired on") {
			t.Fatalf("Info warnings after expiry: %q", w)
		}
	})
	t.Run("CA expired", func(t *testing.T) {
		dir := t.TempDir()
		then := func() time.Time { return time.Now().Add(-50 * day) }
		mustInit(t, dir, InitOptions{Name: "test", Validity: 40 * day, Now: then})
		_, err := Issue(dir, "host", IssueOptions{})
		wantIs(t, err, ErrExpired)
	})
}

func day0(t time.Time) string { return t.UTC().Format("2006-01-02") }

// TestWriteFaults fails every filesystem call that Init and Issue make, one
// at a time: each failure must be reported, must leave nothing that stops a
// second attempt, and a success must survive a crash whole.
func TestWriteFaults(t *testing.T) {
	ops := []vfs.Op{vfs.OpOpen, vfs.OpWrite, vfs.OpRead, vfs.OpSync, vfs.OpSyncDir, vfs.OpRename,
		vfs.OpRemove, vfs.OpMkdir, vfs.OpClose, vfs.OpStat}
	steps := []struct {
		name  string
		setup func(t *testing.T, m *vfs.MemFS)
		run   func(fsys vfs.FS) (Files, error)
	}{
		{"init", func(*testing.T, *vfs.MemFS) {}, func(fsys vfs.FS) (Files, error) {
			return initCA(fsys, "etc/pki", InitOptions{Name: "test"})
		}},
		{"issue", func(t *testing.T, m *vfs.MemFS) {
			if _, err := initCA(m, "etc/pki", InitOptions{Name: "test"}); err != nil {
				t.Fatal(err)
			}
		}, func(fsys vfs.FS) (Files, error) {
			return issue(fsys, "etc/pki", "host1", IssueOptions{})
		}},
	}
	for _, step := range steps {
		for _, op := range ops {
			t.Run(step.name+"/"+op.String(), func(t *testing.T) {
				for n := 0; ; n++ {
					m := vfs.NewMemFS()
					step.setup(t, m)
					e := vfs.NewErrorFS(m)
					e.InjectAfter(op, n, vfs.ErrInjected)
					files, err := step.run(e)
					reached := e.Count(op) > int64(n)
					if err != nil {
						if !reached || !errors.Is(err, vfs.ErrInjected) {
							t.Fatalf("call %d failed: %v", n, err)
						}
						if files, err = step.run(m); err != nil {
							t.Fatalf("call %d failed, then a retry: %v", n, err)
						}
					}
					checkPair(t, m.CrashClone(), files)
					if !reached {
						if n == 0 {
							t.Skipf("%s makes no %v call", step.name, op)
						}
						return
					}
				}
			})
		}
	}
}

// checkPair checks that files are on fsys and that the key belongs to
// the certificate.
func checkPair(t *testing.T, fsys vfs.FS, files Files) {
	t.Helper()
	certPEM, err := vfs.ReadFile(fsys, files.Cert)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := vfs.ReadFile(fsys, files.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := parseCert(files.Cert, certPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := parseKey(files.Key, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if err := matchKey(cert, files.Cert, key, files.Key); err != nil {
		t.Fatal(err)
	}
}

func TestIssueClientAndExport(t *testing.T) {
	dir := t.TempDir()
	mustInit(t, dir, InitOptions{Name: "test"})
	files := mustIssue(t, dir, "qemu-host7", IssueOptions{Client: true})
	info := describeFile(t, files.Cert)
	if !slices.Equal(info.EKU, []string{"clientAuth"}) {
		t.Fatalf("client certificate usage %q, want clientAuth only", info.EKU)
	}
	if w := info.Warnings(time.Now()); len(w) != 0 {
		t.Fatalf("warnings for a fresh client certificate: %q", w)
	}
	// A client certificate is no host identity.
	if _, err := Load(files.Cert, files.Key, files.CA); !errors.Is(err, ErrUsage) {
		t.Fatalf("Load of a client certificate: %v, want ErrUsage", err)
	}

	out := filepath.Join(t.TempDir(), "qemu", "tls")
	cf, err := ExportClient(dir, "qemu-host7", out)
	if err != nil {
		t.Fatal(err)
	}
	for name, src := range map[string]string{cf.CA: files.CA, cf.Cert: files.Cert, cf.Key: files.Key} {
		got, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(src)
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from %s", name, src)
		}
	}
	if filepath.Base(cf.CA) != "ca-cert.pem" || filepath.Base(cf.Cert) != "client-cert.pem" || filepath.Base(cf.Key) != "client-key.pem" {
		t.Fatalf("layout %+v", cf)
	}
	wantMode(t, cf.Key, 0o600)
	wantMode(t, out, 0o700)
	// Exporting again replaces the files.
	if _, err := ExportClient(dir, "qemu-host7", out); err != nil {
		t.Fatalf("second export: %v", err)
	}

	// A pair from another CA, or a missing one, is refused before anything is written.
	other := t.TempDir()
	mustInit(t, other, InitOptions{Name: "other"})
	mustIssue(t, other, "stranger", IssueOptions{Client: true})
	for _, f := range []string{"stranger.crt", "stranger.key"} {
		b, _ := os.ReadFile(filepath.Join(other, f))
		os.WriteFile(filepath.Join(dir, f), b, 0o600)
	}
	out2 := filepath.Join(t.TempDir(), "x")
	if _, err := ExportClient(dir, "stranger", out2); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("export of another CA's certificate: %v, want ErrUntrusted", err)
	}
	if _, err := ExportClient(dir, "nobody", out2); !errors.Is(err, ErrNotFound) {
		t.Fatalf("export of a missing certificate: %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(out2); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused export left %s behind (%v)", out2, err)
	}
}
