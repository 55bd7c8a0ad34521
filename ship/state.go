package ship

import (
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// The state file is the shipper's own progress, replaced atomically
// (vfs.WriteFileAtomic) at every change that matters after a restart:
//
//	{"format":"vdrepl-ship-state","version":1,"crc32c":"8 hex digits","body":{...}}
//
// (internal/statefile): crc32c is the CRC32C of the exact bytes of body. A file
// with another format, a version outside 1..1 or a bad checksum is refused
// (ErrState): the shipper does not guess at its progress.
const (
	stateFormat  = "vdrepl-ship-state"
	stateVersion = 1
)

// persisted is what survives a restart.
type persisted struct {
	VM string `json:"vm"`
	// InitialDone: an initial copy (or the resync of "existing") finished;
	// Initial is not looked at again.
	InitialDone bool `json:"initial_done"`
	// Gen is the last sync generation used; each sync takes the next.
	Gen uint64 `json:"gen"`
	// Sync is the initial copy or resync under way.
	Sync *syncRecord `json:"sync,omitempty"`
	// Resync is a resync that is needed but has not begun (waiting for its
	// window unless Manual).
	Resync *pendingResync `json:"resync,omitempty"`
	Paused bool           `json:"paused,omitempty"`
	// Applied is the last cycle the replica confirmed applied, with its
	// barrier time and when the replica answered. Only a replica's answer
	// (wire.Replica.Applied) moves it (confirmedApplied): a commit or a
	// sync finish that succeeded says what is durable there, not what the
	// images hold.
	Applied       uint64    `json:"applied"`
	AppliedSealed time.Time `json:"applied_sealed,omitzero"`
	AppliedAt     time.Time `json:"applied_at,omitzero"`
	Counters      counters  `json:"counters"`
	// LastAppSeal is when the last quiesced seal was tried;
	// LastAppConsistent the barrier of the last one that succeeded;
	// QuiesceError why the last try did not (empty when it did).
	LastAppSeal       time.Time `json:"last_app_seal,omitzero"`
	LastAppConsistent time.Time `json:"last_app_consistent,omitzero"`
	QuiesceError      string    `json:"quiesce_error,omitempty"`
	// LastVerify is the last verify that finished (verify.go).
	LastVerify *LastVerify `json:"last_verify,omitempty"`
	// Verified is the last cycle the replica found its block-tree roots
	// equal to ours at (wire.Replica.Verified, the highest it named).
	// Diverged is the divergence the replica reports now (nil once it
	// reports none); Repaired the divergence the last resync started for
	// one repaired, so that a replica that still names it after the
	// resync does not start another (divergence.go).
	Verified uint64           `json:"verified,omitempty"`
	Diverged *wire.Divergence `json:"diverged,omitempty"`
	Repaired *wire.Divergence `json:"repaired,omitempty"`
}

type syncRecord struct {
	Gen        uint64    `json:"gen"`
	Kind       string    `json:"kind"` // wire.KindFull or wire.KindResync
	Base       uint64    `json:"base"`
	BaseSealed time.Time `json:"base_sealed,omitzero"`
	PieceSize  int64     `json:"piece_size"`
	BlockSize  int64     `json:"block_size,omitempty"` // resync
	Pieces     int64     `json:"pieces"`
	// Offline is the directory an offline initial copy was written to; the
	// replica imports it and the shipper waits for that.
	Offline string `json:"offline,omitempty"`
	// Written: the offline copy is complete in Offline.
	Written bool      `json:"written,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	Started time.Time `json:"started"`
	// Finishing: /sync/finish was sent; after a restart, ask the replica
	// whether it took it before sending it again.
	Finishing bool `json:"finishing,omitempty"`
	// ConsistentAt is the cycle sealed after the last piece was read: the
	// replica equals the primary once it applied it (wire.SyncFinish).
	ConsistentAt uint64 `json:"consistent_at,omitempty"`
	// Divergence is the replica's divergence this resync repairs, if it
	// was started for one.
	Divergence *wire.Divergence `json:"divergence,omitempty"`
	// FullCompare: compare BLAKE3 sums of both sides' images, not block
	// trees (see pendingResync).
	FullCompare bool `json:"full_compare,omitempty"`
}

func (r *syncRecord) start() wire.SyncStart {
	return wire.SyncStart{Gen: r.Gen, Kind: r.Kind, Base: r.Base, PieceSize: r.PieceSize, Pieces: r.Pieces}
}

type pendingResync struct {
	Reason     string           `json:"reason"`
	Manual     bool             `json:"manual,omitempty"`
	Divergence *wire.Divergence `json:"divergence,omitempty"`
	// FullCompare makes the resync read and compare both sides' images
	// instead of their block trees: verify found images that differ where
	// the trees may agree (damage at rest that no tree saw happen).
	FullCompare bool `json:"full_compare,omitempty"`
}

// counters are cumulative figures for Status.
type counters struct {
	Shipped      int64         `json:"shipped"`
	Missed       int64         `json:"missed"`
	WireBytes    int64         `json:"wire_bytes"`     // cycle streams, each counted once
	MaxCycleWire int64         `json:"max_cycle_wire"` // largest cycle stream
	Latency      time.Duration `json:"latency"`        // sum over shipped cycles
	MaxLatency   time.Duration `json:"max_latency"`
	SyncBytes    int64         `json:"sync_bytes"` // sync piece streams
	Retries      int64         `json:"retries"`
	// SyncReadBytes are the disk bytes initial copies and resyncs read
	// from the primary's images: a resync that compares block trees reads
	// only the blocks that differ.
	SyncReadBytes int64 `json:"sync_read_bytes,omitempty"`
	// UnverifiedCycles were shipped without the primary's block-tree roots
	// (the tree did not know them in time): the replica could not check
	// its images after applying them.
	UnverifiedCycles int64 `json:"unverified_cycles,omitempty"`
}

func loadState(fsys vfs.FS, name string) (persisted, bool, error) {
	b, err := vfs.ReadFile(fsys, name)
	if errors.Is(err, fs.ErrNotExist) {
		return persisted{}, false, nil
	}
	if err != nil {
		return persisted{}, false, fmt.Errorf("%w: read %s: %w", ErrState, name, err)
	}
	var st persisted
	if err := statefile.Decode(stateFormat, stateVersion, b, &st); err != nil {
		return persisted{}, false, fmt.Errorf("%w: %s: %v", ErrState, name, err)
	}
	return st, true, nil
}

func encodeState(st *persisted) ([]byte, error) {
	return statefile.Encode(stateFormat, stateVersion, st)
}

// confirmedApplied is how far an answer of the replica moves Applied when
// the primary sent up to cycle c (barrier sealed): to c if the replica
// names c or a later cycle applied, else only to the cycle it names. A
// resync the replica holds (apply/doc.go) answers its finish, and the
// commits of the cycles before its ConsistentAt, with the images still at
// their last consistent point: success, but nothing applied.
func confirmedApplied(c uint64, sealed time.Time, rep wire.Replica) (uint64, time.Time) {
	if rep.Applied >= c {
		return c, sealed
	}
	return rep.Applied, rep.AppliedAt
}
