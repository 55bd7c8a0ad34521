package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// daemonHost is a `vdrepl serve` of the built binary with its own state
// directory, stopped with SIGTERM when the test ends.
type daemonHost struct {
	t     *testing.T
	state string
	log   bytes.Buffer
}

func startDaemon(t *testing.T, extra ...string) *daemonHost {
	t.Helper()
	h := &daemonHost{t: t, state: t.TempDir()}
	args := append([]string{"--state", h.state, "serve", "--nbd", "unix:" + filepath.Join(h.state, "nbd.sock")}, extra...)
	cmd := exec.Command(vdreplBinary(t), args...)
	cmd.Env = cliEnv()
	cmd.Stdout, cmd.Stderr = &h.log, &h.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("daemon did not stop within 30s of SIGTERM")
		}
		if t.Failed() {
			t.Logf("daemon %s log:\n%s", h.state, h.log.String())
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		select {
		case <-exited:
			t.Fatalf("daemon exited during start-up:\n%s", h.log.String())
		default:
		}
		if c, err := net.Dial("unix", filepath.Join(h.state, "control.sock")); err == nil {
			c.Close()
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not ready after 20s:\n%s", h.log.String())
		}
	}
}

// cliEnv keeps a host's /etc/vdrepl/vdrepl.toml and VDREPL_* away from the
// binary the tests run.
func cliEnv() []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "VDREPL_") })
	return append(env, "VDREPL_CONFIG=/dev/null")
}

// runCLI runs the built binary with args as typed and returns its stdout,
// stderr and exit error.
func runCLI(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(vdreplBinary(t), args...)
	cmd.Env = cliEnv()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

// cli runs a command against this daemon, --state last as a user may type
// it, and fails the test if it fails.
func (h *daemonHost) cli(args ...string) string {
	h.t.Helper()
	out, errOut, err := h.try(args...)
	if err != nil {
		h.t.Fatalf("vdrepl %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func (h *daemonHost) try(args ...string) (string, string, error) {
	h.t.Helper()
	return runCLI(h.t, append(args, "--state", h.state)...)
}

func TestInterspersed(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"serve --state /x", "--state /x serve"},
		{"--state /x serve --nbd unix:/n", "--state /x serve --nbd unix:/n"},
		{"vm list --state /x --json", "--state /x vm list --json"},
		{"vm --state=/x list", "--state=/x vm list"},
		{"vm add web1 --disk d.img --control /c.sock", "--control /c.sock vm add --disk d.img web1"},
		{"replication enable web1 --replica r --config /c.toml --frequency 30s", "--config /c.toml replication enable --replica r --frequency 30s web1"},
		{"serve --state /x --help", "--state /x serve --help"},
		{"vm remove web1 --help", "vm remove --help"},
		{"vm add web1 -- --state /x", "vm add web1 -- --state /x"},
		{"vm list --bogus", "vm list --bogus"},
	} {
		app := newApp()
		got := strings.Join(interspersed(app, append([]string{"vdrepl"}, strings.Fields(tc.in)...))[1:], " ")
		if got != tc.want {
			t.Errorf("interspersed(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestGlobalFlagsAfterCommand: `vdrepl serve --state DIR` said "flag
// provided but not defined: -state" and dumped help. Global flags are
// honoured after any command; a wrong flag still gets a one-line error.
func TestGlobalFlagsAfterCommand(t *testing.T) {
	h := startDaemon(t)
	img := filepath.Join(t.TempDir(), "web1.img")
	h.cli("vm", "add", "web1", "--disk", img+":1M")
	if out := h.cli("vm", "list"); !strings.Contains(out, "web1/web1") {
		t.Errorf("vdrepl vm list --state %s: web1 not listed:\n%s", h.state, out)
	}
	sock := filepath.Join(h.state, "control.sock")
	if out, errOut, err := runCLI(t, "vm", "list", "--control", sock, "--json"); err != nil || !strings.Contains(out, `"web1"`) {
		t.Errorf("vdrepl vm list --control SOCK --json: %v\n%s%s", err, out, errOut)
	}
	out, errOut, err := runCLI(t, "serve", "--state", h.state, "--help")
	if err != nil || !strings.Contains(out, "vdrepl serve - run the host daemon") {
		t.Errorf("vdrepl serve --state DIR --help: %v\n%s%s", err, out, errOut)
	}
	out, errOut, err = h.try("vm", "list", "--bogus")
	if err == nil {
		t.Fatalf("vdrepl vm list --bogus succeeded:\n%s", out)
	}
	for _, want := range []string{"vm list: flag provided but not defined: -bogus", "vdrepl vm list --help", "--state"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("vdrepl vm list --bogus: stderr %q does not say %q", errOut, want)
		}
	}
	if strings.Contains(out+errOut, "USAGE:") || strings.Count(errOut, "\n") != 1 {
		t.Errorf("vdrepl vm list --bogus: want one line on stderr and no help, got\n%s%s", out, errOut)
	}
}
