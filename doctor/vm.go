package doctor

import (
	"fmt"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/ship"
)

// Lag beyond lagWarn frequencies is a warning (as Hyper-V flags
// replication that missed cycles), beyond lagBad a problem: the newest
// recovery point on the replica is far older than the admin asked for.
// Journal fill from journalWarn on is a warning: past the cap the VM needs
// a resync.
const (
	lagWarn     = 2
	lagBad      = 10
	journalWarn = 0.9
)

// VMReplication checks a VM's replication as the daemon reports it:
// served, its replication state and health, lag against its frequency,
// journal fill and last error; or, on a replica host, its replica.
func VMReplication(name string, vms []control.VMInfo, repl control.Replication, now time.Time) []Finding {
	var info *control.VMInfo
	for i := range vms {
		if vms[i].Name == name {
			info = &vms[i]
		}
	}
	var prim *control.ReplicationStatus
	for i := range repl.Primaries {
		if repl.Primaries[i].VM == name {
			prim = &repl.Primaries[i]
		}
	}
	var out []Finding
	add := func(check string, sev Severity, cause, fix string) {
		out = append(out, Finding{Check: check, Subject: name, Severity: sev, Cause: cause, Fix: fix})
	}
	for _, r := range repl.Replicas {
		if r.VM != name {
			continue
		}
		if r.Consistent {
			add(CheckVM, OK, fmt.Sprintf("this host keeps the VM's replica from %q: state %s, cycle %d applied, consistent", r.Primary, r.State, r.Applied), "")
		} else {
			add(CheckVM, Warning, fmt.Sprintf("this host keeps the VM's replica from %q, but it is not consistent yet (state %s): a failover now would find no complete image", r.Primary, r.State),
				"let the initial copy or resync finish (`vdrepl replication status` on the primary shows its progress)")
		}
	}
	if info == nil {
		if len(out) == 0 {
			add(CheckVM, Problem, "this host has no VM and no replica of that name", "`vdrepl vm list` and `vdrepl replication status` list them")
		}
		return out
	}
	if info.Error != "" {
		add(CheckVM, Problem, "the VM is not served: "+info.Error, "fix that, then restart `vdrepl serve`")
	}
	if j := info.Journal; j != nil && j.Failed != "" {
		add(CheckVMJournal, Problem, "the VM's journal failed: "+j.Failed,
			"check the state directory's filesystem (free space, I/O errors in dmesg), then restart `vdrepl serve`")
	}
	if prim == nil {
		if info.Error == "" {
			add(CheckVM, Warning, "the VM is not replicated", fmt.Sprintf("`vdrepl replication enable %s --replica HOST:PORT` starts it", name))
		}
		return out
	}
	st := prim.Status
	stopped := st.State == ship.StateError || st.Health == ship.HealthCritical
	switch {
	case stopped:
		add(CheckVM, Problem, fmt.Sprintf("replication to %s stopped: %s", st.Replica, orText(st.Reason, st.LastError)),
			fmt.Sprintf("fix that, then `vdrepl replication resume %s`", name))
	case st.State == ship.StatePaused:
		add(CheckVM, Warning, fmt.Sprintf("replication to %s is %s", st.Replica, orText(st.Reason, "paused")),
			fmt.Sprintf("`vdrepl replication resume %s`", name))
	case st.State == ship.StateResyncRequired:
		fix := fmt.Sprintf("`vdrepl replication resync %s` starts it now", name)
		if !st.NextResync.IsZero() {
			fix = fmt.Sprintf("it starts when the resync window opens (%s), or now with `vdrepl replication resync %s`", st.NextResync.Local().Format(time.DateTime), name)
		}
		add(CheckVM, Warning, fmt.Sprintf("the VM needs a resync: %s", st.Reason), fix)
	case st.State == ship.StateInitialCopy || st.State == ship.StateResyncing:
		what := "initial copy"
		if st.State == ship.StateResyncing {
			what = "resync"
		}
		cause := fmt.Sprintf("%s to %s under way", what, st.Replica)
		if m := st.Metrics; m.SyncTotalBytes > 0 {
			cause += fmt.Sprintf(": %s of %s", bytesText(m.SyncDoneBytes), bytesText(m.SyncTotalBytes))
		}
		if st.Reason != "" {
			cause += " (" + st.Reason + ")"
		}
		if st.Forecast != "" {
			cause += "; " + st.Forecast
		}
		add(CheckVM, OK, cause, "")
	case st.Health == ship.HealthWarning:
		cause := fmt.Sprintf("replication to %s is behind", st.Replica)
		if st.Reason != "" {
			cause += ": " + st.Reason
		}
		if !st.NextRetry.IsZero() {
			cause += fmt.Sprintf(" (next try at %s)", st.NextRetry.Local().Format(time.TimeOnly))
		}
		add(CheckVM, Warning, cause, "the checks of the replica above name what is wrong on the way; replication catches up by itself once it is fixed")
	default:
		add(CheckVM, OK, fmt.Sprintf("replicating to %s: cycle %d applied", st.Replica, st.LastApplied), "")
	}

	m := st.Metrics
	if !st.LastAppliedSealed.IsZero() && m.FrequencySeconds > 0 {
		lag := time.Duration(m.LagSeconds * float64(time.Second))
		freq := time.Duration(m.FrequencySeconds * float64(time.Second))
		cause := fmt.Sprintf("lag %s against a frequency of %s: the newest recovery point on the replica is from %s",
			durText(lag), durText(freq), st.LastAppliedSealed.Local().Format(time.DateTime))
		switch {
		case lag > lagBad*freq:
			add(CheckVMLag, Problem, cause+fmt.Sprintf(", over %d cycles ago", lagBad), "the state and last error say why cycles do not get through")
		case lag > lagWarn*freq:
			add(CheckVMLag, Warning, cause+fmt.Sprintf(", over %d cycles ago", lagWarn), "the state and last error say why cycles do not get through")
		default:
			add(CheckVMLag, OK, cause, "")
		}
	}
	if m.JournalCapBytes > 0 {
		fill := float64(m.PendingBytes) / float64(m.JournalCapBytes)
		cause := fmt.Sprintf("journal %.0f%% full: %s of %s kept for %d unshipped cycle(s)", 100*fill, bytesText(m.PendingBytes), bytesText(m.JournalCapBytes), m.PendingCycles)
		if fill >= journalWarn && st.State != ship.StateResyncRequired {
			add(CheckVMJournal, Warning, cause+"; past the cap the VM needs a resync",
				"let replication catch up (see lag and last error), or give the journal more room with `vdrepl serve --journal-cap`")
		} else {
			add(CheckVMJournal, OK, cause, "")
		}
	}
	if st.LastError != "" && !stopped {
		when := st.LastErrorAt.Local().Format(time.DateTime)
		if st.LastErrorAt.After(st.LastAppliedAt) {
			add(CheckVMError, Warning, fmt.Sprintf("last error (%s), not followed by a cycle applied: %s", when, st.LastError),
				"it is retried; the checks of the replica above name what is wrong on the way")
		} else {
			add(CheckVMError, OK, fmt.Sprintf("last error (%s), since recovered: %s", when, st.LastError), "")
		}
	}
	return out
}

func orText(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}
