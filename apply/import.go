package apply

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// ImportInitial applies an initial copy written to a directory (external
// media; wire.OfflineManifest) to replica VM vmName: the VM is created
// under the storage of the first allow-list entry that matches the
// manifest's primary (or, if it exists, confirmed like a PUT would), every
// piece is verified before any is applied, and the VM then follows cycle
// Base, as after a finished initial copy. On error nothing stays
// registered that was not before.
func (s *Server) ImportInitial(vmName, dir string) error {
	done, err := s.enter()
	if err != nil {
		return err
	}
	defer done()
	m, err := readManifest(s.fs, dir)
	if err != nil {
		return err
	}
	if m.VM != vmName {
		return fmt.Errorf("%w: %s is an initial copy of VM %q, not %q", ErrMismatch, join(dir, wire.OfflineManifestFile), m.VM, vmName)
	}
	entry, ok := s.entryForName(m.Primary)
	if !ok {
		return fmt.Errorf("%w: primary %q of the initial copy is not on the allow-list", ErrForbidden, m.Primary)
	}

	// An existing VM: the copy must come from its primary (or its trust
	// group) and have its disks.
	v, err := s.lookup(vmName)
	if err == nil {
		if err := v.authorize(m.Primary, entry, true); err != nil {
			return err
		}
		if !slices.Equal(v.disks, m.Disks) {
			return fmt.Errorf("%w: replica VM %q has disks %v, the initial copy %v", ErrMismatch, vmName, v.disks, m.Disks)
		}
		v.apply.Lock()
		defer v.apply.Unlock()
		if err := v.finishIntent(true); err != nil {
			return err
		}
		if err := v.verifyPieces(m, dir); err != nil {
			return err
		}
		return v.importPieces(m, dir)
	}
	if err := s.reserve(vmName); err != nil {
		return err
	}
	defer s.release(vmName)
	// Verify before anything is created: most errors (a damaged medium, a
	// piece missing) then cost nothing to undo.
	nv := newVM(s, vmName, "", replicaState{VM: vmName, Disks: m.Disks})
	if err := nv.verifyPieces(m, dir); err != nil {
		return err
	}
	v, undo, err := s.createVM(vmName, entry, m.Primary, wire.Enable{Disks: m.Disks})
	if err != nil {
		return err
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	if err := v.importPieces(m, dir); err != nil {
		undo.undo(s.fs)
		return err
	}
	if err := s.register(v); err != nil {
		undo.undo(s.fs)
		return err
	}
	return nil
}

func readManifest(fsys vfs.FS, dir string) (wire.OfflineManifest, error) {
	var m wire.OfflineManifest
	name := join(dir, wire.OfflineManifestFile)
	b, err := vfs.ReadFile(fsys, name)
	if errors.Is(err, fs.ErrNotExist) {
		return m, fmt.Errorf("%w: %s: no initial copy there (manifest missing)", ErrNotFound, name)
	}
	if err != nil {
		return m, fmt.Errorf("apply: read %s: %w", name, err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%w: %s: %v", ErrCorrupt, name, err)
	}
	if m.Version != 1 {
		return m, fmt.Errorf("%w: %s: manifest version %d (this vdrepl reads 1)", ErrMismatch, name, m.Version)
	}
	if !wire.ValidName(m.VM) {
		return m, fmt.Errorf("%w: %s: VM name %q", ErrInvalid, name, m.VM)
	}
	if err := checkDisks(m.Disks); err != nil {
		return m, fmt.Errorf("%s: %w", name, err)
	}
	if m.Gen == 0 || m.PieceSize <= 0 || m.PieceSize > maxPieceSize || m.Pieces != wire.PieceCount(m.Disks, m.PieceSize) {
		return m, fmt.Errorf("%w: %s: generation %d, %d pieces of %d bytes do not fit the disks", ErrInvalid, name, m.Gen, m.Pieces, m.PieceSize)
	}
	return m, nil
}

func pieceFile(dir string, m wire.OfflineManifest, p int64) string {
	return join(dir, wire.SyncUploadID(m.Gen, p)+".vdws")
}

// verifyPieces checks every piece file of an offline copy.
func (v *vm) verifyPieces(m wire.OfflineManifest, dir string) error {
	for p := int64(0); p < m.Pieces; p++ {
		_, err := v.verifyStream(pieceFile(dir, m, p), func(h wire.Header) error {
			if err := v.checkHeader(h, wire.KindFull); err != nil {
				return err
			}
			if h.Gen != m.Gen || h.Piece != p {
				return fmt.Errorf("%w: piece %d of generation %d in the file of piece %d", ErrMismatch, h.Piece, h.Gen, p)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("apply: initial copy in %s: %w", dir, err)
		}
	}
	return nil
}

// importPieces applies the verified pieces of an offline copy and records
// the VM as following cycle Base. The caller holds v.apply.
func (v *vm) importPieces(m wire.OfflineManifest, dir string) error {
	// Like a full sync that runs: the images are being overwritten.
	err := v.update(func(st *replicaState) error {
		st.Sync = &syncRecord{
			SyncStart: wire.SyncStart{Gen: m.Gen, Kind: wire.KindFull, Base: m.Base, PieceSize: m.PieceSize, Pieces: m.Pieces},
			Done:      [][2]int64{},
			Started:   v.s.now().UTC(),
		}
		st.State, st.Consistent = stateInitialCopy, false
		return nil
	})
	if err != nil {
		return err
	}
	names := make([]string, m.Pieces)
	for p := range names {
		names[p] = pieceFile(dir, m, int64(p))
	}
	if _, err := v.applyFiles(names...); err != nil {
		return err
	}
	err = v.update(func(st *replicaState) error {
		finishSync(st, m.Gen, m.Base, m.ConsistentAt)
		return nil
	})
	if err != nil {
		return err
	}
	v.s.log.Info("initial copy imported", "vm", v.name, "dir", dir, "gen", m.Gen, "base", m.Base, "pieces", m.Pieces)
	if f := v.s.ev.SyncFinished; f != nil {
		f(v.name, m.Gen)
	}
	return nil
}
