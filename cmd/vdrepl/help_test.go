package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/urfave/cli/v2"
)

// commandPaths walks every visible command under cmds, parents first.
func commandPaths(cmds []*cli.Command, parent []string, visit func(path []string, c *cli.Command)) {
	for _, c := range cmds {
		if c.Hidden || c.Name == "help" {
			continue
		}
		path := append(slices.Clone(parent), c.Name)
		visit(path, c)
		commandPaths(c.Subcommands, path, visit)
	}
}

// exampleLine returns the first line of text that runs the command at path:
// it starts with "vdrepl" and holds path's names in order (global flags may
// come between, as in "vdrepl --state DIR serve").
func exampleLine(text string, path []string) string {
	for _, line := range strings.Split(text, "\n") {
		words := strings.Fields(line)
		if len(words) == 0 || words[0] != "vdrepl" {
			continue
		}
		rest := path
		for _, w := range words[1:] {
			if len(rest) > 0 && w == rest[0] {
				rest = rest[1:]
			}
		}
		if len(rest) == 0 {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// TestEveryCommandHasExample walks every command of the app, including ones
// added after this test was written, and wants a concrete example in its
// UsageText or Description that `--help` shows.
func TestEveryCommandHasExample(t *testing.T) {
	n := 0
	commandPaths(newApp().Commands, nil, func(path []string, c *cli.Command) {
		n++
		name := "vdrepl " + strings.Join(path, " ")
		ex := exampleLine(c.UsageText+"\n"+c.Description, path)
		if ex == "" {
			t.Errorf("%q has no example: add one to its Description (or UsageText), e.g.\n\tDescription: `Example:\n   %s ...`", name, name)
			return
		}
		app := newApp()
		var out bytes.Buffer
		app.Writer, app.ErrWriter = &out, &out
		if err := app.Run(append(append([]string{"vdrepl"}, path...), "--help")); err != nil {
			t.Errorf("%s --help: %v", name, err)
			return
		}
		if !strings.Contains(out.String(), ex) {
			t.Errorf("%s --help does not show its example %q:\n%s", name, ex, out.String())
		}
	})
	if n < 20 {
		t.Fatalf("walked %d commands; the app has more", n)
	}
}

func TestExampleLine(t *testing.T) {
	for _, tc := range []struct {
		text string
		path []string
		want bool
	}{
		{"Example:\n   vdrepl vm add web1 --disk x", []string{"vm", "add"}, true},
		{"   vdrepl --state /x serve --nbd unix:/y", []string{"serve"}, true},
		{"   vdrepl vm list", []string{"vm", "add"}, false},
		{"   vdrepl add vm", []string{"vm", "add"}, false},
		{"Run vm add to add a VM", []string{"vm", "add"}, false},
		{"", []string{"status"}, false},
	} {
		if got := exampleLine(tc.text, tc.path) != ""; got != tc.want {
			t.Errorf("exampleLine(%q, %q) found = %v, want %v", tc.text, tc.path, got, tc.want)
		}
	}
}

// completions runs the app as the completion script does: the words typed,
// then --generate-bash-completion, through main's argument reordering.
func completions(t *testing.T, words ...string) []string {
	t.Helper()
	app := newApp()
	var out bytes.Buffer
	app.Writer, app.ErrWriter = &out, &out
	args := append(append([]string{"vdrepl"}, words...), "--generate-bash-completion")
	// urfave/cli reads the word before its flag from os.Args, not from Run's
	// arguments: give it the command line the binary would see.
	saved := os.Args
	os.Args = args
	defer func() { os.Args = saved }()
	if err := app.Run(interspersed(app, args)); err != nil {
		t.Fatalf("%q: %v\n%s", args, err, out.String())
	}
	return strings.Fields(out.String())
}

func TestCompletionListsCommands(t *testing.T) {
	app := newApp()
	var top []string
	for _, c := range app.Commands {
		if !c.Hidden {
			top = append(top, c.Name)
		}
	}
	for _, tc := range []struct {
		words []string
		want  []string
	}{
		{nil, top},
		{[]string{"vm"}, []string{"add", "list", "remove", "seal"}},
		{[]string{"replica", "allow"}, []string{"add", "list", "remove"}},
		{[]string{"--state", "/x", "pki"}, []string{"init", "issue", "show"}},
		{[]string{"serve", "--tls-"}, []string{"--tls-cert", "--tls-key", "--tls-ca"}},
	} {
		got := completions(t, tc.words...)
		for _, w := range tc.want {
			if !slices.Contains(got, w) {
				t.Errorf("completing %q: %q lacks %q", tc.words, got, w)
			}
		}
	}
	// After a positional argument the command still is not run: completion
	// of `vdrepl vm remove web1 <TAB>` must never remove web1. With no
	// daemon behind --control, running it would fail.
	completions(t, "--control", filepath.Join(t.TempDir(), "none.sock"), "vm", "remove", "web1")
}

var binary struct {
	once sync.Once
	path string
	err  error
	out  []byte
}

// vdreplBinary builds the command once for the tests that run it as a user
// would (the completion script, make install).
func vdreplBinary(t *testing.T) string {
	t.Helper()
	binary.once.Do(func() {
		dir, err := os.MkdirTemp("", "vdrepl-bin-")
		if err != nil {
			binary.err = err
			return
		}
		binary.path = filepath.Join(dir, "vdrepl")
		binary.out, binary.err = exec.Command("go", "build", "-o", binary.path, ".").CombinedOutput()
	})
	if binary.err != nil {
		t.Fatalf("go build: %v\n%s", binary.err, binary.out)
	}
	return binary.path
}

// TestBashCompletionScript sources scripts/vdrepl-completion.bash in a real
// bash and completes against the built binary.
func TestBashCompletionScript(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatal("bash is not installed")
	}
	bin := vdreplBinary(t)
	script, err := filepath.Abs("../../scripts/vdrepl-completion.bash")
	if err != nil {
		t.Fatal(err)
	}
	complete := func(words ...string) []string {
		t.Helper()
		// COMP_WORDS as bash fills it: the words typed, the last one being
		// completed (maybe empty).
		prog := `source "$1"; shift
complete -p vdrepl >/dev/null || { echo "no completion registered for vdrepl" >&2; exit 1; }
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
_vdrepl
printf '%s\n' "${COMPREPLY[@]}"`
		cmd := exec.Command(bash, append([]string{"--norc", "-c", prog, "bash", script}, words...)...)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"), "VDREPL_CONFIG=/nonexistent")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("completing %q: %v\n%s", words, err, out)
		}
		return strings.Fields(string(out))
	}
	top := []string{"help", "h"}
	commandPaths(newApp().Commands, nil, func(path []string, _ *cli.Command) {
		if len(path) == 1 {
			top = append(top, path[0])
		}
	})
	for _, tc := range []struct {
		words []string
		want  []string
	}{
		{[]string{"vdrepl", ""}, top},
		{[]string{"vdrepl", "rep"}, []string{"replication", "replica"}},
		{[]string{"vdrepl", "replication", "st"}, []string{"status"}},
		{[]string{"vdrepl", "serve", "--tls-"}, []string{"--tls-ca", "--tls-cert", "--tls-key"}},
	} {
		got := complete(tc.words...)
		slices.Sort(got)
		want := slices.Sorted(slices.Values(tc.want))
		if !slices.Equal(got, want) {
			t.Errorf("completing %q: got %q, want %q", tc.words, got, want)
		}
	}
}

// allFlags calls visit with every flag of the app: the global ones and
// those of every command, hidden ones included.
func allFlags(app *cli.App, visit func(where string, f cli.Flag)) {
	for _, f := range app.Flags {
		visit("vdrepl", f)
	}
	var walk func(cmds []*cli.Command, parent string)
	walk = func(cmds []*cli.Command, parent string) {
		for _, c := range cmds {
			name := parent + " " + c.Name
			for _, f := range c.Flags {
				visit(name, f)
			}
			walk(c.Subcommands, name)
		}
	}
	walk(app.Commands, "vdrepl")
}

// TestFlagUsageHasNoBackquote: urfave/cli takes the first backquoted word
// of a flag's Usage as its value placeholder, so `--tls-cert vdrepl pki
// issue` is what help showed for a Usage naming `vdrepl pki issue`.
func TestFlagUsageHasNoBackquote(t *testing.T) {
	n := 0
	allFlags(newApp(), func(where string, f cli.Flag) {
		n++
		df, ok := f.(cli.DocGenerationFlag)
		if !ok {
			t.Errorf("%s --%s: flag type %T has no Usage to check", where, f.Names()[0], f)
			return
		}
		if u := df.GetUsage(); strings.Contains(u, "`") {
			t.Errorf("%s --%s: Usage has a backquote, which help turns into the value's placeholder: %q", where, f.Names()[0], u)
		}
	})
	if n < 50 {
		t.Fatalf("checked %d flags; the app has more", n)
	}
}

// helpOf runs `vdrepl PATH... --help` and returns what it prints.
func helpOf(t *testing.T, path ...string) string {
	t.Helper()
	app := newApp()
	var out bytes.Buffer
	app.Writer, app.ErrWriter = &out, &out
	if err := app.Run(append(append([]string{"vdrepl"}, path...), "--help")); err != nil {
		t.Fatalf("vdrepl %s --help: %v", strings.Join(path, " "), err)
	}
	return out.String()
}

// TestFlagHelpShowsOneDefault: a Usage that states its default, on a flag
// whose Value urfave/cli prints as well, read "(default 1s) (default: 0s)".
func TestFlagHelpShowsOneDefault(t *testing.T) {
	check := func(path []string) {
		for _, line := range strings.Split(helpOf(t, path...), "\n") {
			if strings.Count(line, "(default") > 1 {
				t.Errorf("vdrepl %s --help: two defaults in %q", strings.Join(path, " "), strings.TrimSpace(line))
			}
		}
	}
	check(nil)
	commandPaths(newApp().Commands, nil, func(path []string, _ *cli.Command) { check(path) })
}

// TestVersion runs the built binary: `vdrepl --version` prints the version
// given at link time, or the build's own.
func TestVersion(t *testing.T) {
	out, err := exec.Command(vdreplBinary(t), "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("vdrepl --version: %v\n%s", err, out)
	}
	if got, want := strings.TrimSpace(string(out)), "vdrepl version "+buildVersion(); got != want {
		t.Errorf("vdrepl --version printed %q, want %q", got, want)
	}
	bin := filepath.Join(t.TempDir(), "vdrepl")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v1.2.3-test", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, "--version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "vdrepl version v1.2.3-test" {
		t.Errorf("vdrepl --version built with -X main.version=v1.2.3-test: %v, printed %q", err, out)
	}
}
