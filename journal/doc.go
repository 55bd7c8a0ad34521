// Package journal is vdrepl's write path: the durable, ordered record of every
// write to a VM's disks, the cycles cut from it for shipping, and the write-back
// of journaled data into the raw images.
//
// # Write path
//
// A write is appended to the VM's journal and acknowledged; it is not yet
// durable. Flush (NBD FLUSH, FUA, fsync on the FUSE file) syncs the journal with
// one shared fdatasync for every write already acknowledged, on every disk and
// connection; the journal also syncs itself every second, and sooner once
// 32 MiB is unsynced. Only synced records are written back to the images, by
// one background goroutine in journal order; until then reads find the newest
// data through an in-memory map of pending blocks. Writes of 128 KiB or more
// go to the journal with O_DIRECT, and the write-back takes their data from
// the append buffer it keeps (up to 64 MiB of them) instead of reading the
// journal back (direct.go); a front end may receive such a write straight
// into that buffer (Disk.ReceiveWrite). Append buffers of up to 1 MiB come
// from memory backed by huge pages (vfs.HugePool), so each reaches the disk
// as one request, not split at the device's limit of pieces per request;
// the disk, writing every byte twice, is what bounds a sequential stream.
// A direct append waits while the kept
// buffers are at their budget: that is the journal's back-pressure, which
// holds a client to the rate the images take. So the image never holds a
// write the journal lacks, after a kill -9 or a power cut alike, and no resync
// is needed after a host crash. A checkpoint (images synced, then the
// checkpoint file replaced atomically) bounds replay after a restart; it runs
// beside the write-back, which goes in bounded batches and syncs the journal
// between them when a sync is due (writeback.go).
//
// Trims and zeroes are recorded as ranges, never as data. They are applied to
// the image as soon as their record is synced, so a large discard costs one
// record and one fallocate, not a map entry per block.
//
// # Cycles
//
// Seal appends a seal record: every record before it belongs to the closed
// cycle, every record after to the next. A closed cycle's index (block ->
// journal position of its newest data, plus its trim/zero ranges) lives in
// BadgerDB, positions only, and is rebuilt from the segments on every Open.
// Beside each run of blocks it keeps the record holding the run's data: its
// LSN, payload length and payload CRC32C (cycleStore).
// Closed cycles and the segments they need stay until Release. Past Cap bytes
// of unreleased journal the VM switches to a dirty-block bitmap and is marked
// resync required; guest writes never fail for lack of journal space.
// ChangedSince answers from the same indexes which blocks changed after a
// barrier (for `vdrepl verify`), and ErrTooOld once a cycle after it was
// released or writes were only tracked as dirty blocks.
//
// # Damage at rest
//
// Every read of journaled data for shipping or write-back verifies the
// payload CRC32C of the record it comes from. ReadExtent of an extent that
// is a record's whole payload checks it in the same read; one that covers a
// part (the rest rewritten later in the cycle) reads the whole payload into
// a scratch buffer to check it. A mismatch returns a *DamageError (errors.Is
// ErrDamaged) naming the disk, the record's byte range, its LSN and segment
// file, and never the data. The shipper then never ships the cycle: it marks
// the VM resync required with that error as the reason, and the resync
// repairs the replica from the primary's image. It does not ship the range
// from the image instead, even where the image's CRC32C over the record's
// range equals the record's: a 32-bit checksum matching over up to 32 MiB is
// evidence, not proof, and the resync reaches the same bytes by comparing
// them.
//
// The write-back reads a record from the journal when its append buffer
// was not kept; it verifies the whole payload first and, on a mismatch,
// writes none of it to the image: the journal fails (ErrFailed wrapping the
// *DamageError, logged at ERROR), and so do writes and flushes until it is
// reopened. The record lies past the checkpoint, so the next Open reads it
// again and applies Recovery's rules: with a later record saying a sync
// covered it, that is a corrupt middle and Open refuses with ErrCorrupt,
// changing nothing; as the journal's last record it is cut, its range
// marked dirty (below).
//
// # Block tree
//
// The journal keeps the images' block-hash tree (internal/blocktree) in its
// own Badger, under the prefix 'T'; Open drops only the cycle index's
// prefixes, so the tree survives a restart (with IndexDir "" the database
// is in memory and the tree is rebuilt at every Open). It is kept always,
// replication on or not: it costs an XXH64 per written block and one
// Badger commit per write-back batch, and a VM that turns replication on
// later starts its initial copy, and any verify, with a built tree.
// Config.NoBlockTree turns it off, only for benchmarks that measure what
// it costs (bench/fio.sh); a tree left in IndexDir is then marked dirty,
// so the next Open with a tree rebuilds it.
//
// Hashes are taken when the front end hands the write to the journal, on
// its goroutine, not by the write-back: appendWriteVia hashes the payload
// of a plain record before it is copied, and copyCRC and receiveCRC (the
// append buffer of an O_DIRECT record, copied or received into) hash each
// piece as they checksum it, while it is in the CPU cache. The record's
// hashes (8 bytes per 4 KiB block) wait with it in the write-back queue.
// So they are of the very bytes its CRC32C is of: a payload the write-back
// reads back from the journal is verified against that CRC32C as before,
// and the hashes stand for it. (The write-back is a single goroutine that
// bounds a stream; hashing there cost 10-20% of BenchmarkWrite.) Replay at
// Open hashes the payloads it reads back from the segments.
//
// The write-back keeps the tree. For every write record it passes, the
// tree takes the hash of every block of the payload it wrote from (taken
// at append, above); for every trim or zero, ZeroHash over its range
// when the write-back passes its record, even though the caller applied it
// to the image earlier. So the tree follows the journal's order: after the
// write-back passed LSN x, it holds the content the records below x give.
// A block that a newer durable record rewrites is not written to the image
// from the older record (the write-back skips it) but the tree takes its
// hash all the same: otherwise the tree at a barrier would not be the
// barrier's content, and a replica that applied the cycle would see roots
// it cannot match. The tree then claims, for such a block, the hash the
// image gets once the newer record (queued, durable) is written back; a
// crash before that replays the newer record into both. One Commit per
// write-back batch, after its image writes returned and before applied
// passes them (a large trim is committed in pieces of 2048 leaves).
//
// Barriers: a write-back batch never mixes two cycles. Before it applies
// the first record of cycle M, the tree holds every record of cycles < M
// and none after, so its roots are those of each barrier < M not yet
// recorded; when the queue holds no record of cycles <= c and c's seal is
// durable, the roots are c's. RootsAt answers from the last 256 barriers
// (nil where the tree was incomplete), WaitWrittenBack waits for one.
// After Open, the last closed cycle's roots are known only if no record
// follows its seal.
//
// Crash consistency. The checkpoint syncs the images, then the tree
// (tree.Sync), then writes the checkpoint file; the write-back commits a
// record to the tree before applied passes it. So the durable tree holds
// at least every record below the checkpoint's Applied, and replay from
// there re-applies every later record to the images and the tree in one
// batch (idempotent: a block gets the last record's hash, as the image
// gets its data). What the tree holds beyond Applied (Badger keeps a
// prefix of its commits) is overwritten by that replay. A commit split
// over several transactions is marked dirty until its last, and a dirty
// tree is reset at Open. A cut record whose header verifies (Recovery,
// below) may be in the image or not, and the tree may claim its hashes or
// the previous ones: Open makes its range Unknown (then replay sets the
// blocks replayed records write), commits and syncs before the checkpoint,
// so the tree never claims a hash the image may not have. The background
// then re-hashes those leaves from the image (repairTree, under the
// build's rule below), so that the tree has roots again: it describes what
// the image holds, and the resync the cut asked for compares that with the
// replica. The dirty-map mode changes nothing here: the write-back runs
// on. A Badger error in a Commit fails the journal like an image write
// error: the tree must not fall behind the images unnoticed.
//
// Build: a tree Open finds reset is rebuilt from the image files by the
// background goroutine, one 4 MiB step (BuildStep) per background step,
// holding wb, so the images stand still; it reads with O_DIRECT where the
// image can, not to fill the page cache with a whole disk. A step is put off while a queued
// record touches its range (the image there is ahead of or behind the
// tree's journal-order view: an eagerly applied trim, a skipped block);
// under a write stream that covers the whole disk the build waits for
// the write-back to catch up. Stats reports the tree's state.
//
// # Segment file
//
// A segment is named by its base LSN (16 hex digits + ".seg"). LSNs are byte
// positions in the endless journal: a record's LSN is base + file offset.
//
//	offset  size  field
//	0       4     magic "VDJS" (0x534a4456 little endian)
//	4       1     version (1)
//	5       3     zero
//	8       8     base LSN
//	16      8     creation time, unix nanoseconds
//	24      4     zero
//	28      4     CRC32C of bytes 0..27
//	32      ...   records, back to back, never spanning segments
//
// # Record
//
// All integers little endian.
//
//	offset  size  field
//	0       4     magic "VDJR" (0x524a4456)
//	4       1     version (1)
//	5       1     kind: 1 write, 2 trim, 3 zero, 4 zero (keep allocated), 5 seal,
//	              6 pad
//	6       2     disk index within the VM
//	8       8     LSN of this record (guards against stale bytes at a position)
//	16      8     cycle the record belongs to (for a seal: the cycle it closes)
//	24      8     disk byte offset
//	32      8     length on the disk (write: payload length)
//	40      8     synced: LSN known durable when the record was written
//	48      4     CRC32C of the payload
//	52      4     CRC32C of bytes 0..51
//	56      ...   payload: the data of a write; for a seal, 16 bytes:
//	              unix nanoseconds (8) and flags (8, bit 0 app-consistent,
//	              bit 1 recovery point wanted); for a pad, length zero bytes
//
// A pad (disk 0, offset 0, length < 8192) changes nothing. It fills the gap
// before a write of 128 KiB or more appended with O_DIRECT, whose payload must
// start on a 4 KiB boundary of the segment file: pad, then that record's
// header ending on the boundary (see direct.go). Readers skip pads.
//
// # Recovery
//
// Open scans every segment. A segment whose last record ends where the next
// segment begins is complete, whatever follows in its file (a recycled
// segment keeps its earlier life's bytes there). Otherwise the first record
// that does not verify ends the journal. If it lies at or beyond the largest "synced" value of any valid
// record, it is a torn tail (ErrZeroed or ErrInvalid from the decoder): the
// segment is cut back to its last valid record and later segments removed.
// Below that watermark a sync had covered it: Open fails with ErrCorrupt and
// changes nothing.
//
// A torn tail whose first record has a header that verifies (magic, version,
// its own LSN, header CRC) but a payload that does not, or is cut short,
// may hide data already in the image: that record was written whole once,
// and a sync no later record reports may have covered it and let the
// write-back copy it. So with replication on (Config.Retain) the cut does
// not drop that knowledge: the range [offset, offset+length) of its disk,
// and that of every write record whose header verifies after it (in its
// segment or the segments dropped with it), is marked in the dirty map,
// the VM becomes resync required (Stats.ResyncRequired, with the record's
// LSN, segment and range in Stats.ResyncReason) and the resync ships those
// ranges from the image. Each is logged at WARN. A tail whose first header
// does not verify (zeroes, stale bytes of a recycled segment) is an
// ordinary torn tail, logged at INFO: no sync covers what follows a record
// still in flight, so none of it reached the image. The known limit: damage
// at rest in the header of the very last record is indistinguishable from a
// torn tail, so that record is cut without a trace; the block-hash scrub
// that a later step adds catches the difference it leaves.
//
// Then every record past the checkpoint is replayed into the
// images (idempotent) and a new checkpoint written. The header framing, the
// scan, the search past damage and the cut are internal/recordlog's
// (recordlog.CutTornTail); the journal adds LSNs and the watermark across
// segments.
//
// The checkpoint file (48 bytes): magic "VDJC", version, applied LSN, head
// LSN, released cycle, open cycle, CRC32C. The dirty map file: see state.go.
//
// # Concurrency
//
// A Journal and its Disks are safe for concurrent use. Writes to overlapping
// 1 MiB regions are serialised by stripe locks (an unaligned write must
// read-modify-write whole blocks); appends to the segment reserve their LSN
// under the journal mutex and write outside it. The Journal struct groups its
// fields by the lock that guards them: mu (with its condition variable) guards
// the log, the cycles and the write-back queue; wb guards the write-back's
// buffer and is held by whatever changes the images; sealMu, ckptMu, dirtyMu,
// syncMu and segMu guard no field but serialise seals, checkpoints, dirty map
// file changes, journal syncs, and reads of segment files against their
// removal. Lock order: a goroutine holding one takes only later ones. The
// block tree's own mutex comes after all of them; the tree changes only
// under wb.
//
//	stripe locks (ascending)
//	sealMu
//	wb or ckptMu (never both: the write-back and a checkpoint run side by side)
//	dirtyMu
//	syncMu
//	segMu
//	mu
package journal
