package doctor

import (
	"fmt"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/units"
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
	out := replicaFindings(name, repl.Replicas)
	info := findVM(name, vms)
	if info == nil {
		if len(out) == 0 {
			out = append(out, vmFinding(name, CheckVM, Problem, "this host has no VM and no replica of that name", "`vdrepl vm list` and `vdrepl replication status` list them"))
		}
		return out
	}
	out = append(out, servedFindings(name, info)...)
	prim := findPrimary(name, repl.Primaries)
	if prim == nil {
		if info.Error == "" {
			out = append(out, vmFinding(name, CheckVM, Warning, "the VM is not replicated", fmt.Sprintf("`vdrepl replication enable %s --replica HOST:PORT` starts it", name)))
		}
		return out
	}
	st := prim.Status
	out = append(out, stateFinding(name, st))
	out = append(out, lagFindings(name, st)...)
	out = append(out, journalFindings(name, st)...)
	return append(out, lastErrorFindings(name, st)...)
}

func vmFinding(name, check string, sev Severity, cause, fix string) Finding {
	return Finding{Check: check, Subject: name, Severity: sev, Cause: cause, Fix: fix}
}

// findVM is the VM of that name (the last, were there several), or nil.
func findVM(name string, vms []control.VMInfo) *control.VMInfo {
	var info *control.VMInfo
	for i := range vms {
		if vms[i].Name == name {
			info = &vms[i]
		}
	}
	return info
}

// findPrimary is the VM's replication from this host (the last, were there
// several), or nil.
func findPrimary(name string, prims []control.ReplicationStatus) *control.ReplicationStatus {
	var prim *control.ReplicationStatus
	for i := range prims {
		if prims[i].VM == name {
			prim = &prims[i]
		}
	}
	return prim
}

// replicaFindings checks the replicas this host keeps of the VM.
func replicaFindings(name string, replicas []control.ReplicaStatus) []Finding {
	var out []Finding
	for _, r := range replicas {
		if r.VM != name {
			continue
		}
		if r.FailedOver != nil {
			out = append(out, replicaHealthFinding(r))
			continue
		}
		if f := replicaHealthFinding(r); f.Severity != OK {
			out = append(out, f)
		}
		if r.Consistent {
			out = append(out, vmFinding(name, CheckVM, OK, fmt.Sprintf("this host keeps the VM's replica from %q: state %s, cycle %d applied, consistent", r.Primary, r.State, r.Applied), ""))
		} else {
			out = append(out, vmFinding(name, CheckVM, Warning, fmt.Sprintf("this host keeps the VM's replica from %q, but it is not consistent yet (state %s): a failover now would find no complete image", r.Primary, r.State),
				"let the initial copy or resync finish (`vdrepl replication status` on the primary shows its progress)"))
		}
	}
	return out
}

// ReplicaHealth checks whether the cycles of each VM this host keeps a
// replica of keep arriving, by the replica's own health: a warning past
// 2 x frequency without a cycle, a problem past 6 x frequency or 1 hour
// but not before 3 x frequency; in an initial copy or resync, by the time
// since its last piece (apply.Health).
func ReplicaHealth(replicas []control.ReplicaStatus) []Finding {
	out := make([]Finding, 0, len(replicas))
	for _, r := range replicas {
		out = append(out, replicaHealthFinding(r))
	}
	return out
}

// replicaHealthFinding is the health of one replica VM.
func replicaHealthFinding(r control.ReplicaStatus) Finding {
	if f := r.FailedOver; f != nil {
		return vmFinding(r.VM, CheckReplicaHealth, OK, fmt.Sprintf("failed over on this host (%s) to %s at %s: takes no cycles from %q",
			f.Kind, apply.PointName(f.Point), f.At.Local().Format(time.DateTime), r.Primary), "")
	}
	if d := r.Diverged; d != nil {
		return vmFinding(r.VM, CheckReplicaHealth, Problem,
			fmt.Sprintf("the replica diverged: after cycle %d its disks %s differ from the primary's (block-tree roots)", d.Cycle, strings.Join(d.Disks, ", ")),
			fmt.Sprintf("the primary %s resyncs the VM on its own; `vdrepl replication status %s` there shows the resync, and the ranges it repaired are in its log", r.Primary, r.VM))
	}
	fix := fmt.Sprintf("check the primary host %s and `vdrepl doctor` there (`vdrepl replication status %s` there says why cycles do not arrive)", r.Primary, r.VM)
	switch r.Health {
	case apply.HealthCritical:
		return vmFinding(r.VM, CheckReplicaHealth, Problem, "replica health critical: "+r.HealthReason, fix)
	case apply.HealthWarning:
		return vmFinding(r.VM, CheckReplicaHealth, Warning, "replica health warning: "+r.HealthReason, fix)
	}
	cause := fmt.Sprintf("replica from %q: %s", r.Primary, r.State)
	if !r.LastCycleAt.IsZero() {
		cause += ", last cycle applied " + r.LastCycleAt.Local().Format(time.DateTime)
	}
	return vmFinding(r.VM, CheckReplicaHealth, OK, cause, "")
}

// Fences reports every VM of this host fenced after an unplanned failover
// on its replica host.
func Fences(vms []control.VMInfo) []Finding {
	var out []Finding
	for i := range vms {
		if f := fenceFinding(&vms[i]); f != nil {
			out = append(out, *f)
		}
	}
	return out
}

// fenceFinding is the problem of a fenced VM, or nil.
func fenceFinding(info *control.VMInfo) *Finding {
	f := info.Fenced
	if f == nil {
		return nil
	}
	x := vmFinding(info.Name, CheckFence, Problem, f.Sentence()+"; its disks are read-only here",
		fmt.Sprintf("keep the VM where it runs now and replicate it back: on %s run `vdrepl replication reverse %s --replica THIS_HOST:PORT`; or, accepting two diverging copies, `vdrepl vm unfence %s --force` here", f.Replica, info.Name, info.Name))
	return &x
}

// servedFindings checks that the VM is served and its journal works.
func servedFindings(name string, info *control.VMInfo) []Finding {
	var out []Finding
	if f := fenceFinding(info); f != nil {
		out = append(out, *f)
	}
	if info.Error != "" {
		out = append(out, vmFinding(name, CheckVM, Problem, "the VM is not served: "+info.Error, "fix that, then restart `vdrepl serve`"))
	}
	if j := info.Journal; j != nil && j.Failed != "" {
		out = append(out, vmFinding(name, CheckVMJournal, Problem, "the VM's journal failed: "+j.Failed,
			"check the state directory's filesystem (free space, I/O errors in dmesg), then restart `vdrepl serve`"))
	}
	return out
}

// stopped says replication has stopped until the admin acts.
func stopped(st ship.Status) bool {
	return st.State == ship.StateError || st.Health == ship.HealthCritical
}

// stateFinding checks the replication's state and health.
func stateFinding(name string, st ship.Status) Finding {
	switch {
	case stopped(st):
		return vmFinding(name, CheckVM, Problem, fmt.Sprintf("replication to %s stopped: %s", st.Replica, orText(st.Reason, st.LastError)),
			fmt.Sprintf("fix that, then `vdrepl replication resume %s`", name))
	case st.State == ship.StatePaused:
		return vmFinding(name, CheckVM, Warning, fmt.Sprintf("replication to %s is %s", st.Replica, orText(st.Reason, "paused")),
			fmt.Sprintf("`vdrepl replication resume %s`", name))
	case st.State == ship.StateResyncRequired:
		fix := fmt.Sprintf("`vdrepl replication resync %s` starts it now", name)
		if !st.NextResync.IsZero() {
			fix = fmt.Sprintf("it starts when the resync window opens (%s), or now with `vdrepl replication resync %s`", st.NextResync.Local().Format(time.DateTime), name)
		}
		return vmFinding(name, CheckVM, Warning, fmt.Sprintf("the VM needs a resync: %s", st.Reason), fix)
	case st.State == ship.StateInitialCopy || st.State == ship.StateResyncing:
		return vmFinding(name, CheckVM, OK, syncCause(st), "")
	case st.Health == ship.HealthWarning:
		cause := fmt.Sprintf("replication to %s is behind", st.Replica)
		if st.Reason != "" {
			cause += ": " + st.Reason
		}
		if !st.NextRetry.IsZero() {
			cause += fmt.Sprintf(" (next try at %s)", st.NextRetry.Local().Format(time.TimeOnly))
		}
		return vmFinding(name, CheckVM, Warning, cause, "the checks of the replica above name what is wrong on the way; replication catches up by itself once it is fixed")
	default:
		return vmFinding(name, CheckVM, OK, fmt.Sprintf("replicating to %s: cycle %d applied", st.Replica, st.LastApplied), "")
	}
}

// syncCause says how far an initial copy or resync has come.
func syncCause(st ship.Status) string {
	what := "initial copy"
	if st.State == ship.StateResyncing {
		what = "resync"
	}
	cause := fmt.Sprintf("%s to %s under way", what, st.Replica)
	if m := st.Metrics; m.SyncTotalBytes > 0 {
		cause += fmt.Sprintf(": %s of %s", units.FormatBytes(m.SyncDoneBytes), units.FormatBytes(m.SyncTotalBytes))
	}
	if st.Reason != "" {
		cause += " (" + st.Reason + ")"
	}
	if st.Forecast != "" {
		cause += "; " + st.Forecast
	}
	return cause
}

// lagFindings checks the lag against the frequency, once a cycle has been
// applied.
func lagFindings(name string, st ship.Status) []Finding {
	m := st.Metrics
	if st.LastAppliedSealed.IsZero() || !(m.FrequencySeconds > 0) {
		return nil
	}
	lag := time.Duration(m.LagSeconds * float64(time.Second))
	freq := time.Duration(m.FrequencySeconds * float64(time.Second))
	cause := fmt.Sprintf("lag %s against a frequency of %s: the newest recovery point on the replica is from %s",
		durText(lag), durText(freq), st.LastAppliedSealed.Local().Format(time.DateTime))
	switch {
	case lag > lagBad*freq:
		return []Finding{vmFinding(name, CheckVMLag, Problem, cause+fmt.Sprintf(", over %d cycles ago", lagBad), "the state and last error say why cycles do not get through")}
	case lag > lagWarn*freq:
		return []Finding{vmFinding(name, CheckVMLag, Warning, cause+fmt.Sprintf(", over %d cycles ago", lagWarn), "the state and last error say why cycles do not get through")}
	default:
		return []Finding{vmFinding(name, CheckVMLag, OK, cause, "")}
	}
}

// journalFindings checks how full the journal is against its cap.
func journalFindings(name string, st ship.Status) []Finding {
	m := st.Metrics
	if m.JournalCapBytes <= 0 {
		return nil
	}
	fill := float64(m.PendingBytes) / float64(m.JournalCapBytes)
	cause := fmt.Sprintf("journal %.0f%% full: %s of %s kept for %d unshipped cycle(s)", 100*fill, units.FormatBytes(m.PendingBytes), units.FormatBytes(m.JournalCapBytes), m.PendingCycles)
	if fill >= journalWarn && st.State != ship.StateResyncRequired {
		return []Finding{vmFinding(name, CheckVMJournal, Warning, cause+"; past the cap the VM needs a resync",
			"let replication catch up (see lag and last error), or give the journal more room with `vdrepl serve --journal-cap`")}
	}
	return []Finding{vmFinding(name, CheckVMJournal, OK, cause, "")}
}

// lastErrorFindings reports the last error, unless the state already
// said replication stopped on it.
func lastErrorFindings(name string, st ship.Status) []Finding {
	if st.LastError == "" || stopped(st) {
		return nil
	}
	when := st.LastErrorAt.Local().Format(time.DateTime)
	if st.LastErrorAt.After(st.LastAppliedAt) {
		return []Finding{vmFinding(name, CheckVMError, Warning, fmt.Sprintf("last error (%s), not followed by a cycle applied: %s", when, st.LastError),
			"it is retried; the checks of the replica above name what is wrong on the way")}
	}
	return []Finding{vmFinding(name, CheckVMError, OK, fmt.Sprintf("last error (%s), since recovered: %s", when, st.LastError), "")}
}

func orText(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}
