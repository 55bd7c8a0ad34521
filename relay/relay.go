package relay

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sync"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

// ErrNotConsistent: the relay does not cut a cycle while the replica VM is
// not consistent (an initial copy or a resync has not finished there).
// Its text is shown in status as it always was, so it has no package prefix.
var ErrNotConsistent = errors.New("the replica VM is not consistent yet")

// relay is a replica VM's relay journal as apply.Relay.
type relay struct {
	j       *journal.Journal
	replica Replica
	vm      string

	mu  sync.Mutex // held from Begin to End, and by Seal
	err error      // the first error since Begin
}

func (r *relay) Begin() { r.mu.Lock(); r.err = nil }

func (r *relay) WriteAt(disk int, p []byte, off int64) error {
	if r.err == nil {
		_, r.err = r.j.Disk(disk).WriteAt(p, off)
	}
	return r.err
}

func (r *relay) Zero(disk int, off, n int64, typ wire.FrameType) error {
	if r.err == nil {
		switch typ {
		case wire.FrameTrim:
			r.err = r.j.Disk(disk).Trim(off, n)
		default:
			r.err = r.j.Disk(disk).Zero(off, n, typ != wire.FrameZeroAlloc)
		}
	}
	return r.err
}

func (r *relay) End(err error) error {
	defer r.mu.Unlock()
	if err == nil {
		err = r.err
	}
	if err == nil {
		err = r.j.Flush()
	}
	return err
}

// relayJournal is what the extension's shipper reads: the relay journal,
// with seals between applies only.
type relayJournal struct {
	ship.Journal
	r *relay
}

// Seal and BeginResync check consistency holding the relay's lock, so no
// apply (a sync piece that makes the replica inconsistent) slips in
// between the check and the cut.
func (rj relayJournal) Seal(flags uint64) (journal.CycleInfo, error) {
	rj.r.mu.Lock()
	defer rj.r.mu.Unlock()
	if err := rj.r.consistent(); err != nil {
		return journal.CycleInfo{}, err
	}
	return rj.r.j.Seal(flags)
}

func (rj relayJournal) BeginResync() (journal.CycleInfo, error) {
	rj.r.mu.Lock()
	defer rj.r.mu.Unlock()
	if err := rj.r.consistent(); err != nil {
		return journal.CycleInfo{}, err
	}
	return rj.r.j.BeginResync()
}

func (r *relay) consistent() error {
	rep, ok := r.replica.Replica(r.vm)
	if !ok {
		return fmt.Errorf("replica VM %s is gone", r.vm)
	}
	if !rep.Consistent {
		return fmt.Errorf("%w (state %s)", ErrNotConsistent, rep.State)
	}
	return nil
}

// sinkFS passes everything to its FS except writes of the images, which
// it drops.
type sinkFS struct {
	vfs.FS
	images map[string]bool
}

func (s sinkFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := s.FS.OpenFile(name, flag, perm)
	if err != nil || !s.images[filepath.Clean(name)] {
		return f, err
	}
	return sinkFile{f}, nil
}

// sinkFile is an image the relay only reads. It lacks vfs.DirectWriter.
type sinkFile struct{ vfs.File }

func (sinkFile) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (sinkFile) PunchHole(off, n int64) error             { return nil }
func (sinkFile) ZeroRange(off, n int64) error             { return nil }
func (sinkFile) Sync() error                              { return nil }
func (sinkFile) Truncate(int64) error                     { return nil }
