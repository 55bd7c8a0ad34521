// Package relay is extended (chained) replication: a replica host passes
// what it applies of a replica VM on to a third host.
//
// Use: the daemon of the replica host builds one Relays over its replica
// role (apply.Server) and its TLS identity, calls Restart once at start-up
// (before the replica role recovers, so an apply a crash interrupted
// reaches the third host too), Start and Stop on the admin's commands,
// Save after each, and Close at shutdown.
//
// # The relay
//
// The relay is a journal (package journal, with all its cycles,
// coalescing, crash recovery, cap and dirty tracking) over the replica
// images that never writes back: its FS drops image writes (sinkFS), since
// apply has written the same content to the images already, and reads pass
// through. Apply feeds it every frame it applies (apply.Relay), one applied
// cycle or resync between Begin and End; the relay's seals take the same
// lock, so a relay cycle always ends on a cycle boundary of the primary,
// and they are refused while the replica VM is not consistent
// (ErrNotConsistent). A shipper (package ship, as on a primary) ships the
// relay's cycles to the third host, with an initial copy and resyncs read
// from the live replica images, exactly as a primary reads its disks while
// its guest writes.
//
// # State
//
// STATE/extend.json records each extension (internal/statefile envelope,
// format "vdrepl-extend", version 1, body: VM name -> Spec with the
// frequency as a Go duration string); the relay journal and the shipper's
// state live in STATE/extend/VM/.
//
// # Concurrency
//
// Relays is safe for concurrent use; its mutex guards the map of running
// extensions and is never held across I/O. Lock order inside a relay:
// relay.mu, then the replica VM's state lock (apply's), never the other
// way.
package relay
