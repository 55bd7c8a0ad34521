package apply

import (
	"fmt"
	"strconv"
	"strings"
)

// recoverVM brings a VM back after a restart: the apply its replica.json
// records as begun is finished, and what no intent or sync refers to is
// tidied. Uploads (.part) stay, so the primary resumes them, unless their
// cycle is applied. An error is
// logged and leaves the intent in place; every request that needs the
// images tries again.
func (s *Server) recoverVM(v *vm) {
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.tidy(); err != nil {
		s.log.Warn("recovery: tidy staged files", "vm", v.name, "err", err)
	}
	if err := v.finishIntent(true); err != nil {
		s.log.Error("recovery: cannot finish the interrupted apply; will retry", "vm", v.name, "err", err)
	}
	if err := v.recoverFailover(); err != nil {
		s.log.Error("recovery: cannot finish the interrupted failover or cancel; run the command again", "vm", v.name, "err", err)
	}
}

// tidy removes leftovers of crashes: a replica.json.tmp, cycle streams no
// intent names, pieces of sync generations no longer running. A cycle
// stream that is not applied yet goes back to being a complete upload, so
// committing it again needs no new transfer.
func (v *vm) tidy() error {
	fsys := v.s.fs
	st := v.snapshot()
	v.removeStaged(join(v.dir, stateFile+".tmp"))
	staging := join(v.dir, stagingDir)
	names, err := fsys.ReadDir(staging)
	if err != nil {
		return fmt.Errorf("apply: staging directory: %w", err)
	}
	for _, n := range names {
		name := join(staging, n)
		if strings.HasSuffix(n, ".tmp") {
			v.removeStaged(name)
			continue
		}
		id, isStream := strings.CutSuffix(n, streamExt)
		if !isStream {
			id, _ = strings.CutSuffix(n, partExt)
		}
		u, err := parseUploadID(id)
		switch {
		case err != nil:
			continue // not ours
		case !u.isCycle() && (st.Sync == nil || st.Sync.Gen != u.gen):
			v.removeStaged(name) // a piece of an abandoned sync
		case !isStream && u.isCycle() && u.cycle <= st.Applied:
			v.removeStaged(name) // a cycle applied without it (dropStaleParts)
		case !isStream:
		case st.Intent != nil && st.Intent.Op == intentCycle && st.Intent.Cycle == u.cycle:
		case u.isCycle() && st.Held != nil && st.Held.holds(u.cycle):
		case u.isCycle() && u.cycle > st.Applied && !v.exists(v.staged(id)):
			if err := fsys.Rename(name, v.staged(id)); err != nil {
				return err
			}
		default:
			v.removeStaged(name)
		}
	}
	gens, err := fsys.ReadDir(join(v.dir, syncDir))
	if err != nil {
		return nil // no resync ever ran
	}
	for _, g := range gens {
		gen, err := strconv.ParseUint(g, 10, 64)
		if err != nil || (st.Sync != nil && st.Sync.Gen == gen) {
			continue
		}
		if err := removeAll(fsys, join(v.dir, syncDir, g)); err != nil {
			return err
		}
	}
	return nil
}
