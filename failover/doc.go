// Package failover is the state machine that moves a VM between hosts:
// unplanned failover, both sides of a planned failover (Planned on the old
// primary, TakeOver on the new one), cancel, complete, the reverse of a
// failover (complete, then replicate back), the adoption of a VM as a
// replica, and the table that reconciles the two durable records after a
// crash. Test failovers and their record (tests.json) are here too (Tests).
//
// Use: the daemon builds one Machine per host over three small
// interfaces, Host (its registry of VMs, vms.json, and the VM transition
// that stops serving a VM), ReplicaRole (the replica role, apply.Server,
// through an adapter) and PrimaryRole (its primary role: the read-only
// gate, the shipper, the network peer), calls the commands with its
// operation lock held (but Planned and Adopt, which take Config.Lock
// themselves), and calls Reconcile once at start-up with the registry it
// loaded. It builds one Tests over the copies it serves and calls Restart
// at start-up. The machine decides what is checked, in which order the
// steps run, what is durable before what and what is undone; the
// interfaces carry it out.
//
// # The two records
//
// A VM's place in a failover is written in two files that no single write
// covers: the host's registry entry (failed_over) and the replica role's
// record of the replica VM (its failover record). Every command writes one
// of them durably before it touches the other, so a crash leaves a pair
// that names exactly one step. State reads the pair:
//
//	registry      replica role                 state
//	-             replica, no failover         Replica
//	-             failover recorded, unrolled  Recorded      (FailOver again)
//	-             failed over (rolled)         Rolled        registers it
//	failed_over   failed over                  Served
//	failed_over   recorded / being cancelled   Unfinished    not served, says so
//	failed_over   replica, no failover         Cancelled     forgets the VM
//	failed_over   no replica                   Completed     serves it plainly
//	own           replica adopted from here    Adopted       forgets the VM
//	own, handed_over  -                        HandedOver    serves it read-only, not shipping
//	own           -                            Primary
//
// # Transitions
//
//	Unplanned   Replica -> Recorded -> Rolled -> Served
//	Promote     Replica -> Recorded -> Rolled -> Served -> Completed -> Primary
//	Cancel      Served -> (journal closed) -> Unfinished -> Cancelled -> Replica
//	Complete    Served -> (points dropped) -> Completed -> Primary
//	Planned     Primary -> HandedOver -> (new primary adopts) -> Replica
//	            HandedOver -> Primary when the new primary refuses
//	TakeOver    Promote, then replication back enabled (once)
//	Reverse     Served -> Complete -> Primary, then replication enabled
//	Adopt       Primary | HandedOver -> (not served) -> Adopted -> Replica
//
// Each arrow is a durable write of one record; a crash point (Config.Crash)
// sits after each one the daemon makes. The replica role's own steps
// (failover-recorded, failover-reverted, cancel-recorded, adopt-registered)
// are its own crash points. Reconcile finishes or explains every pair, and
// running the interrupted command again finishes it.
//
// The crash points, by command and step:
//
//	Unplanned   failover-recorded, failover-reverted (replica role);
//	            failover-before-register
//	Promote     failover-recorded (replica role); promote-failed-over;
//	            Complete's; promote-completed
//	Complete    complete-before-registry (the tests' fakes also stop at
//	            complete-points-dropped, inside the replica role; apply
//	            has no crash point there)
//	Cancel      cancel-journal-closed; cancel-recorded (replica role);
//	            cancel-before-forget
//	Planned     handover-recorded (handed_over written, shipping stopped)
//	Adopt       adopt-registered (the replica role, between Adopt and
//	            finish)
//
// # Planned failover, old primary (Planned)
//
// With the lock: the VM must be served here (a replica VM of the name is
// told to run it on its primary), this host must have a certificate, the
// VM must be replicated, not failed over here, this host must run a
// replica role, and nobody may have the VM open unless force (which
// disconnects them). The replica is asked who it is and must be one this
// host's replica role would take the VM back from. Then: the gate makes
// the disks read-only, the last cycle is shipped and applied there, the
// handover (to, cycle, where to replicate back) is recorded in the
// registry, shipping stops: handover-recorded. A failure before the record
// opens the gate again. Without the lock: the handover is sent. Refused:
// the record is cleared, the gate opened and shipping started again (under
// the lock); any other failure leaves the VM handed over, read-only, and
// running Planned again sends the recorded handover without shipping
// again. Then Planned waits up to Config.AdoptWait for the new primary to
// adopt the VM back (Reversed). A restart serves a handed-over VM
// read-only and does not ship it.
//
// # Adoption (Adopt)
//
// The new primary enables the VM here with existing images. With the lock:
// the peer's certificate must name the host the VM replicates to (or was
// handed over to), nobody may use the VM (ErrInUse: the peer retries) and
// the disks must match; shipping stops and the VM is released (the VM
// transition; a busy stand-in stays). The lock is not held while the
// replica role registers the replica VM; finish(true) forgets the VM and
// wakes AdoptWaiter, finish(false) serves it again.
//
// # Concurrency
//
// A Machine is not safe for concurrent use: the daemon serialises its
// commands (and everything else that changes a VM) with its operation
// lock, and Host, ReplicaRole and PrimaryRole are called under that lock;
// they must not take it. Planned and Adopt take that lock (Config.Lock)
// themselves and release it while they wait on a peer: Planned around
// PrimaryRole.SendHandover (called without it) and the wait, Adopt
// between its return and finish. AdoptWaiter is safe for concurrent use;
// the Machine's own mutex guards the waiters only and is taken inside the
// operation lock, never across a call.
package failover
