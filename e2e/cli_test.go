package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadInputChangesNothing: every mistake gets one clear line on stderr,
// a non-zero exit, and leaves the registry and the filesystem as they were.
func TestBadInputChangesNothing(t *testing.T) {
	h := newHost(t)
	img := h.addVM("vm1", "16M")
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.img")
	if err := os.WriteFile(existing, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(dir, "file")
	os.WriteFile(notDir, nil, 0o644)
	odd := filepath.Join(dir, "odd.img")
	os.WriteFile(odd, make([]byte, 1000), 0o644)
	missing := filepath.Join(dir, "missing.img")

	for _, tc := range []struct {
		name string
		args []string
		want string // a word the error must contain
	}{
		{"unknown VM remove", []string{"vm", "remove", "nope"}, "unknown VM"},
		{"unknown VM seal", []string{"vm", "seal", "nope"}, "unknown VM"},
		{"missing file", []string{"vm", "add", "vm2", "--disk", missing}, "does not exist"},
		{"size mismatch", []string{"vm", "add", "vm2", "--disk", existing + ":2M"}, "bytes"},
		{"disk in use by another VM", []string{"vm", "add", "vm2", "--disk", img}, "already disk"},
		{"second registration", []string{"vm", "add", "vm1", "--disk", existing}, "already registered"},
		{"same disk twice", []string{"vm", "add", "vm2", "--disk", "a=" + existing, "--disk", "b=" + existing}, "twice"},
		{"bad VM name", []string{"vm", "add", "bad/name", "--disk", existing}, "name"},
		{"bad size", []string{"vm", "add", "vm2", "--disk", missing + ":12Q"}, "size"},
		{"size not a block multiple", []string{"vm", "add", "vm2", "--disk", odd}, "multiple"},
		{"mount point is a file", []string{"mount", notDir}, "not a directory"},
		{"mount point missing", []string{"mount", filepath.Join(dir, "nodir")}, "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := h.run("vm", "list", "--json")
			out, errOut, err := h.try(tc.args...)
			if err == nil {
				t.Fatalf("exit 0, want failure; stdout %q", out)
			}
			line := strings.TrimSpace(errOut)
			if strings.Count(line, "\n") != 0 || !strings.HasPrefix(line, "vdrepl: ") || !strings.Contains(line, tc.want) {
				t.Fatalf("stderr %q: want one line starting with 'vdrepl: ' containing %q", errOut, tc.want)
			}
			if after := h.run("vm", "list", "--json"); after != before {
				t.Fatalf("registry changed:\nbefore %s\nafter %s", before, after)
			}
			if _, err := os.Stat(missing); err == nil {
				t.Fatalf("a failed add left %s behind", missing)
			}
		})
	}
	// Unknown flags and a daemon that is not running are clear too.
	other := &host{t: t, state: t.TempDir()}
	if _, errOut, err := other.try("vm", "list"); err == nil || !strings.Contains(errOut, "is `vdrepl serve` running") {
		t.Fatalf("no daemon: err %v, stderr %q", err, errOut)
	}
}

// TestRegistryPersistsAndRemove: VMs come back after a restart; remove
// forgets the VM but keeps its image.
func TestRegistryPersistsAndRemove(t *testing.T) {
	h := newHost(t)
	img := h.addVM("vm1", "8M")
	h.stop()
	h.start()
	if vms := h.vms(); len(vms) != 1 || vms[0]["name"] != "vm1" {
		t.Fatalf("after restart: %v", vms)
	}
	if !strings.Contains(h.run("status"), "last shutdown: clean") {
		t.Fatalf("status after a clean stop:\n%s", h.run("status"))
	}
	h.kill()
	h.start()
	if !strings.Contains(h.run("status"), "last shutdown: process crash") {
		t.Fatalf("status after kill -9:\n%s", h.run("status"))
	}
	h.run("vm", "remove", "vm1")
	if vms := h.vms(); len(vms) != 0 {
		t.Fatalf("after remove: %v", vms)
	}
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("remove deleted the image: %v", err)
	}
	// The image is free again: it can be registered anew.
	h.run("vm", "add", "vm1b", "--disk", img)
}
