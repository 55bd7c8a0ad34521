package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// ErrNotRetaining is returned by BeginResync when cycles are not kept
// (replication is not enabled).
var ErrNotRetaining = errors.New("journal: cycles are not retained (replication is off)")

// The resync marker says a resync (or initial copy) from a barrier cycle is
// under way: cycles after the barrier are kept, and the replica is not known
// complete until EndResync. Layout (little endian):
//
//	| magic "VDJY" u32 | version u8 | pad 3 | base cycle u64 | crc32c u32 |
const (
	resyncMagic   = 0x594a4456 // "VDJY"
	resyncVersion = 1
	resyncFile    = "resync"
	resyncSize    = 20
)

func encodeResync(base uint64) []byte {
	b := binary.LittleEndian.AppendUint32(nil, resyncMagic)
	b = append(b, resyncVersion, 0, 0, 0)
	b = binary.LittleEndian.AppendUint64(b, base)
	return binary.LittleEndian.AppendUint32(b, crc(b))
}

func readResync(fsys vfs.FS, dir string) (uint64, error) {
	b, err := vfs.ReadFile(fsys, path.Join(dir, resyncFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("journal: read resync marker: %w", err)
	}
	if len(b) != resyncSize || binary.LittleEndian.Uint32(b) != resyncMagic || binary.LittleEndian.Uint32(b[16:]) != crc(b[:16]) {
		return 0, fmt.Errorf("%w: resync marker", ErrInvalid)
	}
	if b[4] != resyncVersion {
		return 0, fmt.Errorf("%w: resync marker version %d", ErrVersion, b[4])
	}
	return binary.LittleEndian.Uint64(b[8:]), nil
}

func (j *Journal) removeState(name string) error {
	err := j.fs.Remove(path.Join(j.cfg.Dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return j.fs.SyncDir(j.cfg.Dir)
}

// BeginResync starts a resync or an initial copy: it seals a barrier cycle B,
// releases every cycle up to B (the copy covers them), leaves dirty-block
// tracking, and keeps every cycle after B for shipping. Writes go on
// throughout; each lands in a cycle after B or in the image the copy reads.
// Until EndResync(B), Stats reports ResyncBase = B, across restarts too.
func (j *Journal) BeginResync() (CycleInfo, error) {
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	j.mu.Lock()
	if !j.mu.retain {
		j.mu.Unlock()
		return CycleInfo{}, ErrNotRetaining
	}
	j.mu.resyncNext = true
	j.mu.Unlock()
	info, err := j.sealLocked(0)
	if err != nil {
		j.mu.Lock()
		j.mu.resyncNext = false
		j.mu.Unlock()
		return CycleInfo{}, err
	}
	base := info.Cycle
	// The marker is durable before the dirty map goes: a crash in between
	// leaves both, and the dirty map wins (resync required again).
	if err := vfs.WriteFileAtomic(j.fs, path.Join(j.cfg.Dir, resyncFile), encodeResync(base), 0o600); err != nil {
		return CycleInfo{}, fmt.Errorf("journal: write resync marker: %w", err)
	}
	j.mu.Lock()
	j.mu.dirty = nil
	var drop []uint64
	for len(j.mu.closedC) > 0 && j.mu.closedC[0].Cycle <= base {
		drop = append(drop, j.mu.closedC[0].Cycle)
		j.mu.closedC = j.mu.closedC[1:]
	}
	j.mu.released = max(j.mu.released, base)
	j.mu.Unlock()
	if err := j.removeDirtyMap(); err != nil {
		return CycleInfo{}, fmt.Errorf("journal: remove dirty map: %w", err)
	}
	for _, c := range drop {
		if err := j.cycles.drop(c); err != nil {
			return CycleInfo{}, err
		}
	}
	if err := j.checkpoint(true); err != nil {
		return CycleInfo{}, err
	}
	j.log.Info("resync begun", "barrier", base)
	return info, nil
}

// EndResync records that the replica holds everything up to the resync
// barrier base: the marker goes and the replica is known complete again. A
// base other than the running resync's is ignored (a newer resync began).
func (j *Journal) EndResync(base uint64) error {
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	j.mu.Lock()
	running := j.mu.resyncBase == base && j.mu.dirty == nil
	j.mu.Unlock()
	if !running {
		return nil
	}
	if err := j.removeState(resyncFile); err != nil {
		return fmt.Errorf("journal: remove resync marker: %w", err)
	}
	j.mu.Lock()
	j.mu.resyncBase = 0
	j.mu.Unlock()
	j.log.Info("resync complete", "barrier", base)
	return nil
}

// SetRetain turns keeping cycles for shipping on (replication enabled) or
// off. Turning it on marks every block dirty (resync required) until
// BeginResync starts the initial copy. Turning it off releases every closed cycle and forgets dirty tracking
// and any resync under way: with no replica there is nothing to repair.
func (j *Journal) SetRetain(on bool) error {
	j.sealMu.Lock()
	defer j.sealMu.Unlock()
	j.mu.Lock()
	if j.mu.retain == on {
		j.mu.Unlock()
		return nil
	}
	j.mu.retain = on
	var drop []uint64
	if on {
		// A replica that was never filled is not complete: every block is
		// dirty until the initial copy (BeginResync) starts. This also keeps
		// the open cycle, indexed only from now on, from ever being shipped.
		dm := newDirtyMap(j.diskSizes())
		for i, size := range j.diskSizes() {
			dm.setRange(i, 0, size)
		}
		dm.lsn = j.mu.head
		dm.released = j.mu.cycle - 1
		j.mu.dirty = dm
		j.mu.resyncReason = ""
		j.mu.released = max(j.mu.released, j.mu.cycle-1)
	} else {
		for _, c := range j.mu.closedC {
			drop = append(drop, c.Cycle)
		}
		j.mu.closedC = nil
		j.mu.open = make(map[uint64]*cycleIndex)
		j.mu.released = max(j.mu.released, j.mu.cycle-1)
		j.mu.dirty = nil
		j.mu.resyncBase = 0
		j.mu.cutting = false
	}
	j.mu.Unlock()
	for _, c := range drop {
		if err := j.cycles.drop(c); err != nil {
			return err
		}
	}
	if on {
		if err := j.writeDirtyMap(); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
	} else {
		if err := j.removeDirtyMap(); err != nil {
			return err
		}
		if err := j.removeState(resyncFile); err != nil {
			return err
		}
		j.kickWriteBack()
	}
	return nil
}
