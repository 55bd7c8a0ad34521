// Package snapshot keeps a replica VM's recovery points as undo data: for
// each point, the content at that point of the blocks changed since, never
// a full copy. It gives read-only views of any point while apply goes on,
// a writable throw-away overlay of a view (test failover), and rollback of
// the images to a point (unplanned failover).
//
// # Model
//
// The images hold the latest applied cycle. Points P_0 < P_1 < ... < P_m are
// older cycle barriers. Segment k belongs to P_k: it holds, for every 4 KiB
// block overwritten, trimmed or zeroed after P_k's barrier and before
// P_(k+1)'s (for the newest, the open segment: up to now), the block's
// content at P_k, saved the first time the block changes in that interval
// (BeforeWrite). So the cost of a point is one copy of each block changed
// while it was the newest point, however often it changed.
//
// Block b of point P_k is the record of b in the oldest segment j >= k that
// holds one (b did not change between P_k and P_j, so its content at P_j is
// its content at P_k); in no such segment, b has not changed since P_k and
// the image has it. New records only go to the open segment and only for
// blocks it lacks, so the answer for P_k can only move from "the image" to
// "the open segment" and with the same bytes: a View stays exact while
// apply keeps writing.
//
// With no points there is no segment and BeforeWrite does nothing.
//
// # Contract with apply
//
// For every range apply is about to write to an image (data frames, trims,
// zeroes, resync pieces, initial copy pieces), BeforeWrite (data) or
// BeforeZero (trim, zero) must return nil first; then Sync; only then may
// the image change. Cycle(c, ...) after the images hold cycle c and are
// synced. Apply re-running a cycle after a crash is harmless: the blocks it
// saved the first time are not saved again, and Cycle for a cycle already
// recorded does nothing. A crash after BeforeWrite and Sync but before the
// image write leaves records of blocks that did not change yet: they hold
// the content at the point, which is what a later BeforeWrite would save.
//
// # Files
//
// Config.Dir holds
//
//	manifest            the points and their segments (atomic replace)
//	<16 hex>.undo       segment files, named by segment number
//	rollback            a rollback in progress (atomic create)
//	*.tmp               a manifest or intent being replaced; removed at Open
//
// All integers little endian; CRC32C is Castagnoli.
//
// # Segment file
//
//	offset  size  field
//	0       4     magic "VDUS" (0x53554456)
//	4       1     version (1)
//	5       1     zero
//	6       2     number of disks of the VM
//	8       8     segment number (as in the file name)
//	16      8     cycle of the point the segment starts at
//	24      4     salt: random, repeated in every record of the segment
//	28      4     CRC32C of bytes 0..27
//	32      ...   records, back to back
//
// The header is synced, and the name synced in the directory, before the
// manifest names the segment.
//
// # Record
//
//	offset  size  field
//	0       4     magic "VDUR" (0x52554456)
//	4       1     version (1)
//	5       1     kind: 1 data (a 4096-byte payload follows), 2 zero (the
//	              block read as zeroes at the point; no payload)
//	6       2     disk index
//	8       8     block index (byte offset / 4096), below 2^48
//	16      8     synced: bytes of the segment known durable when the
//	              record was written (always <= the record's offset)
//	24      4     the segment's salt
//	28      4     CRC32C of the payload (0 for a zero record)
//	32      4     zero
//	36      4     CRC32C of bytes 0..35
//	40      4096  payload (data records only)
//
// A block past the end of a disk whose size is not a multiple of 4096
// holds zeroes in the payload beyond the end.
//
// # Manifest
//
//	offset  size  field
//	0       4     magic "VDPM" (0x4d504456)
//	4       1     version (1)
//	5       3     zero
//	8       8     sequence, +1 on every write (a rollback intent names one)
//	16      8     next segment number
//	24      4     D, number of disks
//	28      4     P, number of points
//	32      8*D   size of each disk in bytes
//	...     40*P  points, oldest first, each:
//	                0  8  segment number
//	                8  8  cycle
//	               16  8  barrier time, Unix nanoseconds (0: unknown)
//	               24  8  flags: bit 0 application-consistent
//	               32  8  size of the closed segment; 0 for the newest
//	                      (open) one, and only for it
//	end-4   4     CRC32C of every byte before it
//
// It is replaced atomically (vfs.WriteFileAtomic) when a point is taken or
// pruned and at the end of a rollback.
//
// # Rollback intent
//
//	offset  size  field
//	0       4     magic "VDRB" (0x42524456)
//	4       1     version (1)
//	5       3     zero
//	8       8     manifest sequence the rollback started from
//	16      8     segment number of the target point
//	24      8     cycle of the target point
//	32      4     zero
//	36      4     CRC32C of bytes 0..35
//
// Rollback verifies every record it needs, writes the intent, writes the
// point's content into the images and syncs them, truncates the previous
// point's segment to its closed size and writes a manifest without the
// target and newer points (the previous point's segment open again), then
// removes their segments and the intent. Open finds an intent whose
// sequence equals the manifest's and does it all again (every step is
// idempotent); one older than the manifest's is a finished rollback, and is
// removed.
//
// # Recovery at Open
//
// Open reads the manifest (a missing one is no points), then every segment
// it lists, verifying every record (header and payload checksums) while
// rebuilding the index; this reads all undo data once. A closed segment
// must verify up to its recorded size; any failure is ErrCorrupt. In the
// open segment, the first record that fails is the start of a torn tail
// (records written after the last Sync, kept by a crash in part and in any
// order) unless something proves a Sync covered it: a good record before it
// whose synced field is beyond it, or any good record of the segment after
// it (found by its magic and salt) whose synced field is beyond it. Then it
// is ErrCorrupt and Open changes nothing; otherwise the segment is
// truncated there (cutTornTail). Segment files the manifest does not name
// and *.tmp files are removed; a rollback intent is finished. The header
// framing, the scan and the cut are internal/recordlog's; snapshot adds
// the salt, the two record sizes and what synced means here.
//
// # Revert and the guard (unplanned failover)
//
// Revert(P) writes point P's content into the images like Rollback, but as
// a writer that goes through BeforeWrite: each block it changes is first
// saved in the open segment, as content at the newest point, which must be
// the latest cycle. So every point stays exact, and Rollback to the newest
// point undoes the revert and everything written since (a cancelled
// failover). GuardFS wraps a filesystem so that the images, written by
// anyone else (the failed-over VM's journal), save their undo data the
// same way, BeforeWrite or BeforeZero then Sync before each change. Revert
// verifies every record first, saves and syncs in batches before writing,
// and can be run again after a crash to finish (revert_test.go crashes it
// at every mutating call).
//
// Application-consistent barriers (freeze the guest, take the barrier,
// thaw) are package quiesce's, on the primary.
//
// # Errors
//
// After a write or sync of the Store's own files fails, memory and disk may
// disagree (fsync failures may drop the written data): every later call
// returns ErrBroken until the Store is closed and opened again. Failed
// reads and bad arguments change nothing.
//
// # Costs
//
// Memory: the index holds 16 bytes per block of a closed segment (a sorted
// slice: 4 MiB per GiB of undo data) and a Go map entry, 20 to 40 bytes,
// per block saved in the open segment since Open (5 to 10 MiB per GiB),
// merged into the sorted form when the segment closes. So memory follows
// the undo data kept, which Prune bounds; it does not grow with disk size.
// An Overlay keeps one bit per block of its disk (32 MiB per TiB).
//
// I/O: while there are points, the first change of a block after the
// newest point costs a read of the block from the image and a 4136-byte
// append (40 bytes if it read as zeroes). BeforeZero reads the whole range
// to find the blocks that are not zeroes already, so trimming a large,
// mostly empty range costs a read of it but no undo data. Open reads all
// undo data once. A View read of a block costs an index lookup per point
// newer than the view's and, for a saved block, a read of its record.
//
// # Concurrency
//
// A Store, its Views and Overlays are safe for concurrent use. Mutating
// calls (BeforeWrite, BeforeZero, Sync, Cycle, Prune, Rollback, Close) are
// serialised by Store.writeMu; they do their file I/O holding it. Reads
// (Points, View lookups) take Store.mu shared and do no I/O under it; a
// View's image and record reads run under no lock. Lock order:
// Store.writeMu, then View.mu, then Store.mu. OverlayDisk.mu (writes
// exclusive) is taken before any of the Store's locks.
package snapshot
