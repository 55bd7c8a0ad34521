// Package wire is the replication wire format shared by the primary (ship) and
// the replica (apply): the byte layout of a transfer stream, the HTTP protocol
// that carries it in resumable chunks, and the JSON messages of that protocol.
// It imports nothing of vdrepl's.
//
// A sender writes a stream with NewWriter (Data and Range for its frames,
// Close for the end frame) and sends it as the HTTP protocol below says; a
// receiver checks chunks as they arrive with a Verifier and reads a staged
// stream back with NewReader. Both sides name endpoints with ReplicasPath
// and PeerPath and exchange the message types of messages.go.
//
// # Streams
//
// Everything a primary sends a replica's disks is a stream: a header, frames,
// and an end frame. A stream is one of
//
//   - a cycle: the coalesced content of one closed cycle of the VM (every
//     block it touched with its final data, and its trim/zero ranges);
//   - a sync piece: part of an initial copy or of a resync, the content of
//     some blocks of the disks as they were while the piece was read.
//
// All integers are little endian.
//
// Stream header:
//
//	offset  size  field
//	0       4     magic "VDWS" (0x53574456)
//	4       1     version (1)
//	5       3     zero
//	8       4     n: length of the JSON header
//	12      4     CRC32C of the JSON header
//	16      n     JSON header (type Header)
//
// Frame:
//
//	offset  size  field
//	0       1     type: 1 data, 2 trim, 3 zero, 4 zero (keep allocated), 255 end
//	1       1     flags: bit 0 = payload is zstd-compressed
//	2       2     disk index (into Header.Disks)
//	4       4     stored payload length (at most MaxStored)
//	8       8     disk byte offset
//	16      8     length on the disk (a data frame: at most MaxFrameData)
//	24      4     CRC32C of the stored payload
//	28      4     CRC32C of bytes 0..27
//	32      ...   payload
//
// A data frame's payload is the disk data, raw or zstd-compressed (each frame
// compressed on its own, so a reader needs no state from earlier frames and
// memory stays bounded). Trim and zero frames have no payload. The end
// frame's payload is 48 bytes: frame count (8, not counting the end frame),
// data bytes on the disk (8), and the BLAKE3-256 hash (32) of every stream
// byte before the end frame. A stream that stops before its end frame is
// truncated; one whose hash or any CRC fails is corrupt. Readers reject both
// without applying anything.
//
// Frames come in the order they must be applied: a cycle's trim/zero ranges
// first (in journal order), then its data by disk and offset.
//
// # HTTP protocol
//
// The replica serves HTTPS with mutual TLS. The primary is the peer's
// certificate name; the replica checks it against its allow-list. Every
// request but the probe names the VM; errors are JSON (type Error) with a
// Code that tells the primary whether to retry.
//
//	GET    /v1/replicas/{vm}                     -> Replica
//	PUT    /v1/replicas/{vm}          Enable     -> Replica   create or confirm
//	DELETE /v1/replicas/{vm}                     -> 204       stop replicating here (images stay)
//	GET    /v1/replicas/{vm}/uploads/{id}        -> Upload    how much is staged
//	PUT    /v1/replicas/{vm}/uploads/{id}?offset=O  chunk  -> Upload
//	POST   /v1/replicas/{vm}/uploads/{id}/commit -> Replica   verify, stage durably, apply
//	DELETE /v1/replicas/{vm}/uploads/{id}        -> 204       discard
//	POST   /v1/replicas/{vm}/sync     SyncStart  -> SyncState begin or resume an initial copy/resync
//	POST   /v1/replicas/{vm}/sums     SumsRequest -> binary: HashSize bytes per block (8 per leaf or block with a Kind)
//	POST   /v1/replicas/{vm}/sync/finish SyncFinish -> Replica
//	POST   /v1/replicas/{vm}/failover Handover   -> Replica   planned failover: become primary
//	GET    /v1/peer                              -> PeerInfo  the probe of vdrepl doctor (PeerPath)
//	POST   /v1/peer   up to MaxChunk bytes       -> PeerInfo  the same; Received: bytes read
//
// The answer to /sums carries the SumsCycleHeader header: the applied
// cycle the images were at while the replica hashed the range, which it does
// under the lock its apply holds, so the whole range is at that one cycle.
// It is missing when the images are not at one applied cycle (an initial
// copy, an interrupted apply, a failover); a primary's resync does not
// look at it, and `vdrepl verify` compares a range only when it is there
// (ship/verify.go).
//
// An upload is one stream sent as chunks of at most MaxChunk bytes, each a
// PUT with its offset in the stream and the CRC32C of the chunk in the
// ChunkCRCHeader header. The replica appends a chunk only at the offset it
// has staged so far; any other offset gets 409 with code "offset" and the
// staged offset, from which the primary resumes. So does a chunk whose body
// stops before its Content-Length (the connection was closed, reset or
// timed out mid-body): nothing of it is stored, and it is a cut
// connection, not corruption; "corrupt" is a whole chunk that fails its
// CRC32C. A primary may have two
// chunk requests of an upload in flight (on two connections), sent with
// "Expect: 100-continue": the replica reads the body of a chunk beyond its
// staged offset only once the chunks before it were received, then holds
// it until they are staged (at most 2 s for one to arrive, a minute in
// all) and checks its offset; one whose predecessor failed is refused
// unread. So no request carries more than MaxChunk bytes (forward proxies
// drop large uploads), and a broken connection costs at most one chunk. Upload ids: "c<cycle>" for cycles,
// "s<generation>-<piece>" for sync pieces.
//
// Commit verifies the whole stream (CRCs, hash, VM, disks, cycle order),
// makes it durable, and applies it; it answers only after the result is
// durable. Every answer's Replica.Applied is the last cycle the replica's
// images hold, and only that tells the primary a cycle is applied: a
// replica holding a resync (a SyncFinish with ConsistentAt past Base)
// answers the finish, and the commits of the cycles before ConsistentAt,
// with Applied still at its last consistent point, and the commit of
// ConsistentAt once the pieces and those cycles are applied. A cycle must
// follow the last applied one (code "gap" otherwise); a cycle already
// applied is answered as success without being applied again.
// A corrupt stream is discarded (code "corrupt") and must be sent again.
// A commit that failed after the stream was staged durably (an I/O error
// while applying it) leaves the upload whole: its GET offset is the
// stream's size, and committing it again finishes the apply.
package wire
