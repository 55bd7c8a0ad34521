package daemon

import (
	"math"
	"runtime/debug"
	"testing"
)

// TestMemoryLimit: the automatic soft limit follows the number of open VM
// journals; a fixed one stays; off and GOMEMLIMIT leave Go's own.
func TestMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() {
		memLimit.Lock()
		memLimit.configured = false
		memLimit.Unlock()
		debug.SetMemoryLimit(before)
	})
	current := func() int64 { return debug.SetMemoryLimit(-1) }
	memLimit.Lock()
	base := memLimit.journals
	memLimit.Unlock()

	configureMemoryLimit(0)
	if got, want := current(), int64(memBase+memPerJournal*base); got != want {
		t.Fatalf("auto limit with %d journals: %d, want %d", base, got, want)
	}
	journalsOpen(1)
	journalsOpen(1)
	if got, want := current(), int64(memBase+memPerJournal*(base+2)); got != want {
		t.Errorf("auto limit after two journals opened: %d, want %d", got, want)
	}
	journalsOpen(-1)
	if got, want := current(), int64(memBase+memPerJournal*(base+1)); got != want {
		t.Errorf("auto limit after one closed: %d, want %d", got, want)
	}
	configureMemoryLimit(1 << 30)
	journalsOpen(-1)
	if got := current(); got != 1<<30 {
		t.Errorf("fixed limit: %d, want %d", got, 1<<30)
	}
	debug.SetMemoryLimit(math.MaxInt64)
	configureMemoryLimit(-1)
	journalsOpen(1)
	if got := current(); got != math.MaxInt64 {
		t.Errorf("limit off: %d, want none", got)
	}
	journalsOpen(-1)
	t.Setenv("GOMEMLIMIT", "300MiB")
	configureMemoryLimit(0)
	if got := current(); got != math.MaxInt64 {
		t.Errorf("GOMEMLIMIT set: the daemon set %d", got)
	}
}
