package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var vdreplBin string

func TestMain(m *testing.M) {
	// A host's /etc/vdrepl/vdrepl.toml must not reach the test daemons.
	os.Setenv("VDREPL_CONFIG", "/dev/null")
	dir, err := os.MkdirTemp("", "vdrepl-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	vdreplBin = filepath.Join(dir, "vdrepl")
	args := []string{"build", "-o", vdreplBin}
	if os.Getenv("VDREPL_E2E_RACE") != "" {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/vdrepl")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build vdrepl:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need skips the test when a tool is missing on a developer's machine; under
// CI (CI=true) a missing tool fails it, so nothing is skipped silently there.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is not installed (CI installs it in .ci/run)", tool)
			}
			t.Skipf("%s is not installed; `make deps` installs the test tools", tool)
		}
	}
}

// host is one vdrepl daemon with its own state directory.
type host struct {
	t      *testing.T
	state  string
	sock   string // NBD unix socket
	cmd    *exec.Cmd
	exited chan struct{}
	log    *logBuffer
	extra  []string
}

// logBuffer is a daemon's output: written by exec's copying goroutine
// while a test may read it.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newHost(t *testing.T, extra ...string) *host {
	t.Helper()
	need(t)
	state := t.TempDir()
	h := &host{t: t, state: state, sock: filepath.Join(state, "nbd.sock"), extra: extra}
	h.start()
	t.Cleanup(h.stop)
	return h
}

func (h *host) start() {
	h.t.Helper()
	args := append([]string{"--state", h.state, "serve", "--nbd", "unix:" + h.sock, "--log-level", "debug"}, h.extra...)
	h.cmd = exec.Command(vdreplBin, args...)
	h.log = &logBuffer{}
	h.cmd.Stdout, h.cmd.Stderr = h.log, h.log
	if err := h.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	exited := make(chan struct{})
	h.exited = exited
	go func() { h.cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-exited:
			h.t.Fatalf("daemon exited during start-up:\n%s", h.log)
		default:
		}
		if c, err := net.Dial("unix", filepath.Join(h.state, "control.sock")); err == nil {
			c.Close()
			if c2, err := net.Dial("unix", h.sock); err == nil {
				c2.Close()
				break
			}
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("daemon not ready after 20s:\n%s", h.log)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (h *host) stop() {
	if h.cmd == nil {
		return
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(30 * time.Second):
		h.cmd.Process.Kill()
		<-h.exited
		h.t.Errorf("daemon did not stop within 30s of SIGTERM:\n%s", h.log)
	}
	if h.t.Failed() {
		h.t.Logf("daemon log:\n%s", h.log)
	}
	h.cmd = nil
}

// kill is kill -9.
func (h *host) kill() {
	h.t.Helper()
	h.cmd.Process.Signal(syscall.SIGKILL)
	<-h.exited
	h.cmd = nil
}

// run runs the CLI against this host and returns stdout; it fails the test
// on a non-zero exit.
func (h *host) run(args ...string) string {
	h.t.Helper()
	out, errOut, err := h.try(args...)
	if err != nil {
		h.t.Fatalf("vdrepl %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// try runs the CLI and returns stdout, stderr and the exit error.
func (h *host) try(args ...string) (string, string, error) {
	cmd := exec.Command(vdreplBin, append([]string{"--state", h.state}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

func (h *host) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, h.sock)
}

// addVM registers a VM with one new sparse disk and returns the image path.
func (h *host) addVM(name string, size string) string {
	h.t.Helper()
	img := filepath.Join(h.t.TempDir(), "disk0.img")
	h.run("vm", "add", name, "--disk", img+":"+size)
	return img
}

func (h *host) vms() []map[string]any {
	h.t.Helper()
	var v []map[string]any
	if err := json.Unmarshal([]byte(h.run("vm", "list", "--json")), &v); err != nil {
		h.t.Fatal(err)
	}
	return v
}

// sh runs a command with a deadline and fails the test on error.
func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func randomFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	p := filepath.Join(t.TempDir(), "random.img")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runOut runs a command and returns its combined output and error.
func runOut(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}
