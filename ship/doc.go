// Package ship is the primary side of replication: it seals a VM's journal
// into cycles every Frequency, writes each closed cycle as a wire stream,
// uploads it to the replica in resumable chunks and releases it from the
// journal once the replica committed it. It also makes the initial copy
// (over the network, at a set time, or to external media) and resyncs, and
// reports status. The protocol is package wire's (internal/wire/doc.go).
//
// The daemon makes one Shipper per replicated VM with New, runs it with Run
// until it is stopped, and closes it with Close; Sync, Pause, Resume,
// Resync, Verify and Status serve the admin's commands, WriteOffline an initial
// copy on external media.
//
// # Cycles
//
// The journal's closed cycles ship strictly in order, oldest first. A
// cycle's stream is made from the journal while it is sent, in chunks of at
// most wire.MaxChunk bytes: at most three chunks are in memory, none is
// written to a file (stream.go). Before sending, the shipper asks the
// replica how much of the upload it holds and resumes there; a 409 "offset"
// answer moves it to the offset the replica names. A closed cycle's stream
// is a function of the journal, so a resumed upload makes it again and
// skips what the replica holds. Two chunk requests are in flight at a
// time (stream.go); the replica reads the second's body only after the
// first's, so a cut connection still costs at most one chunk. Sync
// pieces, read from the live disks and so different each time they are
// read, are written to a spool file (STATE.spool/s<gen>-<piece>.vdws),
// which is sent while it is written and committed once complete and
// synced. A cycle is released only after the commit answered success: a
// crash at any point ships it again, and the replica answers an applied
// cycle as success.
// The replica answers a commit once the cycle is applied, so the next
// cycle is uploaded while that commit is in flight and committed after
// its answer (cycle.go): upload and apply overlap, commits stay in order,
// and a cycle whose predecessor's commit failed stays staged and resumes.
//
// The last applied cycle (the state file's Applied: what Sync waits for,
// status's last applied cycle) moves only as far as an answer of the
// replica names applied (wire.Replica.Applied), never to a cycle because
// its commit or a sync finish succeeded. The two differ while the replica
// holds a resync (apply/doc.go): it answers the finish, and the commits of
// the cycles before ConsistentAt, once they are durable, with its images
// still at their last consistent point; those cycles are released, and
// Applied moves when the commit of ConsistentAt answers that all of it is
// applied.
//
// A commit answered "gap" carries the replica's last applied cycle. If that
// is at or past the cycle, it was applied already (an earlier answer was
// lost) and the cycle is released. Otherwise the replica lacks cycles the
// journal no longer has, nothing proves it complete, and the VM is marked
// resync required (DESIGN invariant 2).
//
// # Initial copy and resync
//
// Both begin with Journal.BeginResync: a barrier cycle B, every cycle up to
// B released, every later one kept. The disks are then sent in pieces
// (wire.PieceRange) read from the live disks: an initial copy sends non-zero
// 4 KiB blocks as data and zero runs as zero ranges; a resync compares the
// block trees of both sides top-down (leaves, then the blocks of the leaves
// that differ: treesync.go) and reads and sends only the blocks that
// differ, or, where a tree cannot answer, asks the replica for BLAKE3-256
// sums of its blocks (BlockSize), reads the whole piece and sends the
// blocks that differ. Blocks read after B may be newer than B; the cycles
// after B, shipped after the sync finished, make the replica exact. The
// generation, kind and base are in the state file and the replica's
// SyncState lists the committed pieces, so a restart of either side resumes
// at the first piece not committed. If the journal passes its cap during a
// sync (the cycles after B are lost), the sync starts again as a resync.
//
// Automatic resyncs (journal overflow, an incomplete replica) start only in
// ResyncWindow; Resync starts one at once, and so does a divergence.
//
// # Verified replication
//
// Each cycle's header carries the primary's block-tree roots at its
// barrier (roots.go); the replica checks its own against them once it
// applied the cycle, and every answer says the last cycle it verified and
// whether it diverged (wire.Replica). A divergence starts a resync at once
// whose reason names the cycle and disks, and whose log names the ranges
// it repaired (divergence.go). A cycle whose roots the journal did not
// know in time ships unverified and is counted (UnverifiedCycles).
//
// # Errors
//
// Network errors, timeouts, 5xx answers and the codes busy, full, internal
// and corrupt are retried after a back-off that starts at 2 seconds and
// doubles with every failure (2, 4, 8 ... 1024 s), up to 30 minutes, then
// every 30 minutes; each wait is up to a fifth shorter at random, and all
// of it is times RetryScale (retry.go). A shipped cycle or sync piece
// resets the back-off to 2 seconds. Refusals
// that need an admin (401/403, forbidden, unknown_vm, mismatch, a TLS
// certificate the other side rejects, a failed journal) stop replication
// with health critical until Resume.
//
// A Sync whose deadline passes returns a SyncTimeoutError (timeout.go)
// that names the cycle and says why it is not applied: the replica has
// not answered since a time, or answers with an error, the last error,
// and when it is tried next.
//
// # Verify
//
// Verify (verify.go) is an online scrub: step by step the replica hashes its
// blocks at an applied cycle A (wire.SumsCycleHeader), the primary reads its
// own at a bounded rate and then asks the journal which changed after A
// (journal.ChangedSince); those are skipped, the rest compared, a differing
// block refined to 4 KiB. With no recorded block hashes yet, the primary's
// image is taken as the truth: differences start a resync at once, outside
// the resync window too (unless a dry run), and the resync sends the
// primary's blocks. The last
// result is kept in the state file (LastVerify) and shown in Status.
//
// # State file
//
// JSON in an envelope with a format name, a version and a CRC32C of the
// state (see state.go), replaced atomically with vfs.WriteFileAtomic.
//
// # Concurrency
//
// A Shipper is safe for concurrent use. Run owns two goroutines: the loop
// that ships, syncs and retries, and the ticker that seals cycles; while a
// cycle's commit is in flight, the loop's step owns one more, which sends
// it and records a success (cycle.go) while the loop uploads the next. Lock
// order: opMu (one sync operation: the loop's step or WriteOffline), then
// saveMu (state file writes), then mu (in-memory state). No lock but opMu is
// held across journal or network calls.
package ship
