package wire

import (
	"fmt"
	"regexp"
	"time"
)

// Limits of the protocol.
const (
	// MaxChunk bounds the body of one upload request.
	MaxChunk = 8 << 20
	// MaxFrameData bounds the disk bytes of one data frame.
	MaxFrameData = 1 << 20
	// MaxStored bounds a frame's stored payload (compression can grow data
	// a little; an encoder then stores it raw).
	MaxStored = MaxFrameData + 64
	// HashSize is the size of one block hash in a SumsRequest answer.
	HashSize = 32
	// ChunkCRCHeader carries the CRC32C of an upload chunk, 8 hex digits.
	ChunkCRCHeader = "Vdrepl-Chunk-Crc32c"
	// SumsCycleHeader, in the answer to a SumsRequest, is the applied cycle
	// the replica's images were at while it hashed the range (decimal). It
	// is absent when the images are not at one applied cycle (an initial
	// copy or a failover under way), and from replicas older than verify.
	SumsCycleHeader = "Vdrepl-Sums-Cycle"
	// SumsKindHeader, in the answer to a SumsRequest with a Kind, is the
	// kind the answer holds.
	SumsKindHeader = "Vdrepl-Sums-Kind"
)

// Paths of the HTTP protocol (doc.go).
const (
	// ReplicasPath is the root of the endpoints of replica VMs: the
	// endpoints of VM vm are under ReplicasPath + vm.
	ReplicasPath = "/v1/replicas/"
	// PeerPath is the replica's probe for `vdrepl doctor`, outside the
	// endpoints of VMs and changing nothing:
	//
	//	GET  /v1/peer   -> PeerInfo: the caller is on the allow-list; 403 (code
	//	                   "forbidden") if it is not
	//	POST /v1/peer   the same, after reading and discarding a body of at
	//	                most MaxChunk bytes (Received says how many arrived),
	//	                so that a primary can see whether a proxy on the way
	//	                lets a full upload chunk through
	//
	// Like every request it needs a verified client certificate.
	PeerPath = "/v1/peer"
)

// PeerInfo is the answer of the probe at PeerPath.
type PeerInfo struct {
	Peer     string `json:"peer"`    // the caller's certificate name
	Pattern  string `json:"pattern"` // the allow-list entry that matched it
	Received int64  `json:"received"`
}

// Stream kinds.
const (
	KindCycle  = "cycle"  // the coalesced content of one closed cycle
	KindFull   = "full"   // a piece of an initial copy
	KindResync = "resync" // a piece of a checksum resync
)

// Disk is one replicated disk of a VM.
type Disk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// Header describes a stream. It is the JSON part of the stream header.
type Header struct {
	VM    string `json:"vm"`
	Kind  string `json:"kind"`
	Disks []Disk `json:"disks"`
	// Cycle is the cycle a KindCycle stream carries; Prev the cycle it
	// follows (Cycle-1 unless cycles were folded into a sync).
	Cycle uint64 `json:"cycle,omitempty"`
	Prev  uint64 `json:"prev,omitempty"`
	// Sealed is when the cycle's barrier was taken.
	Sealed        time.Time `json:"sealed,omitzero"`
	AppConsistent bool      `json:"app_consistent,omitempty"`
	// Point asks the replica to make the cycle a recovery point whatever
	// its interval says: it was meant to be application-consistent, but
	// the guest could not be quiesced.
	Point bool `json:"point,omitempty"`
	// Gen and Piece identify a sync piece (KindFull, KindResync).
	Gen   uint64 `json:"gen,omitempty"`
	Piece int64  `json:"piece,omitempty"`
	// Roots of a KindCycle stream are the primary's block-tree roots of
	// its images at the cycle's barrier, one per disk (blocktree.Root in
	// hex), for the replica to check its own against once it applied the
	// cycle. Missing when the primary's tree did not know them (it was
	// still being built).
	Roots []string `json:"roots,omitempty"`
}

// Enable is the body of PUT /v1/replicas/{vm}: the VM's disks as the primary
// has them (excluded disks left out).
type Enable struct {
	Disks []Disk `json:"disks"`
	// Existing: the replica's images are already there (a restored backup);
	// keep them as they are, a resync follows. Otherwise missing images are
	// created sparse.
	Existing bool `json:"existing,omitempty"`
	// RecoveryPoints is how many recovery points the replica keeps besides
	// the latest state (0..24), one per PointInterval (nanoseconds), and
	// one for each application-consistent cycle. Sent with every enable,
	// so a change takes effect when the primary's shipper restarts.
	RecoveryPoints int           `json:"recovery_points,omitempty"`
	PointInterval  time.Duration `json:"point_interval,omitempty"`
	// Excluded names the primary's disks that are not replicated, so a
	// failover on the replica can say which disks the VM lacks.
	Excluded []string `json:"excluded,omitempty"`
	// Frequency is the primary's cycle frequency (nanoseconds), so that
	// the replica can tell when cycles stop arriving (its health). 0 from
	// a primary that does not send it: the replica then goes by the
	// spacing of the barriers it applies.
	Frequency time.Duration `json:"frequency,omitempty"`
}

// MaxRecoveryPoints bounds Enable.RecoveryPoints.
const MaxRecoveryPoints = 24

// Replica is the replica's view of one replicated VM.
type Replica struct {
	VM      string `json:"vm"`
	Primary string `json:"primary"` // certificate name of the primary that owns it
	Disks   []Disk `json:"disks"`
	// State: "new" (no data yet), "initial-copy", "resyncing", "replicating".
	State string `json:"state"`
	// Applied is the last cycle applied; the image equals the primary's at
	// that cycle's barrier once Consistent.
	Applied uint64 `json:"applied"`
	// AppliedAt is the barrier time of cycle Applied (zero after a sync).
	AppliedAt time.Time `json:"applied_at,omitzero"`
	// Consistent is false while an initial copy or resync is unfinished or
	// the cycles that follow it are not applied yet.
	Consistent bool `json:"consistent"`
	// ConsistentAt: after a sync, the cycle from which on it is consistent.
	ConsistentAt uint64     `json:"consistent_at,omitempty"`
	Sync         *SyncState `json:"sync,omitempty"`
	// RecoveryPoints and PointInterval: the policy of Enable. Points is
	// how many are kept now and PointBytes the undo data they take.
	RecoveryPoints int           `json:"recovery_points,omitempty"`
	PointInterval  time.Duration `json:"point_interval,omitempty"`
	Excluded       []string      `json:"excluded,omitempty"`
	Points         int           `json:"points,omitempty"`
	PointBytes     int64         `json:"point_bytes,omitempty"`
	// FailedOver is set once the VM was failed over on the replica host:
	// it takes no more data from its primary.
	FailedOver *FailedOver `json:"failed_over,omitempty"`
	// Diverged is set when the replica's block-tree roots after applying
	// a cycle differed from the primary's at its barrier: the replica is
	// not what the primary had, and a resync must repair it. A resync's
	// finish clears it.
	Diverged *Divergence `json:"diverged,omitempty"`
	// Verified is the last cycle whose roots the replica checked against
	// the primary's and found equal (0: none since it started).
	Verified uint64 `json:"verified,omitempty"`
}

// Divergence says where the replica found itself different from the
// primary.
type Divergence struct {
	Cycle uint64    `json:"cycle"`
	Disks []string  `json:"disks"`
	At    time.Time `json:"at"`
}

// Handover is the body of POST /v1/replicas/{vm}/failover: a planned
// failover. The primary has stopped its VM's writes and shipped every
// cycle; the replica checks it applied Cycle, becomes the VM's primary and
// replicates back to ReplicateTo (the old primary's replica role) with
// the parameters that follow, sending only what differs.
type Handover struct {
	Cycle          uint64        `json:"cycle"`
	ReplicateTo    string        `json:"replicate_to"`
	Frequency      time.Duration `json:"frequency"`
	Compression    bool          `json:"compression,omitempty"`
	BypassProxy    bool          `json:"bypass_proxy,omitempty"`
	RecoveryPoints int           `json:"recovery_points,omitempty"`
	PointInterval  time.Duration `json:"point_interval,omitempty"`
}

// FailedOver describes a failover on the replica host.
type FailedOver struct {
	Kind string `json:"kind"` // "unplanned" or "planned"
	// Point is the recovery point the disks were rolled to ("" = the
	// latest state); Latest the last cycle applied before the failover.
	Point  string    `json:"point,omitempty"`
	Latest uint64    `json:"latest"`
	At     time.Time `json:"at"`
}

// Upload is how much of an upload the replica holds.
type Upload struct {
	ID     string `json:"id"`
	Offset int64  `json:"offset"`
}

// SyncStart is the body of POST /v1/replicas/{vm}/sync. Starting the
// generation the replica already runs resumes it.
type SyncStart struct {
	Gen       uint64 `json:"gen"`
	Kind      string `json:"kind"` // KindFull or KindResync
	Base      uint64 `json:"base"` // the cycle sealed when the sync began
	PieceSize int64  `json:"piece_size"`
	Pieces    int64  `json:"pieces"`
}

// SyncState is a sync as the replica has it: which pieces are durable.
type SyncState struct {
	SyncStart
	Done []int64 `json:"done"` // committed pieces, ascending
}

// SumsRequest asks for the hashes of the replica's blocks of one disk range.
// The answer is HashSize bytes (BLAKE3-256) per block; a block past the end of
// the disk is hashed as far as the disk goes.
//
// With Kind set, the replica answers from its block tree instead of reading
// its images: SumsLeaves, 8 bytes (little endian) per 64 KiB leaf digest of
// the range (Offset leaf-aligned); SumsBlocks, 8 bytes per 4 KiB block
// hash (Offset block-aligned). BlockSize is ignored. A digest or hash of 0
// is unknown. The answer's SumsKindHeader names the kind it holds: a
// replica that does not know kinds leaves it out (and answers BLAKE3 sums),
// and one whose tree cannot answer (still being built) fails with code
// "unavailable"; the primary then compares sums.
type SumsRequest struct {
	Disk      int    `json:"disk"`
	Offset    int64  `json:"offset"`
	Length    int64  `json:"length"`
	BlockSize int64  `json:"block_size"`
	Kind      string `json:"kind,omitempty"`
}

// SumsRequest kinds.
const (
	SumsLeaves = "leaves"
	SumsBlocks = "blocks"
)

// SyncFinish is the body of POST /v1/replicas/{vm}/sync/finish: every piece
// is committed; the replica applies a resync's staged pieces atomically and
// its image then follows cycle Base.
type SyncFinish struct {
	Gen  uint64 `json:"gen"`
	Base uint64 `json:"base"`
	// ConsistentAt is the first cycle at whose barrier the replica equals
	// the primary: the pieces were read while the guest wrote, so the copy
	// is exact only once the cycles up to the one sealed after the last
	// piece was read are applied. 0 = the cycle after Base.
	ConsistentAt uint64 `json:"consistent_at,omitempty"`
}

// Error codes. The primary retries "offset" (resume), "corrupt" (send
// again), "busy", "full" and "internal" (with back-off); the others need an
// admin and stop replication of the VM.
const (
	CodeOffset      = "offset"      // chunk at the wrong offset, or cut short; Offset says where to resume
	CodeCorrupt     = "corrupt"     // checksum or framing failed; the upload was discarded
	CodeGap         = "gap"         // cycle does not follow the last applied; Applied says which
	CodeFull        = "full"        // replica storage is full
	CodeBusy        = "busy"        // replica is busy (e.g. applying); retry
	CodeInternal    = "internal"    // replica I/O error
	CodeForbidden   = "forbidden"   // the primary may not write this VM
	CodeUnknownVM   = "unknown_vm"  // the replica has no such VM
	CodeMismatch    = "mismatch"    // disks, sizes or sync generation do not match
	CodeUnavailable = "unavailable" // what was asked cannot be answered now (a block tree being built); ask another way
	// CodeFailedOver: the replica VM was failed over on the replica host
	// and takes no more data from this primary.
	CodeFailedOver = "failed_over"
	CodeBadReq     = "bad_request"
)

// Error is the body of every non-2xx answer.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"error"`
	Offset  int64  `json:"offset,omitempty"`
	Applied uint64 `json:"applied,omitempty"`
}

func (e *Error) Error() string { return fmt.Sprintf("replica: %s (%s)", e.Message, e.Code) }

// Retryable says whether the primary should retry after this error.
func (e *Error) Retryable() bool {
	switch e.Code {
	case CodeOffset, CodeCorrupt, CodeBusy, CodeFull, CodeInternal:
		return true
	}
	return false
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidName checks a VM or disk name: 1-64 letters, digits, '.', '_' or '-',
// starting with a letter or digit. Such a name is safe as a path element.
func ValidName(s string) bool { return nameRE.MatchString(s) }

// CycleUploadID and SyncUploadID name uploads.
func CycleUploadID(c uint64) string { return fmt.Sprintf("c%d", c) }

// SyncUploadID names the upload of a sync piece.
func SyncUploadID(gen uint64, piece int64) string { return fmt.Sprintf("s%d-%d", gen, piece) }

// OfflineManifest describes an initial copy written to a directory (external
// media) instead of the network: manifest.json beside one stream file per
// piece, named SyncUploadID(Gen, piece) + ".vdws". The replica's
// `vdrepl replication import-initial VM DIR` applies them; the primary then
// ships the cycles after Base.
type OfflineManifest struct {
	Version   int       `json:"version"` // 1
	VM        string    `json:"vm"`
	Primary   string    `json:"primary"` // the primary's certificate name
	Disks     []Disk    `json:"disks"`
	Gen       uint64    `json:"gen"`
	Base      uint64    `json:"base"`
	PieceSize int64     `json:"piece_size"`
	Pieces    int64     `json:"pieces"`
	Created   time.Time `json:"created"`
	// ConsistentAt: see SyncFinish. The primary seals it right after the
	// pieces are written.
	ConsistentAt uint64 `json:"consistent_at,omitempty"`
}

// OfflineManifestFile is the manifest's name in an offline directory.
const OfflineManifestFile = "manifest.json"

// PieceCount is the number of sync pieces of the disks: each disk is cut into
// pieces of pieceSize bytes (the last one shorter), numbered across the disks
// in order.
func PieceCount(disks []Disk, pieceSize int64) int64 {
	var n int64
	for _, d := range disks {
		n += (d.Size + pieceSize - 1) / pieceSize
	}
	return n
}

// PieceRange is the disk range of piece p; ok is false past the last piece.
func PieceRange(disks []Disk, pieceSize, p int64) (disk int, off, n int64, ok bool) {
	for i, d := range disks {
		k := (d.Size + pieceSize - 1) / pieceSize
		if p < k {
			off = p * pieceSize
			return i, off, min(pieceSize, d.Size-off), true
		}
		p -= k
	}
	return 0, 0, 0, false
}
