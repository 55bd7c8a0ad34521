// Package apply is the replica side of vdrepl: the HTTPS receiver of the
// protocol in internal/wire, its authorization, the staging of uploads, and
// the atomic apply of cycles and sync pieces to the replica images.
//
// The daemon makes one Server per host with New, serves its Handler over
// mutual TLS, and keeps its allow-list with Allow and Disallow; the
// recovery points and failovers of its replica VMs go through Points,
// View, FailOver, CancelFailover and CompleteFailover, extended
// replication through SetRelay. Close refuses new requests and waits.
//
// # Authorization
//
// A request is served only over TLS with a verified client certificate
// (pki's ServerConfig); anything else gets 403. The first allow-list entry
// whose pattern matches the certificate (pki.Match) decides; none matching
// is 403. A new VM is created under that entry's storage directory, as
// <storage>/<vm>/, with the VM recorded as the peer's (its certificate
// name) and in the entry's trust group. An existing VM may be used by its
// recorded primary, or by a primary whose matching entry has the VM's
// (non-empty) trust group: the VM then moves to that primary on its first
// write. Everything else is 403 and changes nothing. VM, disk and upload
// names are checked (wire.ValidName, canonical ids) before they become
// path elements, and a VM directory must resolve (symbolic links followed)
// inside the storage directory.
//
// # Files
//
// The state directory (Config.StateDir) holds
//
//	allow.json      the allow-list, in order
//	replicas.json   VM name -> VM directory, for every replica VM
//
// and each VM directory (<storage>/<vm>/)
//
//	replica.json             the VM's state (below)
//	<disk>.img               one replica image per disk, sparse, the disk's size
//	staging/<id>.part        an upload being received: chunks appended in order
//	staging/c<N>.stream      cycle N, verified and durable, being applied
//	sync/<gen>/<piece>.stream  committed pieces of resync <gen>, applied at finish
//	points/                  recovery points (package snapshot; points.go)
//	tree/                    the images' block tree, a BadgerDB (tree.go)
//
// A VM of this host adopted as a replica when replication is reversed to it
// (host.go) keeps its images where they were (replica.json "images") and
// the rest in <state>/adopted/<vm>/.
//
// Every state file appears atomically (vfs.WriteFileAtomic: temporary file,
// fsync, rename, fsync of the directory) and is one JSON object, the
// envelope
//
//	{"format":"vdrepl-replica","version":1,"crc32c":"1a2b3c4d","body":{...}}
//
// where crc32c is the CRC32C (hex) of the body's bytes exactly as stored
// and format is "vdrepl-allow", "vdrepl-replicas" or "vdrepl-replica".
// Readers refuse another format, another version or a checksum mismatch
// (ErrState).
//
// # replica.json
//
// The body's fields:
//
//	vm, primary, trust_group   who owns the VM (primary: certificate name)
//	disks                      name and size of each disk, in the primary's order
//	state                      "new", "initial-copy", "resyncing", "replicating"
//	applied, applied_at        the last cycle applied and its barrier's time
//	consistent                 the images equal the primary's at cycle applied
//	needs_sync                 images were there before the VM (Enable.Existing):
//	                           only a finished sync makes the VM replicating
//	sync                       the running sync: its SyncStart, done pieces as
//	                           half-open ranges [[from,to],...], start time
//	last_sync                  generation of the last finished sync (a repeated
//	                           finish is answered as success)
//	intent                     an apply in progress (below)
//	created                    when the VM was created here
//	points, point_interval     the recovery point policy (wire.Enable)
//	excluded                   the primary's disks it does not replicate
//	failover                   a failover on this host: kind, point, latest
//	                           (the last cycle applied before it), at,
//	                           reverted, cancelling (points.go)
//	images                     image paths of an adopted VM (host.go)
//	frequency                  the primary's cycle frequency (wire.Enable;
//	                           absent when the primary does not send it)
//	cycle_gaps                 barrier spacing of the last cycles applied one
//	                           after the other (at most 4), for health
//	last_cycle_at              this host's clock when a cycle was last
//	                           applied, or the VM last became replicating
//	last_piece_at              this host's clock when the running sync began,
//	                           last committed a piece, or (held) staged a
//	                           cycle; absent when no sync runs
//	verified                   the last cycle whose block-tree roots equalled
//	                           the primary's (Block tree, below)
//	diverged                   {cycle, disks, at}: roots differed after that
//	                           cycle; cleared when a sync finishes
//
// # Apply and intent
//
// Cycle order: a cycle N <= applied is answered as success and not applied
// again. Otherwise its header's Prev must equal applied (code "gap" with
// Applied); Prev is normally N-1, less when the primary folded cycles into
// a sync (wire.Header), so N itself may skip ahead of applied+1.
//
// A cycle commit makes sure the whole staged upload verified (every CRC and
// the stream's BLAKE3 end hash: checked as the chunks were staged, by a
// wire.Verifier, or read again from the file after a restart), fsyncs it,
// renames it to staging/c<N>.stream
// and fsyncs the directory, then writes replica.json with intent
// {"op":"cycle","cycle":N,"sealed":T}. Only then are the frames written to
// the images (data with pwrite, trim and zero with fallocate PUNCH_HOLE,
// zero-alloc with ZERO_RANGE; vfs falls back to writing zeroes), the images
// fsynced, and replica.json written with applied=N and no intent; the
// stream is removed last. A resync finish does the same with intent
// {"op":"resync","gen":G,"base":B} over sync/<G>/0.stream, 1.stream, ...
// in piece order.
//
// Every frame carries final content, so applying a stream again, whole or
// after part of it was applied, leaves the same images. Hence recovery: New
// loads every VM and, if replica.json has an intent, verifies the staged
// streams again and applies them again, then finishes the bookkeeping. A
// replica killed mid-apply comes back at cycle N-1 (no intent durable yet:
// the images were not touched) or N (intent durable: the apply is redone),
// never between. (An intent whose cycle stream is gone never began: the
// stream is removed only after applied=N is durable. It is dropped.) The
// same happens when an apply fails on an I/O error: the
// intent stays, and the next request that needs the images (a commit, a
// sync, sums) redoes it before anything else; if that fails too the
// request fails with the error. Meanwhile the upload's offset (GET
// .../uploads/c<N>) is the staged stream's size, so the primary's retry
// sends no byte again and only commits, which finishes the apply.
//
// # What an answer acknowledges
//
// A chunk's answer (the new offset) says the chunk is in
// staging/<id>.part, not that it is durable: the commit fsyncs the upload
// before anything else. A cycle commit answers success only once the cycle
// is applied: the images fsynced and replica.json durable with applied=N
// (or N applied before: a repeated commit). That is more than the durability
// the primary needs before it drops the cycle from its journal, and every
// "applied" in an answer (wire.Replica) is a cycle the images hold. The one
// exception is a cycle before ConsistentAt of a held resync (below): it is
// answered once staged durably and recorded in held, the images staying at
// their last consistent point; the commit of ConsistentAt answers after the
// resync and every held cycle are applied. The
// stage in between, the stream verified, fsynced and renamed to
// staging/c<N>.stream with the intent durable, is never answered on its
// own: a crash after it comes back at N, and an I/O error after it fails
// the commit (the intent stays, as above). A sync piece's commit answers
// once the piece is durable (in the images for an initial copy, in
// sync/<gen>/ for a resync); a sync finish once the resync is applied, or
// held (then applied stays at the last consistent point).
//
// No apply runs in the background, so whatever comes after an answer
// (a failover, a handover, sums, Close) finds the images at applied. The
// primary keeps the replica busy instead (ship/cycle.go): it uploads cycle
// N+1 while the commit of N runs, its chunks staged beside N's apply (they
// take no apply lock), and sends N+1's commit only after N's answer.
//
// A cycle stream damaged at rest after it was verified (a frame fails its
// CRC while applied, or at recovery) cannot be finished from the local
// copy: the intent is dropped, the VM is marked not consistent until that
// cycle is applied (the images may hold part of it), and the commit answers
// "corrupt", so the primary, which keeps the cycle until it is applied,
// sends it again.
//
// Recovery also tidies: a cycle stream no intent names goes back to being
// a complete upload (staging/c<N>.part) if N is not applied yet, else it
// is removed; pieces and directories of sync generations no longer running
// are removed. So are uploads (.part) of cycles at or below applied: a
// cycle uploaded ahead whose commit never came, because the primary met a
// gap and resynced past it (a finished resync or initial copy removes them
// too). Other .part files stay, and the primary resumes them.
//
// Sync pieces: a piece of an initial copy (KindFull) is written straight to
// the images (there is no consistent point to keep), the images fsynced,
// and the piece marked done. A piece of a resync is moved to
// sync/<gen>/<piece>.stream (fsync of both directories) and marked done;
// the images stay at their last consistent point until finish.
//
// A resync finish that names ConsistentAt (the cycle the primary sealed
// after reading its last piece) is held: replica.json records
// held {gen, base, consistent_at, cycles}, and the cycles that follow the
// base are staged as staging/c<N>.stream without being applied. When cycle
// ConsistentAt is staged, one intent {"op":"resync", ..., "cycles": [...]}
// applies the pieces and then those cycles in order. So the images go from
// their last consistent point straight to the next one: there is no window
// after a resync in which the replica holds no consistent image. A new sync
// drops a held one and its staged cycles.
//
// # Block tree
//
// Each VM keeps a block-hash tree of its images (internal/blocktree): in
// its own BadgerDB under tree/ on the real filesystem, in memory (rebuilt
// at every open) on any other, as in tests. It is an index, never a
// source of truth: a VM whose tree cannot be opened runs without one.
//
// applyFiles, where every stream (cycle, sync piece, resync, import)
// reaches the images, keeps it. Before the first image write the tree is
// marked dirty, durably (Begin); each frame goes into a batch as it is
// written (a data frame's whole blocks get their hash, a trim or zero's
// the zero hash); the blocks a frame covers only in part are read back
// from the image once the frames are written and hashed; after the
// images are fsynced the batch is committed and the tree synced, before
// replica.json says applied. A batch past 16384 leaves (1 GiB of disk) is
// committed midway the same way: images fsynced, commit, dirty again. So
// a clean tree on disk always describes fsynced images, and one found
// dirty at open is reset (blocktree.Open). An apply that fails resets the
// disks it touched. A tree that errs is dropped (closed, its directory
// removed; if that fails, no image changes until it is gone).
//
// A tree reset or new is built in the background: one goroutine per VM,
// 4 MiB at a time, each step under the apply lock, reading the images;
// Close stops it. A failover forgets the tree (the revert, the failed-over
// VM's writes and a cancel's rollback change the images behind apply), and
// it is not built while the VM is failed over; a cancel builds it again.
//
// POST .../sums with a Kind answers from the tree without reading the
// images: 8 bytes, little endian, per 64 KiB leaf digest (SumsLeaves,
// offset a multiple of 64 KiB) or 4 KiB block hash (SumsBlocks, offset a
// multiple of 4 KiB), at most 2^20 of them, the range ending by the disk's
// end rounded up to the unit; with the SumsKindHeader and SumsCycleHeader
// as for BLAKE3 sums. While the disk's tree is not built, or the tree is
// dirty, or the VM is failed over, the answer is 409 with code
// "unavailable" (409, not 503: the primary falls back to BLAKE3 sums at
// once instead of retrying).
//
// Root check: a cycle stream's header carries the primary's roots at its
// barrier. After a cycle that leaves the images at that barrier (the VM
// consistent: not a cycle before a sync's ConsistentAt) is applied and
// the tree committed, the tree's roots are compared with them: equal
// records verified=N, different records diverged (the first cycle found
// different, the disks) in the same replica.json write as applied=N,
// logs an error and calls Events.Diverged; apply goes on, and the primary
// resyncs. A finished sync clears diverged. When the tree cannot tell its
// roots yet (being built, e.g. after a crash mid-apply whose re-apply
// found it reset), the build checks them on completion if the images are
// still at that cycle.
//
// # Recovery points, failover, handover, relay
//
// Every apply first saves the undo data of the ranges it will change (when
// points exist), then records the cycle with the VM's snapshot.Store,
// which takes a point as the policy says (points.go). A failover recorded
// in replica.json refuses the primary's writes (code "failed_over"); the
// images are then the daemon's, written through the points' guard until
// the failover is completed or cancelled. POST .../failover (a
// wire.Handover) is a planned failover: checked against the last cycle
// applied, then handed to the daemon (Host.Promote). A Relay set on a VM
// gets every applied frame, a whole apply between Begin and End (relay.go,
// extended replication).
//
// # Health
//
// The replica judges each VM by whether its primary's cycles keep
// arriving (Server.Statuses; health.go), as Hyper-V's replica does. The
// frequency is the one the primary sent with its enable, else the largest
// barrier spacing of the last four cycles applied one after the other (a
// `replication sync` seals early, so that spacing is not above the
// frequency; a pause makes it larger for four cycles, which only delays a
// warning). A replicating VM whose last cycle was applied (last_cycle_at)
//
//	at most 2 x frequency ago                   is normal,
//	more than 2 x frequency ago                 warning,
//	more than 6 x frequency or 1 hour ago,
//	whichever is less, but never less than
//	3 x frequency                               critical.
//
// One hour caps the wait for the frequencies an admin usually chooses:
// past it the newest recovery point is old. But critical never comes
// before 3 x frequency, so that a frequency of 30 minutes or more
// (--frequency has no upper bound) keeps a warning stage, and one over 1
// hour does not go critical between two cycles on time. With an unknown
// frequency (no cycle pair yet) the hour is the only threshold.
//
// A VM in an initial copy or resync is judged by the time since its sync
// last made progress (last_piece_at: the sync began, committed a piece,
// or, its pieces held for the cycle that makes them exact, staged a
// cycle):
//
//	at most 10 minutes or 2 x frequency ago,
//	whichever is more                           normal,
//	more than that                              warning,
//	more than 1 hour or 3 x frequency ago,
//	whichever is more                           critical.
//
// Pieces go one after the other at the pace of the link, not of the
// frequency, and one piece (64 MiB by default) takes about 9 minutes at
// 1 Mbit/s: 10 minutes without one is the first sign of a primary that
// stopped, not of a slow link, and a sync is never held to a tighter count
// than the cycles that follow it. An hour without progress is critical,
// as for cycles: the copy is stalled and no newer point is coming. So a
// primary that dies mid-copy shows on the replica (doctor, the alerts)
// instead of leaving it normal. A replica.json kept before last_piece_at
// existed goes by the sync's start until the next piece.
//
// A VM failed over on this host is normal: it takes no cycles, and
// `replication status` gives it the state "failed-over". A cancelled
// failover, like a finished sync, starts the count again. A replica.json
// kept before last_cycle_at existed goes by the barrier time of the last
// cycle applied until the next cycle arrives.
//
// # Concurrency
//
// A Server is safe for concurrent use. Each VM has an apply mutex that
// serialises everything that writes its replica.json or its images
// (commits, sync start and finish, sums, recovery, ownership moves,
// removal), so one apply runs per VM at a time; chunks of uploads are
// staged concurrently with applies, serialised per upload. Lock order:
// vm.apply, then an upload's lock, then vm.mu (the VM's state in memory),
// then Server.regMu (writes of allow.json and replicas.json), then
// Server.mu (allow-list, VM map). vm.mu and Server.mu are never held
// during I/O. Close refuses new requests and waits for those in flight,
// then stops the tree builds and closes the trees. A VM's tree and
// whatever goes with it are guarded by vm.apply; a build step takes it
// like an apply.
package apply
