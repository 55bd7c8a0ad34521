package daemon

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

func TestExportMatch(t *testing.T) {
	for _, tt := range []struct {
		pattern, export string
		want            bool
	}{
		{"*", "web1/disk0", true},
		{"web1", "web1/disk0", true},
		{"web1", "web1-test/disk0", false},
		{"web1", "web10/disk0", false},
		{"web1/*", "web1/disk0", true},
		{"web1/disk0", "web1/disk0", true},
		{"web1/disk0", "web1/disk1", false},
		{"*/data", "db1/data", true},
		{"*/data", "db1/root", false},
		{"web*", "web1-test/d", true},
		{"web1-test", "web1-test/d", true},
	} {
		if got := exportMatch(tt.pattern, tt.export); got != tt.want {
			t.Errorf("exportMatch(%q, %q) = %v, want %v", tt.pattern, tt.export, got, tt.want)
		}
	}
}

func TestCheckNBDAllow(t *testing.T) {
	for _, e := range []control.NBDAllowEntry{
		{Client: "", Export: "web1"},
		{Client: "a b", Export: "web1"},
		{Client: "kvm2", Export: ""},
		{Client: "kvm2", Export: "a/b/c"},
		{Client: "kvm2", Export: "/web1"},
		{Client: "kvm2", Export: "web1/"},
		{Client: "kvm2", Export: "web[1]"},
	} {
		if err := checkNBDAllow(e); !errors.Is(err, control.ErrInvalid) {
			t.Errorf("checkNBDAllow(%+v) = %v, want ErrInvalid", e, err)
		}
	}
	for _, e := range []control.NBDAllowEntry{
		{Client: "*", Export: "*"},
		{Client: "*.example.com", Export: "web1/*"},
		{Client: "kvm2", Export: "web1/disk0", ReadOnly: true},
	} {
		if err := checkNBDAllow(e); err != nil {
			t.Errorf("checkNBDAllow(%+v) = %v", e, err)
		}
	}
}

func TestNBDAllowAccessAndPersistence(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nbd-allow.json")
	a := &nbdAllowList{fs: vfs.Default, path: p}
	if err := a.load(); err != nil {
		t.Fatalf("load of a missing file: %v", err)
	}
	add := func(e control.NBDAllowEntry) {
		t.Helper()
		if err := a.change(func(l []control.NBDAllowEntry) ([]control.NBDAllowEntry, error) { return append(l, e), nil }); err != nil {
			t.Fatal(err)
		}
	}
	add(control.NBDAllowEntry{Client: "kvm2", Export: "web1"})
	add(control.NBDAllowEntry{Client: "*", Export: "db1", ReadOnly: true})
	add(control.NBDAllowEntry{Client: "backup", Export: "*", ReadOnly: true})
	add(control.NBDAllowEntry{Client: "backup", Export: "db1/data"})

	cert := func(cn string) *x509.Certificate { return &x509.Certificate{Subject: pkix.Name{CommonName: cn}} }
	b := &nbdAllowList{fs: vfs.Default, path: p} // what a restarted daemon reads
	if err := b.load(); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		cn, export string
		want       blockdev.NBDAccess
	}{
		{"kvm2", "web1/disk0", blockdev.NBDReadWrite},
		{"KVM2", "web1/disk0", blockdev.NBDReadWrite},
		{"kvm2", "web2/disk0", blockdev.NBDDeny},
		{"kvm2", "db1/data", blockdev.NBDReadOnly},
		{"stranger", "db1/data", blockdev.NBDReadOnly},
		{"stranger", "web1/disk0", blockdev.NBDDeny},
		{"backup", "web1/disk0", blockdev.NBDReadOnly},
		{"backup", "db1/data", blockdev.NBDReadWrite}, // a read-write entry wins
	} {
		if got := b.access(cert(tt.cn), tt.export); got != tt.want {
			t.Errorf("access(%s, %s) = %v, want %v", tt.cn, tt.export, got, tt.want)
		}
	}
	if got := b.access(nil, "web1/disk0"); got != blockdev.NBDDeny {
		t.Errorf("access without a certificate = %v", got)
	}

	// A damaged file is refused, not read as an empty list.
	if err := vfs.WriteFileAtomic(vfs.Default, p, []byte(`{"format":"vdrepl-nbd-allow","version":1,"crc32c":"00000000","body":{"entries":[]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := b.load(); err == nil {
		t.Fatal("load of a file with a bad checksum succeeded")
	}
}

func TestParseNBDAddrs(t *testing.T) {
	for _, tt := range []struct {
		addrs    []string
		insecure bool
		ok       bool
		tls      bool
	}{
		{[]string{"unix:/run/vdrepl/nbd.sock"}, false, true, false},
		{[]string{"tcp:0.0.0.0:10809"}, false, true, true},
		{[]string{"tcp:127.0.0.1:10809"}, true, true, false},
		{[]string{"tcp:[::1]:10809"}, true, true, false},
		{[]string{"tcp:localhost:10809"}, true, true, false},
		{[]string{"tcp:0.0.0.0:10809"}, true, false, false},
		{[]string{"tcp::10809"}, true, false, false},
		{[]string{"tcp:10.0.0.5:10809"}, true, false, false},
		{[]string{"unix:/x"}, true, false, false}, // insecure without TCP says so
		{[]string{"udp:1.2.3.4:5"}, false, false, false},
	} {
		got, err := parseNBDAddrs(tt.addrs, tt.insecure)
		if (err == nil) != tt.ok {
			t.Errorf("parseNBDAddrs(%q, insecure %v): %v", tt.addrs, tt.insecure, err)
			continue
		}
		if err != nil {
			if !errors.Is(err, control.ErrInvalid) {
				t.Errorf("parseNBDAddrs(%q): %v, want ErrInvalid", tt.addrs, err)
			}
			continue
		}
		if got[0].tls != tt.tls {
			t.Errorf("parseNBDAddrs(%q, insecure %v): tls %v, want %v", tt.addrs, tt.insecure, got[0].tls, tt.tls)
		}
	}
}

func TestListenSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := filepath.Join(dir, "nbd.sock")
	// A stale temporary socket from a crash is no obstacle.
	if err := os.WriteFile(p+".new", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := listenSocket(p, os.Getgid())
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&fs.ModeSocket == 0 || st.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want a socket with 0660", st.Mode())
	}
	if _, err := os.Stat(p + ".new"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("temporary name left behind: %v", err)
	}
	if got := l.Addr().String(); got != p {
		t.Fatalf("Addr %q, want %q", got, p)
	}
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatalf("dial the socket: %v", err)
	}
	c.Close()
	l.Close()
	if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket file left after Close: %v", err)
	}
}
