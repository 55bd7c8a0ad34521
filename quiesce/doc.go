// Package quiesce freezes a guest's filesystems around a cycle barrier, so
// that the recovery point taken there is application-consistent. The
// primary's shipper calls it when it seals such a cycle (ship.QuiesceFunc);
// the daemon binds a VM's quiescer to it:
//
//	q := quiesce.CommandQuiescer{Cmd: "/usr/local/bin/freeze-vm", VM: "vm1"}
//	info, app, reason, err := quiesce.QuiescedBarrier(ctx, q, 10*time.Second, seal)
//
// It imports nothing of vdrepl's.
//
// # What a quiesced barrier is
//
// A recovery point is application-consistent when its cycle barrier was
// taken while the guest's filesystems were frozen: everything the guest's
// applications had written before the freeze is on the disks, the
// filesystems' journals are clean, and no write is half done. Recovering
// such a point mounts without journal replay. A standard point is only
// crash-consistent: the disks as a power cut would have left them.
//
// QuiescedBarrier freezes the guest through a Quiescer, closes the cycle
// (the caller's barrier function) while frozen, and thaws. Two Quiescers:
//
//   - CommandQuiescer runs an admin's command: `CMD [ARGS...] VM freeze`,
//     then `CMD [ARGS...] VM thaw` (the --quiesce-cmd of `vdrepl
//     replication enable`). CMD is one executable path, run directly, never
//     through a shell. Exit status 0 means done; otherwise the error says the
//     status and the first line of the command's standard error (or, when
//     that is empty, of its standard output). The command runs in its own
//     process group; when the context ends (the freeze timeout) the whole
//     group is killed with SIGKILL, so a hung `fsfreeze` and anything it
//     started die with it, and the pipes to any survivor that left the
//     group are closed after commandWaitDelay.
//
//   - QGAQuiescer talks to qemu-guest-agent through the host side of its
//     virtio-serial channel (the --qga-socket: the unix socket of the QEMU
//     chardev backing the org.qemu.guest_agent.0 port). See "Guest agent
//     protocol" below.
//
// # Timing and failure
//
// A freeze must never block the guest's writes for long. QuiescedBarrier
// gives Freeze a context that ends after timeout; both quiescers honour it
// (the command is killed, the agent connection is cut). Whether the freeze
// failed or timed out, QuiescedBarrier calls Thaw anyway, since a freeze that
// timed out may have frozen some filesystems (or may still complete inside
// the guest), and thawing a guest that is not frozen does nothing. Thaw gets
// its own context of the same timeout, detached from the caller's
// cancellation: a guest must be thawed even when the daemon is shutting
// down. Then it takes a standard point (barrier(false)) and reports why in
// reason. So the guest is frozen at most timeout (freeze) + the barrier's
// own time + timeout (thaw).
//
// A thaw that fails after a successful frozen barrier is reported in
// reason, but the point is application-consistent all the same: its barrier
// was taken while frozen. The caller should say so loudly (status, log),
// since the guest may still be frozen; a later QuiescedBarrier thaws it
// again in any case.
//
// Every quiesce failure wraps ErrQuiesce; timeouts also wrap
// context.DeadlineExceeded; agent error replies are *QGAError.
//
// # Guest agent protocol
//
// QEMU guest agent speaks JSON objects over a byte stream, one request
// {"execute": NAME, "arguments": {...}} in, one reply out, each reply
// followed by "\n": {"return": VALUE} or {"error": {"class": C, "desc": D}}.
// The stream outlives connections: replies to a previous client that gave
// up (timed out) may still be queued, and the agent's parser may hold half
// a request. So every call opens a new connection and first synchronises:
//
//	-> 0xFF {"execute":"guest-sync-delimited","arguments":{"id":ID}}
//	<- ...stale bytes... 0xFF {"return":ID} "\n"
//
// ID is random. The leading 0xFF (never valid in UTF-8 JSON) makes the agent
// drop any half-read request; the agent puts 0xFF before its reply. The
// client discards everything up to a 0xFF and then each delimited reply
// whose ID is not its own (a stale sync of an earlier client). Once synced,
// the stream is clean and the next reply answers the next request:
//
//	-> {"execute":"guest-fsfreeze-freeze"}  <- {"return": N}  (N filesystems frozen)
//	-> {"execute":"guest-fsfreeze-thaw"}    <- {"return": N}  (N thawed; 0 if not frozen)
//
// A freeze that froze no filesystem (N = 0) is a failure: a point taken then
// is not application-consistent. One call is one connection; the QEMU
// chardev serves one client at a time, so a second caller waits (bounded by
// its context) until the first is done.
//
// # Concurrency
//
// CommandQuiescer and QGAQuiescer are values with no state of their own;
// their methods are safe for concurrent use, but freezes and thaws of one
// guest must not overlap (the caller runs one QuiescedBarrier per VM at a
// time).
package quiesce
