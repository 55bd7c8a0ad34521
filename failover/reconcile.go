package failover

import "sort"

// State is where a VM stands on this host, read from its registry entry
// and the replica role's record (see the table in the package doc).
type State int

const (
	// Replica: a replica VM, not failed over; the registry does not name it.
	Replica State = iota
	// Recorded: the replica role recorded a failover that a crash
	// interrupted before the images were rolled; FailOver finishes it.
	Recorded
	// Rolled: failed over, the registry does not name it yet.
	Rolled
	// Served: failed over and registered; served through the guard.
	Served
	// Unfinished: registered, but the replica role's failover is not
	// carried out or is being cancelled: not served until the command is
	// run again.
	Unfinished
	// Cancelled: registered failed over, a replica again.
	Cancelled
	// Completed: registered failed over, gone from the replica role.
	Completed
	// Adopted: this host's own VM, adopted by the replica role.
	Adopted
	// Primary: this host's own VM.
	Primary
	// HandedOver: this host's own VM, handed over to its replica in a
	// planned failover: served read-only, not shipping; Planned again
	// sends the handover, Adopt ends it.
	HandedOver
	// Unknown: neither record names the VM.
	Unknown
)

var stateNames = [...]string{"replica", "recorded", "rolled", "served", "unfinished", "cancelled", "completed", "adopted", "primary", "handed over", "unknown"}

func (s State) String() string { return stateNames[s] }

// StateOf reads the state of a VM from its registry entry (nil when the
// registry does not name it) and the replica role's record.
func StateOf(e *Entry, r ReplicaStatus) State {
	switch {
	case e == nil && r.Rolled:
		return Rolled
	case e == nil && r.Failover != nil:
		return Recorded
	case e == nil && r.Known:
		return Replica
	case e == nil:
		return Unknown
	case !e.FailedOver && r.Known && r.Adopted:
		return Adopted
	case !e.FailedOver && e.HandedOver:
		return HandedOver
	case !e.FailedOver:
		return Primary
	case r.Rolled:
		return Served
	case r.Known && r.Failover != nil:
		return Unfinished
	case r.Known:
		return Cancelled
	}
	return Completed
}

// Action is what Reconcile does to a registry entry.
type Action int

const (
	// Keep the entry as it is.
	Keep Action = iota
	// Forget drops the entry and the VM's journal.
	Forget
	// MarkCompleted clears failed_over.
	MarkCompleted
	// Register adds an entry for Target, failed over (a stale journal of
	// the name is dropped first).
	Register
)

// Fix is one change Reconcile makes to the registry.
type Fix struct {
	VM     string
	Action Action
	Target Target // for Register
}

// Reconcile brings the registry in line with the replica role's record
// after a crash: for the registry's entries it returns the fixes to make,
// in the entries' order, then those that register failovers the registry
// lacks, by name. The caller applies them and writes the registry once.
func (m *Machine) Reconcile(entries []Entry) []Fix {
	rolled := m.replica.FailedOver()
	var fixes []Fix
	seen := map[string]bool{}
	for i := range entries {
		e := &entries[i]
		seen[e.Name] = true
		r := m.replica.Status(e.Name)
		_, r.Rolled = rolled[e.Name]
		switch StateOf(e, r) {
		case Cancelled:
			m.log.Warn("failover was cancelled before a crash; the VM is a replica again", "vm", e.Name)
			fixes = append(fixes, Fix{VM: e.Name, Action: Forget})
		case Completed:
			m.log.Warn("failover was completed before a crash", "vm", e.Name)
			fixes = append(fixes, Fix{VM: e.Name, Action: MarkCompleted})
		case Adopted:
			m.log.Warn("VM became a replica before a crash; forgetting it as a primary", "vm", e.Name, "primary", r.Primary)
			fixes = append(fixes, Fix{VM: e.Name, Action: Forget})
		}
	}
	var names []string
	for name := range rolled {
		if !seen[name] {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		m.log.Warn("failover was interrupted before the VM was registered; registering it", "vm", name)
		fixes = append(fixes, Fix{VM: name, Action: Register, Target: rolled[name]})
	}
	return fixes
}
