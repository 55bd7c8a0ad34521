package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// freePort is a TCP port on 127.0.0.1 that nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// tlsHost is a daemon with an NBD TLS listener, and client certificate
// directories laid out by `vdrepl pki export`.
type tlsHost struct {
	*host
	port    int
	pki     string
	clients map[string]string // client name -> its directory (ca-cert.pem, ...)
}

func newTLSHost(t *testing.T) *tlsHost {
	t.Helper()
	need(t, "nbdinfo", "qemu-io", "qemu-img")
	th := &tlsHost{pki: t.TempDir(), clients: map[string]string{}, port: freePort(t)}
	vdrepl(t, "pki", "init", "--dir", th.pki)
	vdrepl(t, "pki", "issue", "--dir", th.pki, "--name", "nbd.test", "--san", "127.0.0.1")
	th.host = newHost(t, append(tlsFlags(th.pki, "nbd.test"), "--nbd", fmt.Sprintf("tcp:127.0.0.1:%d", th.port))...)
	for _, c := range []string{"kvm2", "backup", "stranger"} {
		vdrepl(t, "pki", "issue", "--dir", th.pki, "--client", c)
		th.clients[c] = filepath.Join(t.TempDir(), c)
		vdrepl(t, "pki", "export", "--dir", th.pki, "--client", c, "--qemu", th.clients[c])
	}
	return th
}

// nbds is a libnbd URI of an export over TLS as client.
func (th *tlsHost) nbds(export, client string) string {
	return fmt.Sprintf("nbds://127.0.0.1:%d/%s?tls-certificates=%s", th.port, export, th.clients[client])
}

// qemuArgs are qemu-io/qemu-img arguments that open an export over TLS.
func (th *tlsHost) qemuArgs(export, client string) []string {
	return []string{
		"--object", "tls-creds-x509,id=tls0,dir=" + th.clients[client] + ",endpoint=client",
		"--image-opts", fmt.Sprintf("driver=nbd,host=127.0.0.1,port=%d,export=%s,tls-creds=tls0", th.port, export),
	}
}

// listExports is what `nbdinfo --list` shows the client.
func (th *tlsHost) listExports(t *testing.T, client string) ([]string, error) {
	t.Helper()
	out, err := exec.Command("nbdinfo", "--list", "--json", th.nbds("", client)).Output()
	if err != nil {
		return nil, err
	}
	var info struct {
		Exports []struct {
			Name string `json:"export-name"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	var names []string
	for _, e := range info.Exports {
		names = append(names, e.Name)
	}
	slices.Sort(names)
	return names, nil
}

func TestNBDTLSRealClients(t *testing.T) {
	th := newTLSHost(t)
	img := th.addVM("web1", "64M")
	th.run("vm", "add", "db1", "--disk", "data="+filepath.Join(t.TempDir(), "data.img")+":16M")
	th.run("nbd", "allow", "add", "--client", "kvm2", "--export", "web1")
	th.run("nbd", "allow", "add", "--client", "backup", "--export", "db1/*", "--read-only")

	t.Run("qemu-io writes over TLS", func(t *testing.T) {
		sh(t, "qemu-io", append(th.qemuArgs("web1/disk0", "kvm2"), "-c", "write -P 0xab 0 1M", "-c", "flush")...)
		// What the TLS client wrote is what the unix socket reads.
		sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", th.uri("web1/disk0"))
	})

	t.Run("qemu-img convert over TLS", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "copy.raw")
		sh(t, "qemu-img", append(append([]string{"convert"}, th.qemuArgs("web1/disk0", "kvm2")...), "-O", "raw", out)...)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		th.run("vm", "seal", "web1") // the image holds what the journal does once written back
		want := exportBytes(t, th.host, "web1/disk0")
		if !bytes.Equal(got, want) {
			t.Fatalf("qemu-img convert over TLS (%d bytes) differs from the export read over the socket (%d)", len(got), len(want))
		}
		_ = img
	})

	t.Run("each client lists only what it may open", func(t *testing.T) {
		for client, want := range map[string][]string{
			"kvm2":     {"web1/disk0"},
			"backup":   {"db1/data"},
			"stranger": nil,
		} {
			got, err := th.listExports(t, client)
			if err != nil {
				t.Fatalf("%s: nbdinfo --list: %v", client, err)
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s: nbdinfo --list shows %q, want %q", client, got, want)
			}
		}
	})

	t.Run("refused clients learn nothing", func(t *testing.T) {
		// Another CA's certificate under an allowed name: the client
		// trusts our server, the server does not trust it.
		other := t.TempDir()
		vdrepl(t, "pki", "init", "--dir", other)
		vdrepl(t, "pki", "issue", "--dir", other, "--client", "kvm2")
		forged := filepath.Join(t.TempDir(), "forged")
		vdrepl(t, "pki", "export", "--dir", other, "--client", "kvm2", "--libnbd", forged)
		copyFile(t, filepath.Join(th.pki, "ca.crt"), filepath.Join(forged, "ca-cert.pem"))
		th.clients["forged"] = forged
		// No certificate at all: only the CA, to trust the server.
		none := filepath.Join(t.TempDir(), "none")
		os.MkdirAll(none, 0o700)
		copyFile(t, filepath.Join(th.pki, "ca.crt"), filepath.Join(none, "ca-cert.pem"))
		th.clients["none"] = none

		for _, client := range []string{"forged", "none"} {
			if out, err := runOut("nbdinfo", th.nbds("web1/disk0", client)); err == nil {
				t.Errorf("%s: nbdinfo over TLS succeeded:\n%s", client, out)
			}
			if names, err := th.listExports(t, client); err == nil || len(names) > 0 {
				t.Errorf("%s: nbdinfo --list = %q, %v; want a refusal", client, names, err)
			}
			if out, err := runOut("qemu-img", append([]string{"info"}, th.qemuArgs("web1/disk0", client)...)...); err == nil {
				t.Errorf("%s: qemu-img info over TLS succeeded:\n%s", client, out)
			}
		}
		// A good certificate without an entry: an existing export and a
		// missing one are refused alike.
		existing, err1 := runOut("nbdinfo", th.nbds("web1/disk0", "stranger"))
		missing, err2 := runOut("nbdinfo", th.nbds("nosuch/disk", "stranger"))
		if err1 == nil || err2 == nil {
			t.Fatalf("stranger opened an export: %v %v\n%s\n%s", err1, err2, existing, missing)
		}
		if strings.ReplaceAll(existing, "web1/disk0", "X") != strings.ReplaceAll(missing, "nosuch/disk", "X") {
			t.Errorf("refusals differ for an existing and a missing export:\n%s\n%s", existing, missing)
		}
		if strings.Contains(existing, "size") {
			t.Errorf("refusal tells of the export:\n%s", existing)
		}
		// Plain NBD on the TLS listener is refused.
		if out, err := runOut("nbdinfo", fmt.Sprintf("nbd://127.0.0.1:%d/web1/disk0", th.port)); err == nil {
			t.Errorf("plain nbdinfo on the TLS listener succeeded:\n%s", out)
		}
		if out, err := runOut("qemu-img", "info", "-f", "raw", fmt.Sprintf("nbd://127.0.0.1:%d/web1/disk0", th.port)); err == nil {
			t.Errorf("plain qemu-img on the TLS listener succeeded:\n%s", out)
		}
	})

	t.Run("read-only entry refuses writes", func(t *testing.T) {
		out := sh(t, "nbdinfo", "--json", th.nbds("db1/data", "backup"))
		if !strings.Contains(out, `"is_read_only": true`) {
			t.Errorf("backup sees db1/data writable:\n%s", out)
		}
		out, _ = runOut("qemu-io", append(th.qemuArgs("db1/data", "backup"), "-c", "write -P 0xcd 0 64k")...)
		if !strings.Contains(out, "read-only") && !strings.Contains(out, "ermission denied") {
			t.Errorf("write on a read-only entry was not refused:\n%s", out)
		}
		t.Logf("qemu-io write as backup: %s", out)
		sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", th.uri("db1/data"))
	})

	t.Run("allow-list changes apply without restart", func(t *testing.T) {
		var list []map[string]any
		if err := json.Unmarshal([]byte(th.run("nbd", "allow", "list", "--json")), &list); err != nil || len(list) != 2 {
			t.Fatalf("nbd allow list --json: %v %v", err, list)
		}
		th.run("nbd", "allow", "add", "--client", "stranger", "--export", "db1/data")
		if got, _ := th.listExports(t, "stranger"); !slices.Equal(got, []string{"db1/data"}) {
			t.Fatalf("after add, stranger lists %q", got)
		}
		th.run("nbd", "allow", "remove", "--client", "kvm2", "--export", "web1")
		if out, err := runOut("nbdinfo", th.nbds("web1/disk0", "kvm2")); err == nil {
			t.Fatalf("kvm2 still opens web1/disk0 after its entry was removed:\n%s", out)
		}
		if _, errOut, err := th.try("nbd", "allow", "remove", "--client", "kvm2", "--export", "web1"); err == nil || !strings.Contains(errOut, "no NBD allow-list entry") {
			t.Errorf("removing a missing entry: %v %s", err, errOut)
		}
		if _, errOut, err := th.try("nbd", "allow", "add", "--client", "kvm2", "--export", "a/b/c"); err == nil || !strings.Contains(errOut, "--export") {
			t.Errorf("a bad export pattern: %v %s", err, errOut)
		}
		// The list survives a restart.
		th.stop()
		th.start()
		if got, _ := th.listExports(t, "stranger"); !slices.Equal(got, []string{"db1/data"}) {
			t.Fatalf("after restart, stranger lists %q", got)
		}
	})
}

// lockedBuffer is an output buffer a test may read while a command writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestNBDSocketGroup checks that the unix socket admits its group and no
// one else, as an unprivileged user would try.
func TestNBDSocketGroup(t *testing.T) {
	need(t, "nbdinfo", "setpriv")
	if os.Geteuid() != 0 {
		t.Skip("needs root to run clients as another user")
	}
	// A directory every user may enter, unlike t.TempDir's.
	dir, err := os.MkdirTemp("", "vdrepl-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "nbd.sock")
	h := newHost(t, "--nbd", "unix:"+sock, "--nbd-group", "nogroup")
	h.addVM("web1", "16M")

	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %#o, want 0660", st.Mode().Perm())
	}
	if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 0 {
		t.Errorf("socket owner %d, want root", sys.Uid)
	}
	uri := "nbd+unix:///web1/disk0?socket=" + sock
	as := func(group string) (string, error) {
		return runOut("setpriv", "--reuid=nobody", "--regid="+group, "--clear-groups", "nbdinfo", uri)
	}
	if out, err := as("nogroup"); err != nil {
		t.Errorf("a member of the socket's group cannot connect: %v\n%s", err, out)
	}
	if out, err := as("daemon"); err == nil {
		t.Errorf("a user outside the socket's group connected:\n%s", out)
	}
	// The state directory's own socket is out of reach of other users too.
	if out, err := runOut("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "nbdinfo", h.uri("web1/disk0")); err == nil {
		t.Errorf("nobody connected to %s:\n%s", h.sock, out)
	}
}

// TestNBDListenerRules checks serve's refusals: plain TCP off loopback, TCP
// without TLS flags; and that plain TCP on loopback works when named.
func TestNBDListenerRules(t *testing.T) {
	need(t, "nbdinfo")
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"insecure on all addresses", []string{"--nbd", "tcp:0.0.0.0:10999", "--nbd-insecure"}, "loopback"},
		{"insecure on another address", []string{"--nbd", "tcp:192.0.2.1:10999", "--nbd-insecure"}, "loopback"},
		{"TCP without TLS", []string{"--nbd", "tcp:127.0.0.1:10999"}, "--tls-cert"},
		{"unknown group", []string{"--nbd-group", "no-such-group-here"}, "--nbd-group"},
	} {
		state := t.TempDir()
		cmd := exec.Command(vdreplBin, append([]string{"--state", state, "serve"}, tt.args...)...)
		done := make(chan struct{})
		var out []byte
		var err error
		go func() { out, err = cmd.CombinedOutput(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Fatalf("%s: serve did not refuse", tt.name)
		}
		if err == nil || !strings.Contains(string(out), tt.want) {
			t.Errorf("%s: serve exited with %v, want a refusal naming %s:\n%s", tt.name, err, tt.want, out)
		}
	}

	port := freePort(t)
	h := newHost(t, "--nbd", fmt.Sprintf("tcp:127.0.0.1:%d", port), "--nbd-insecure")
	h.addVM("web1", "16M")
	sh(t, "nbdinfo", fmt.Sprintf("nbd://127.0.0.1:%d/web1/disk0", port))
}

// TestNBDTLSFailoverExports: over NBD TLS, a test failover's export is
// served to a client allowed on it, and a planned failover's write gate
// holds for a TLS client that keeps the disk open (its writes fail once
// the VM is being handed over; what it wrote before arrives).
func TestNBDTLSFailoverExports(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	dir := t.TempDir()
	vdrepl(t, "pki", "init", "--dir", dir)
	vdrepl(t, "pki", "issue", "--dir", dir, "--name", "primary.test", "--san", "127.0.0.1")
	vdrepl(t, "pki", "issue", "--dir", dir, "--name", "replica.test", "--san", "127.0.0.1")
	vdrepl(t, "pki", "issue", "--dir", dir, "--client", "kvm2")
	creds := filepath.Join(t.TempDir(), "kvm2")
	vdrepl(t, "pki", "export", "--dir", dir, "--client", "kvm2", "--qemu", creds)
	pa, pb := freePort(t), freePort(t)
	common := []string{"--replica-listen", "127.0.0.1:0", "--retry-scale", "0.0005"}
	a := &tlsHost{host: newHost(t, append(append(tlsFlags(dir, "primary.test"), common...), "--nbd", fmt.Sprintf("tcp:127.0.0.1:%d", pa))...),
		port: pa, pki: dir, clients: map[string]string{"kvm2": creds}}
	b := &tlsHost{host: newHost(t, append(append(tlsFlags(dir, "replica.test"), common...), "--nbd", fmt.Sprintf("tcp:127.0.0.1:%d", pb))...),
		port: pb, pki: dir, clients: map[string]string{"kvm2": creds}}
	a.run("replica", "allow", "add", "--primary", "replica.test", "--storage", filepath.Join(t.TempDir(), "on-a"))
	b.run("replica", "allow", "add", "--primary", "primary.test", "--storage", filepath.Join(t.TempDir(), "on-b"))
	for _, h := range []*tlsHost{a, b} {
		h.run("nbd", "allow", "add", "--client", "kvm2", "--export", "vm1")
	}
	b.run("nbd", "allow", "add", "--client", "kvm2", "--export", "vm1-test", "--read-only")

	a.addVM("vm1", "16M")
	sh(t, "qemu-io", append(a.qemuArgs("vm1/disk0", "kvm2"), "-c", "write -P 0x41 0 1M", "-c", "flush")...)
	a.run("replication", "enable", "vm1", "--replica", listenAddr(t, b.host), "--frequency", "1h")
	a.run("replication", "sync", "vm1")

	t.Run("test failover export", func(t *testing.T) {
		b.run("failover", "test", "vm1")
		if got, err := b.listExports(t, "kvm2"); err != nil || !slices.Contains(got, "vm1-test/disk0") {
			t.Fatalf("kvm2 lists %q (%v) on the replica during a test failover", got, err)
		}
		sh(t, "qemu-io", append(b.qemuArgs("vm1-test/disk0", "kvm2"), "-r", "-c", "read -P 0x41 0 1M")...)
		b.run("failover", "stop-test", "vm1")
		if out, err := runOut("nbdinfo", b.nbds("vm1-test/disk0", "kvm2")); err == nil {
			t.Fatalf("the test export is still served after stop-test:\n%s", out)
		}
	})

	t.Run("planned failover gate", func(t *testing.T) {
		// A TLS client keeps vm1/disk0 open on A through the handover.
		cmd := exec.Command("qemu-io", a.qemuArgs("vm1/disk0", "kvm2")...)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out := &lockedBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		fmt.Fprintln(stdin, "write -P 0x5e 1M 64k")
		fmt.Fprintln(stdin, "flush")
		waitFor(t, "the TLS client's write", func() bool { return strings.Count(out.String(), "wrote") >= 1 })
		done := background(a.host, "failover", "planned", "vm1", "--force")
		waitFor(t, "B to serve vm1", func() bool { _, ok := vmList(t, b.host)["vm1"]; return ok })
		fmt.Fprintln(stdin, "write -P 0x6f 0 4k")
		fmt.Fprintln(stdin, "flush")
		fmt.Fprintln(stdin, "quit")
		stdin.Close()
		cmd.Wait()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		t.Logf("qemu-io on A through the handover:\n%s", out.String())
		if strings.Count(out.String(), "wrote") != 1 {
			t.Errorf("the write after the handover went through:\n%s", out.String())
		}
		// B serves vm1 over TLS with what was written before the handover.
		sh(t, "qemu-io", append(b.qemuArgs("vm1/disk0", "kvm2"), "-c", "read -P 0x5e 1M 64k", "-c", "read -P 0x41 0 4k")...)
		if out, err := runOut("nbdinfo", a.nbds("vm1/disk0", "kvm2")); err == nil {
			t.Errorf("A still serves vm1 after handing it over:\n%s", out)
		}
	})
}
