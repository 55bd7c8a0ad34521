package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"
)

func TestParseConfig(t *testing.T) {
	flags := configFlags(newApp())
	for _, tc := range []struct {
		name string
		toml string
		want map[string][]string // nil when an error is expected
		err  error
		msg  []string // substrings of the error message
	}{
		{name: "empty", toml: "", want: map[string][]string{}},
		{name: "comments only", toml: "# nothing\n\n", want: map[string][]string{}},
		{name: "global and serve keys",
			toml: "state = \"/s\"\ncontrol = \"/c.sock\"\ntls-cert = \"/h.crt\"\nlog-json = true\nsync-interval = \"250ms\"\n",
			want: map[string][]string{"state": {"/s"}, "control": {"/c.sock"}, "tls-cert": {"/h.crt"}, "log-json": {"true"}, "sync-interval": {"250ms"}}},
		{name: "list keeps order", toml: `nbd = ["unix:/a", "tcp:127.0.0.1:1"]`,
			want: map[string][]string{"nbd": {"unix:/a", "tcp:127.0.0.1:1"}}},
		{name: "one string for a list", toml: `nbd = "unix:/a"`, want: map[string][]string{"nbd": {"unix:/a"}}},
		{name: "empty list", toml: `nbd = []`, want: map[string][]string{"nbd": {}}},
		{name: "false switch", toml: `log-json = false`, want: map[string][]string{"log-json": {"false"}}},

		{name: "unknown key", toml: "state = \"/s\"\nnbd-listen = \"unix:/a\"\n", err: errConfigKey,
			msg: []string{`"nbd-listen"`, "test.toml"}},
		{name: "first unknown key in file order", toml: "zzz = 1\naaa = 2\n", err: errConfigKey, msg: []string{`"zzz"`}},
		{name: "table", toml: "[serve]\nnbd = [\"unix:/a\"]\n", err: errConfigKey, msg: []string{`"serve"`}},
		{name: "dotted key", toml: "serve.nbd = \"unix:/a\"\n", err: errConfigKey, msg: []string{`"serve"`}},
		{name: "config is not a key", toml: `config = "/other.toml"`, err: errConfigKey, msg: []string{`"config"`}},
		{name: "help is not a key", toml: `help = true`, err: errConfigKey, msg: []string{`"help"`}},
		{name: "hidden flags are not keys", toml: `retry-scale = 0.01`, err: errConfigKey, msg: []string{`"retry-scale"`}},
		{name: "client flags are not keys", toml: `frequency = "30s"`, err: errConfigKey, msg: []string{`"frequency"`}},
		{name: "short flag spelling", toml: `tls_cert = "/h.crt"`, err: errConfigKey, msg: []string{`"tls_cert"`}},

		{name: "integer for a size", toml: `journal-cap = 20`, err: errConfigValue,
			msg: []string{`"journal-cap"`, "test.toml", "want a string, got an integer"}},
		{name: "string for a switch", toml: `log-json = "yes"`, err: errConfigValue, msg: []string{`"log-json"`, "want true or false"}},
		{name: "number in a list", toml: `nbd = ["unix:/a", 7]`, err: errConfigValue, msg: []string{`"nbd"`, "element 1"}},
		{name: "table for a list", toml: "nbd = {a = 1}", err: errConfigValue, msg: []string{`"nbd"`, "got a table"}},
		{name: "bad duration", toml: `sync-interval = "often"`, err: errConfigValue, msg: []string{`"sync-interval"`, "duration"}},
		{name: "integer duration", toml: `sync-interval = 1`, err: errConfigValue, msg: []string{`"sync-interval"`, "got an integer"}},

		{name: "syntax", toml: "state = \"/s\"\nnbd = [\"unix:/a\"\n", err: errConfigSyntax, msg: []string{"test.toml:"}},
		{name: "unquoted string", toml: "state = /var/lib/vdrepl\n", err: errConfigSyntax, msg: []string{"test.toml:1:"}},
		{name: "duplicate key", toml: "state = \"/a\"\nstate = \"/b\"\n", err: errConfigSyntax, msg: []string{"test.toml:2:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parseConfig("/etc/test.toml", []byte(tc.toml), flags)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				for _, m := range tc.msg {
					if !strings.Contains(err.Error(), m) {
						t.Errorf("error %q does not say %q", err, m)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(cfg.values) != len(tc.want) {
				t.Fatalf("values = %q, want %q", cfg.values, tc.want)
			}
			for k, v := range tc.want {
				if !slices.Equal(cfg.values[k], v) {
					t.Errorf("%s = %q, want %q", k, cfg.values[k], v)
				}
			}
		})
	}
}

func TestLoadConfigMissing(t *testing.T) {
	flags := configFlags(newApp())
	missing := filepath.Join(t.TempDir(), "vdrepl.toml")
	cfg, err := loadConfig(missing, false, flags)
	if err != nil {
		t.Fatalf("missing default file: %v", err)
	}
	if len(cfg.values) != 0 {
		t.Fatalf("missing default file gave values %q", cfg.values)
	}
	_, err = loadConfig(missing, true, flags)
	if !errors.Is(err, errConfigMissing) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("missing explicit file: err = %v, want %v naming %s", err, errConfigMissing, missing)
	}
	// A directory where the file should be is not "missing": say so even
	// for the default.
	if _, err := loadConfig(t.TempDir(), false, flags); err == nil {
		t.Fatal("a directory as the config file was accepted")
	}
}

// served is what serve's Action would see: runServe swaps it in for the daemon.
type served struct {
	state, control, nbd, tlsCert, journalCap, logLevel string
	syncInterval                                       time.Duration
	logJSON                                            bool
}

// runServe runs the real app with args, serve's Action replaced by one that
// records the flags it reads.
func runServe(t *testing.T, args ...string) (served, error) {
	t.Helper()
	return runAs(t, "serve", args...)
}

// runAs runs the real app with args, the Action of the top-level command
// named command replaced by one that records the flags serve would read.
func runAs(t *testing.T, command string, args ...string) (served, error) {
	t.Helper()
	app := newApp()
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	var got served
	app.Command(command).Action = func(c *cli.Context) error {
		got = served{
			state: c.String("state"), control: controlPath(c), nbd: strings.Join(c.StringSlice("nbd"), ","),
			tlsCert: c.String("tls-cert"), journalCap: c.String("journal-cap"), logLevel: c.String("log-level"),
			syncInterval: c.Duration("sync-interval"), logJSON: c.Bool("log-json"),
		}
		return nil
	}
	err := app.Run(interspersed(app, append([]string{"vdrepl"}, args...)))
	return got, err
}

func TestConfigPrecedence(t *testing.T) {
	for _, v := range []string{"VDREPL_CONFIG", "VDREPL_STATE", "VDREPL_CONTROL", "VDREPL_TLS_CERT"} {
		t.Setenv(v, "")
		os.Unsetenv(v)
	}
	file := filepath.Join("testdata", "primary.toml")
	fromFile := served{
		state: "/srv/vdrepl/state", control: "/run/vdrepl/control.sock",
		nbd: "unix:/run/vdrepl/nbd.sock,tcp:0.0.0.0:10809", tlsCert: "/etc/vdrepl/pki/host1.example.com.crt",
		journalCap: "20G", logLevel: "debug", syncInterval: 2 * time.Second, logJSON: true,
	}
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want func(s *served)
	}{
		{name: "file only", args: []string{"--config", file, "serve"}, want: func(*served) {}},
		{name: "file from VDREPL_CONFIG", env: map[string]string{"VDREPL_CONFIG": file}, args: []string{"serve"}, want: func(*served) {}},
		{name: "flags win", args: []string{"--config", file, "serve", "--nbd", "tcp:127.0.0.1:1", "--log-level", "warn", "--sync-interval", "5s", "--log-json=false"},
			want: func(s *served) {
				s.nbd, s.logLevel, s.syncInterval, s.logJSON = "tcp:127.0.0.1:1", "warn", 5*time.Second, false
			}},
		{name: "flags after an argument", args: []string{"--config", file, "serve", "extra", "--journal-cap", "1G"},
			want: func(s *served) { s.journalCap = "1G" }},
		{name: "environment wins", env: map[string]string{"VDREPL_TLS_CERT": "/env.crt"}, args: []string{"--config", file, "serve"},
			want: func(s *served) { s.tlsCert = "/env.crt" }},
		{name: "state and control given", args: []string{"--config", file, "--state", "/x", "--control", "/y.sock", "serve"},
			want: func(s *served) { s.state, s.control = "/x", "/y.sock" }},
		{name: "state alone ignores the file's control", args: []string{"--config", file, "--state", "/x", "serve"},
			want: func(s *served) { s.state, s.control = "/x", "/x/control.sock" }},
		{name: "VDREPL_STATE alone ignores the file's control", env: map[string]string{"VDREPL_STATE": "/x"}, args: []string{"--config", file, "serve"},
			want: func(s *served) { s.state, s.control = "/x", "/x/control.sock" }},
		{name: "control alone keeps the file's state", args: []string{"--config", file, "--control", "/y.sock", "serve"},
			want: func(s *served) { s.control = "/y.sock" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			got, err := runServe(t, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			want := fromFile
			tc.want(&want)
			if got != want {
				t.Errorf("serve saw\n %+v\nwant\n %+v", got, want)
			}
		})
	}
}

func TestConfigErrorsStopEveryCommand(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("state = \"/s\"\nlisten = \"0.0.0.0:1\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--config", bad, "serve"}, {"--config", bad, "status"}} {
		_, err := runServe(t, args...)
		if !errors.Is(err, errConfigKey) || !strings.Contains(err.Error(), `"listen"`) || !strings.Contains(err.Error(), bad) {
			t.Errorf("%q: err = %v, want an unknown key error naming \"listen\" and %s", args, err, bad)
		}
	}
	missing := filepath.Join(t.TempDir(), "none.toml")
	if _, err := runServe(t, "--config", missing, "serve"); !errors.Is(err, errConfigMissing) {
		t.Errorf("--config %s: err = %v, want %v", missing, err, errConfigMissing)
	}
}

// commentedKey matches a documented key in the example: "#key = value".
var commentedKey = regexp.MustCompile(`(?m)^#([a-z][a-z0-9-]* = .*)$`)

// TestExampleConfig checks that scripts/vdrepl.toml.example parses as it is
// shipped, that every commented-out example value parses too, and that it
// documents every key a config file may hold.
func TestExampleConfig(t *testing.T) {
	const path = "../../scripts/vdrepl.toml.example"
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	flags := configFlags(newApp())
	if _, err := parseConfig(path, data, flags); err != nil {
		t.Fatalf("as shipped: %v", err)
	}
	all := commentedKey.ReplaceAll(data, []byte("$1"))
	cfg, err := parseConfig(path, all, flags)
	if err != nil {
		t.Fatalf("with every example uncommented: %v", err)
	}
	for _, f := range flags {
		if _, ok := cfg.values[f.Names()[0]]; !ok {
			t.Errorf("%s does not document key %q (flag --%s)", path, f.Names()[0], f.Names()[0])
		}
	}
}
