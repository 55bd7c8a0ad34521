package daemon

import (
	"os"
	"runtime/debug"
	"sync"
)

// The daemon's soft memory limit (Config.MemoryLimit).
//
// Go's collector lets the heap grow to twice the live data before it
// collects (GOGC=100). Under a sustained write load most of the live data is
// the journals' append buffers kept for the write-back (up to 64 MiB per VM)
// and the front ends' request buffers, so the daemon's peak RSS was about
// twice what it used: 296 MiB in bench/RESULTS.md's FUSE run, 201 MiB with a
// soft limit of 200 MiB at the same throughput. So by default the daemon
// sets a soft limit (runtime/debug.SetMemoryLimit) of memBase plus
// memPerJournal for every VM journal open, recomputed as VMs come and go.
// It is soft: near it the collector runs more often (Go caps it at about
// half the CPU); no allocation fails. GOMEMLIMIT in the environment, or a
// fixed Config.MemoryLimit, replaces it.
const (
	memBase       = 128 << 20
	memPerJournal = 96 << 20
)

var memLimit struct {
	sync.Mutex
	configured bool
	fixed      int64 // > 0 a fixed limit, < 0 Go's own (GOMEMLIMIT or off)
	journals   int
}

// configureMemoryLimit applies Config.MemoryLimit: 0 auto, > 0 fixed, < 0
// off (Go's default).
func configureMemoryLimit(limit int64) {
	memLimit.Lock()
	defer memLimit.Unlock()
	memLimit.configured = true
	memLimit.fixed = limit
	if os.Getenv("GOMEMLIMIT") != "" {
		memLimit.fixed = -1
	}
	applyMemoryLimitLocked()
}

// journalsOpen counts VM journals opened (n = 1) or closed (n = -1).
func journalsOpen(n int) {
	memLimit.Lock()
	defer memLimit.Unlock()
	memLimit.journals += n
	applyMemoryLimitLocked()
}

func applyMemoryLimitLocked() {
	if !memLimit.configured || memLimit.fixed < 0 {
		return
	}
	limit := memLimit.fixed
	if limit == 0 {
		limit = memBase + memPerJournal*int64(max(memLimit.journals, 0))
	}
	debug.SetMemoryLimit(limit)
}
