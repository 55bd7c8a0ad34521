package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/ship"
)

// A verify that skipped ranges says how many bytes it did not compare and
// why; one that compared nothing is exit status 2, never "matches".
func TestVerifyOutcome(t *testing.T) {
	for _, tc := range []struct {
		name  string
		res   ship.VerifyResult
		code  int
		lines []string
		not   string
	}{
		{name: "clean", res: ship.VerifyResult{VM: "web1", TotalBytes: 8192, CheckedBytes: 8192},
			code: 0, lines: []string{"the replica matches the primary"}, not: "not compared"},
		{name: "partly skipped", res: ship.VerifyResult{VM: "web1", TotalBytes: 8192, CheckedBytes: 4096, SkippedBytes: 4096,
			Skipped:    []ship.VerifyRange{{Disk: "d", From: 4096, To: 8192, Why: ship.SkipTooOld}},
			SkipReason: ship.SkipTooOld},
			code: 0, lines: []string{"4096 bytes not compared: " + ship.SkipTooOld, "matches the primary in the 4096 bytes compared"}},
		{name: "nothing compared", res: ship.VerifyResult{VM: "web1", TotalBytes: 8192, SkippedBytes: 8192,
			Skipped:    []ship.VerifyRange{{Disk: "d", From: 0, To: 8192, Why: ship.SkipNotAtCycle}},
			SkipReason: ship.SkipNotAtCycle, NothingCompared: true, NotCompared: ship.SkipNotAtCycle},
			code: 2, lines: []string{"8192 bytes not compared: " + ship.SkipNotAtCycle, "nothing compared: " + ship.SkipNotAtCycle}, not: "matches"},
		{name: "mismatch", res: ship.VerifyResult{VM: "web1", TotalBytes: 8192, CheckedBytes: 8192, MismatchBlocks: 1, ResyncMarked: true,
			Mismatches: []ship.VerifyMismatch{{Disk: "d", Blocks: 1, Ranges: []ship.VerifyRange{{Disk: "d", From: 0, To: 4096}}}}},
			code: 1, lines: []string{"resync started to repair it"}, not: "matches"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			printVerifyResult(&b, tc.res)
			out := b.String()
			for _, l := range tc.lines {
				if !strings.Contains(out, l) {
					t.Errorf("output lacks %q:\n%s", l, out)
				}
			}
			if tc.not != "" && strings.Contains(out, tc.not) {
				t.Errorf("output says %q:\n%s", tc.not, out)
			}
			code := 0
			var ec cli.ExitCoder
			if err := verifyOutcome("web1", tc.res); errors.As(err, &ec) {
				code = ec.ExitCode()
				if code == 2 && !strings.Contains(err.Error(), "nothing compared: ") {
					t.Errorf("exit message %q", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.code {
				t.Errorf("exit status %d, want %d", code, tc.code)
			}
		})
	}
}

// A mistyped flag or a bad config is exit status 2 for verify: 1 means
// "blocks differ" to a script.
func TestVerifyUsageErrorsExit2(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("bogus = = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"verify", "web1", "--rat", "5"},
		{"--config", bad, "verify", "web1"},
		{"verify", "web1", "--config", bad},
	} {
		_, errOut, err := runCLI(t, args...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(errOut, "vdrepl: ") {
			t.Errorf("vdrepl %s: %v, want exit status 2\n%s", strings.Join(args, " "), err, errOut)
		}
	}
}
