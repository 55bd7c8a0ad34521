// Package failover is the state machine that moves a VM between hosts:
// unplanned failover, the replica side of a planned failover (promote),
// cancel, complete, the reverse of a failover (complete, then replicate
// back), the adoption of a VM as a replica, and the table that reconciles
// the two durable records after a crash. Test failovers and their record
// (tests.json) are here too (Tests).
//
// Use: the daemon builds one Machine per host over two small interfaces,
// Host (its registry of VMs, vms.json, and the VM transition that stops
// serving a VM) and ReplicaRole (the replica role, apply.Server, through an
// adapter), calls the commands with its operation lock held, and calls
// Reconcile once at start-up with the registry it loaded. It builds one
// Tests over the copies it serves and calls Restart at start-up.
//
// The old primary's side of a planned failover (make the disks read-only,
// ship the last cycle, record handed_over, send the handover, undo it when
// refused) stays in the daemon (daemon/planned.go): it is the daemon's
// gate, shipper and network peer, and its one durable step is the
// registry's handed_over, which this table reads as Primary. Adoption is
// the daemon's VM transition with apply registering the replica VM in
// between; a crash between the two is the Adopted row.
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
//	own           -                            Primary
//
// # Transitions
//
//	Unplanned   Replica -> Recorded -> Rolled -> Served
//	Promote     Replica -> Recorded -> Rolled -> Served -> Completed -> Primary
//	Cancel      Served -> (journal closed) -> Unfinished -> Cancelled -> Replica
//	Complete    Served -> (points dropped) -> Completed -> Primary
//	Adopt       Primary (handed over) -> Adopted -> Replica
//
// Each arrow is a durable write of one record; a crash point (Config.Crash)
// sits after each one the daemon makes. The replica role's own steps
// (failover-recorded, failover-reverted, cancel-recorded, adopt-registered)
// are its own crash points. Reconcile finishes or explains every pair, and
// running the interrupted command again finishes it.
//
// # Concurrency
//
// A Machine is not safe for concurrent use: the daemon serialises its
// commands (and everything else that changes a VM) with its operation
// lock, and Host and Replica are called under that lock; they must not
// take it.
package failover
