package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// installNeeds fails in CI and skips elsewhere when a tool is missing, as
// the e2e harness's need does.
func installNeeds(t *testing.T, tools ...string) {
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

// makeInstall runs `make install` from the repository root with vars.
func makeInstall(t *testing.T, target string, vars ...string) string {
	t.Helper()
	cmd := exec.Command("make", append([]string{"-s", "-C", "../..", target}, vars...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s %s: %v\n%s", target, strings.Join(vars, " "), err, out)
	}
	return string(out)
}

// unitFile reads a systemd unit into section.key -> values, in order.
func unitFile(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: line %q is not KEY=VALUE", path, line)
			}
			keys[section+"."+k] = append(keys[section+"."+k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return keys
}

// TestMakeInstall installs into a temporary PREFIX, checks the unit with
// systemd-analyze verify, checks that the unit, the installed config and
// the CLI agree on where the daemon's sockets and state are, and that a
// second install keeps an edited config.
func TestMakeInstall(t *testing.T) {
	installNeeds(t, "make", "install", "sed", "go", "systemd-analyze")
	tmp := t.TempDir()
	prefix, sysconf := filepath.Join(tmp, "usr"), filepath.Join(tmp, "etc")
	vars := []string{"PREFIX=" + prefix, "SYSCONFDIR=" + sysconf, "BIN=" + filepath.Join(tmp, "build", "vdrepl")}
	makeInstall(t, "install", vars...)

	bin := filepath.Join(prefix, "bin", "vdrepl")
	unit := filepath.Join(prefix, "lib", "systemd", "system", "vdrepl.service")
	config := filepath.Join(sysconf, "vdrepl", "vdrepl.toml")
	for path, mode := range map[string]os.FileMode{
		bin:  0o755,
		unit: 0o644, config: 0o644,
		filepath.Join(prefix, "share", "bash-completion", "completions", "vdrepl"): 0o644,
		filepath.Join(prefix, "share", "doc", "vdrepl", "vdrepl.toml.example"):     0o644,
		filepath.Join(prefix, "share", "doc", "vdrepl", "grafana-dashboard.json"):  0o644,
		filepath.Join(prefix, "share", "doc", "vdrepl", "vdrepl-alerts.yml"):       0o644,
	} {
		st, err := os.Stat(path)
		if err != nil {
			t.Errorf("not installed: %v", err)
			continue
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v", path, st.Mode().Perm(), mode)
		}
	}
	if out, err := exec.Command(bin, "--help").CombinedOutput(); err != nil || !bytes.Contains(out, []byte("serve")) {
		t.Errorf("%s --help: %v\n%s", bin, err, out)
	}

	// systemd-analyze verify exits 0 on unknown keys and bad values and only
	// prints them: any output fails the test.
	out, err := exec.Command("systemd-analyze", "verify", "--man=no", unit).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}

	keys := unitFile(t, unit)
	for k, want := range map[string]string{
		"Service.Type": "simple", "Service.Restart": "on-failure",
		"Service.StateDirectory": "vdrepl", "Service.RuntimeDirectory": "vdrepl",
	} {
		if got := keys[k]; len(got) != 1 || got[0] != want {
			t.Errorf("%s: %s=%q, want %q", unit, k, got, want)
		}
	}
	argv := strings.Fields(keys["Service.ExecStart"][0])
	if argv[0] != bin {
		t.Errorf("ExecStart runs %s, want the installed %s", argv[0], bin)
	}
	// What the daemon started by the unit reads, through the installed config.
	daemon, err := runServe(t, argv[1:]...)
	if err != nil {
		t.Fatalf("ExecStart's arguments %q: %v", argv[1:], err)
	}
	if daemon.state != "/var/lib/vdrepl" {
		t.Errorf("the unit's daemon keeps state in %s, not in StateDirectory's /var/lib/vdrepl", daemon.state)
	}
	if !strings.HasPrefix(daemon.control, "/run/vdrepl/") || daemon.nbd != "unix:/run/vdrepl/nbd.sock" {
		t.Errorf("the unit's daemon listens on control %s, NBD %s; want both in RuntimeDirectory's /run/vdrepl", daemon.control, daemon.nbd)
	}
	// What `vdrepl status` reads with the installed config and no flags.
	fromCLI, err := runAs(t, "status", "--config", config, "status")
	if err != nil {
		t.Fatal(err)
	}
	if fromCLI.control != daemon.control {
		t.Errorf("with %s the CLI looks for the daemon at %s; the unit's daemon listens at %s", config, fromCLI.control, daemon.control)
	}

	// A second install keeps the admin's config.
	edited := []byte("# edited by the admin\nlog-level = \"debug\"\n")
	if err := os.WriteFile(config, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	if out := makeInstall(t, "install", vars...); !strings.Contains(out, "kept "+config) {
		t.Errorf("second install did not say it kept %s:\n%s", config, out)
	}
	if got, _ := os.ReadFile(config); !bytes.Equal(got, edited) {
		t.Errorf("second install replaced the edited %s with:\n%s", config, got)
	}
	makeInstall(t, "uninstall", vars...)
	for _, gone := range []string{bin, unit} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("uninstall left %s", gone)
		}
	}
	if _, err := os.Stat(config); err != nil {
		t.Errorf("uninstall removed the config: %v", err)
	}
}

// TestMakeInstallDestdir stages an install as a package build would: the
// files land under DESTDIR, and the unit names the final paths.
func TestMakeInstallDestdir(t *testing.T) {
	installNeeds(t, "make", "install", "sed", "go")
	tmp := t.TempDir()
	dest := filepath.Join(tmp, "dest")
	makeInstall(t, "install", "DESTDIR="+dest, "BIN="+filepath.Join(tmp, "build", "vdrepl"))
	for _, p := range []string{"usr/local/bin/vdrepl", "usr/local/lib/systemd/system/vdrepl.service",
		"usr/local/share/bash-completion/completions/vdrepl", "etc/vdrepl/vdrepl.toml"} {
		if _, err := os.Stat(filepath.Join(dest, p)); err != nil {
			t.Errorf("not staged: %v", err)
		}
	}
	unit, err := os.ReadFile(filepath.Join(dest, "usr/local/lib/systemd/system/vdrepl.service"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(unit, []byte(dest)) {
		t.Errorf("the staged unit names DESTDIR %s", dest)
	}
	if !bytes.Contains(unit, []byte("ExecStart=/usr/local/bin/vdrepl --config /etc/vdrepl/vdrepl.toml ")) {
		t.Errorf("the staged unit does not run /usr/local/bin/vdrepl with /etc/vdrepl/vdrepl.toml:\n%s", unit)
	}
}
