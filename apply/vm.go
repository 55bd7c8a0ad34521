package apply

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/snapshot"
)

// maxDisks bounds the disks of one VM (the frame's disk index is 16 bits;
// no VM has this many).
const maxDisks = 256

// vm is one replica VM.
type vm struct {
	s    *Server
	name string
	dir  string

	// apply serialises every change of replica.json and of the images:
	// commits, sync start and finish, recovery, ownership moves, removal.
	// Sums hold it too, so they never read an image mid-apply.
	apply sync.Mutex

	// disks and images never change after creation; st.Disks and
	// st.Images hold the same.
	disks  []wire.Disk
	images []string
	// snap holds the recovery points (points.go); set once, when the VM
	// is opened or created.
	snap *snapshot.Store
	// relay, when set, gets every applied change (extended replication);
	// guarded by apply.
	relay Relay
	// tree is the images' block tree (tree.go), nil when the VM keeps
	// none; tdb is its database. treeStale: a dropped tree's directory
	// could not be removed, so the images must not change until it is.
	// Guarded by apply.
	tree      *blocktree.Tree
	tdb       *badger.DB
	treeStale bool
	// pendingCheck is the header of the cycle the images are at whose
	// roots could not be checked because the tree was being built: the
	// build checks them when it completes (tree.go).
	pendingCheck *wire.Header

	mu      sync.Mutex // guards the fields below; never held during I/O
	st      replicaState
	uploads map[string]*uploadLock
	removed bool
	// building: a goroutine builds the tree (kickBuild).
	building bool
}

// uploadLock serialises the requests of one upload. It lives in
// vm.uploads while anyone holds or waits for it.
type uploadLock struct {
	mu   sync.Mutex
	refs int
}

func newVM(s *Server, name, dir string, st replicaState) *vm {
	return &vm{s: s, name: name, dir: dir, disks: slices.Clone(st.Disks), images: slices.Clone(st.Images), st: st, uploads: map[string]*uploadLock{}}
}

// openVM loads a registered VM's replica.json.
func (s *Server) openVM(name, dir string) (*vm, error) {
	var st replicaState
	ok, err := readState(s.fs, join(dir, stateFile), formatReplica, &st)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: replica VM %q is registered in %s but %s is missing", ErrState, name, s.regPath, join(dir, stateFile))
	}
	if st.VM != name {
		return nil, fmt.Errorf("%w: %s names VM %q, the registry %q", ErrState, join(dir, stateFile), st.VM, name)
	}
	v := newVM(s, name, dir, st)
	if err := v.openPoints(); err != nil {
		return nil, err
	}
	v.openTree()
	return v, nil
}

// lockUpload takes the lock of upload id and returns its release.
func (v *vm) lockUpload(id string) func() {
	v.mu.Lock()
	l := v.uploads[id]
	if l == nil {
		l = &uploadLock{}
		v.uploads[id] = l
	}
	l.refs++
	v.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		v.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(v.uploads, id)
		}
		v.mu.Unlock()
	}
}

func (v *vm) snapshot() replicaState {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.st.clone()
}

func (v *vm) replica() wire.Replica {
	v.mu.Lock()
	r := v.st.wire()
	v.mu.Unlock()
	if v.snap != nil {
		ps := v.snap.Points()
		r.Points = len(ps)
		if len(ps) > 0 {
			r.PointBytes = ps[0].Bytes
		}
	}
	return r
}

// update changes the VM's state: fn edits a copy, the copy is written to
// replica.json, and only then does it become the state in memory. The
// caller holds v.apply.
func (v *vm) update(fn func(st *replicaState) error) error {
	next := v.snapshot()
	if err := fn(&next); err != nil {
		return err
	}
	v.mu.Lock()
	prev := v.st
	v.mu.Unlock()
	now := v.s.now()
	noteCycle(&prev, &next, now)
	noteSync(&prev, &next, now)
	if err := writeState(v.s.fs, join(v.dir, stateFile), formatReplica, &next); err != nil {
		return err
	}
	v.mu.Lock()
	v.st = next
	v.mu.Unlock()
	return nil
}

func (v *vm) image(i int) string {
	if len(v.images) > 0 {
		return v.images[i]
	}
	return join(v.dir, v.disks[i].Name+imageExt)
}
func (v *vm) staged(id string) string {
	return join(v.dir, stagingDir, id+partExt)
}
func (v *vm) stagedStream(id string) string {
	return join(v.dir, stagingDir, id+streamExt)
}
func (v *vm) syncDir(gen uint64) string {
	return join(v.dir, syncDir, fmt.Sprint(gen))
}
func (v *vm) syncPiece(gen uint64, piece int64) string {
	return join(v.syncDir(gen), fmt.Sprint(piece)+streamExt)
}

// authorize checks that peer, matched by entry, may use the VM (see the
// package documentation). A primary of the VM's trust group takes the VM
// over when it writes.
func (v *vm) authorize(peer string, entry AllowEntry, write bool) error {
	v.mu.Lock()
	owner, group, removed, failover := v.st.Primary, v.st.TrustGroup, v.removed, v.st.Failover
	v.mu.Unlock()
	if removed {
		return fmt.Errorf("%w: %q", ErrUnknownVM, v.name)
	}
	if failover != nil && write {
		return fmt.Errorf("%w: replica VM %q was failed over on the replica host (%s failover, %s) and takes no more data from %q; reverse replication from the replica host, or cancel the failover there", ErrFailedOver, v.name, failover.Kind, failover.At.Format(time.RFC3339), peer)
	}
	if strings.EqualFold(owner, peer) {
		return nil
	}
	if group == "" || group != entry.TrustGroup {
		return fmt.Errorf("%w: replica VM %q belongs to primary %q; %q may not write it", ErrForbidden, v.name, owner, peer)
	}
	if !write {
		return nil
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	err := v.update(func(st *replicaState) error {
		st.Primary = peer
		return nil
	})
	if err != nil {
		return err
	}
	v.s.log.Info("replica VM moved to another primary of its trust group", "vm", v.name, "from", owner, "peer", peer, "trust_group", group)
	return nil
}

// openImages opens the VM's images for writing; closeImages closes them.
func (v *vm) openImages(flag int) ([]vfs.File, error) {
	files := make([]vfs.File, 0, len(v.disks))
	for i := range v.disks {
		f, err := v.s.fs.OpenFile(v.image(i), flag, 0)
		if err != nil {
			closeImages(files)
			return nil, fmt.Errorf("apply: open image: %w", err)
		}
		files = append(files, f)
	}
	return files, nil
}

func closeImages(files []vfs.File) {
	for _, f := range files {
		f.Close()
	}
}

// syncImages makes what was written to the images durable and closes them.
func syncImages(files []vfs.File) error {
	defer closeImages(files)
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("apply: sync image %s: %w", f.Name(), err)
		}
	}
	return nil
}

// checkDisks validates the disks a primary sends.
func checkDisks(disks []wire.Disk) error {
	if len(disks) == 0 || len(disks) > maxDisks {
		return fmt.Errorf("%w: a VM needs 1 to %d disks, got %d", ErrInvalid, maxDisks, len(disks))
	}
	seen := map[string]bool{}
	for _, d := range disks {
		if !wire.ValidName(d.Name) {
			return fmt.Errorf("%w: disk name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, d.Name)
		}
		if seen[d.Name] {
			return fmt.Errorf("%w: disk %q named twice", ErrInvalid, d.Name)
		}
		seen[d.Name] = true
		if d.Size <= 0 || d.Size > 1<<56 {
			return fmt.Errorf("%w: disk %q: size %d", ErrInvalid, d.Name, d.Size)
		}
	}
	return nil
}

// resolveDir cleans a directory name and resolves its symbolic links.
// filepath.EvalSymlinks reads the real filesystem, not the FS seam: a
// directory it does not find (an in-memory FS in tests) is taken as it is.
func resolveDir(p string) (string, error) {
	p = filepath.Clean(p)
	r, err := filepath.EvalSymlinks(p)
	if errors.Is(err, fs.ErrNotExist) {
		return p, nil
	}
	return r, err
}

// inside reports whether p lies strictly inside root.
func inside(root, p string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel)
}

// reserve claims a VM name for creation; release gives it back.
func (s *Server) reserve(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vms[name] != nil {
		return fmt.Errorf("%w: replica VM %q", ErrExists, name)
	}
	if s.reserved[name] {
		return fmt.Errorf("%w: replica VM %q is being created", ErrBusy, name)
	}
	s.reserved[name] = true
	return nil
}

func (s *Server) release(name string) {
	s.mu.Lock()
	delete(s.reserved, name)
	s.mu.Unlock()
}

// created records what createVM made, so a failure can take it back.
type created struct {
	dirs  []string // made, deepest last
	files []string
	vm    *vm // its tree is closed before its files go
}

// undo removes what was made; the caller holds the apply lock of the VM
// made, if any.
func (c *created) undo(fsys vfs.FS) {
	if c.vm != nil {
		c.vm.close()
	}
	for _, f := range c.files {
		fsys.Remove(f)
	}
	for i := len(c.dirs) - 1; i >= 0; i-- {
		removeAll(fsys, c.dirs[i])
	}
}

// mkdir makes dir (and records what it made) if it is missing.
func (c *created) mkdir(fsys vfs.FS, dir string) error {
	made, err := mkdirDurable(fsys, dir)
	if len(made) > 0 {
		c.dirs = append(c.dirs, made[0])
	}
	return err
}

// mkdirDurable makes dir and its missing parents, mode 0700, and makes
// each new name durable (SyncDir of its parent, top down). It returns the
// directories it made, outermost first.
func mkdirDurable(fsys vfs.FS, dir string) ([]string, error) {
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := fsys.Stat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		missing = append(missing, d)
		if filepath.Dir(d) == d {
			break
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	slices.Reverse(missing)
	if err := fsys.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for _, d := range missing {
		if err := fsys.SyncDir(filepath.Dir(d)); err != nil {
			return missing, err
		}
	}
	return missing, nil
}

// createVM makes a new replica VM's directory, images and replica.json
// under entry's storage. It does not register it; on error it removes
// what it made. The caller holds the name's reservation.
func (s *Server) createVM(name string, entry AllowEntry, peer string, en wire.Enable) (_ *vm, _ *created, err error) {
	if !wire.ValidName(name) {
		return nil, nil, fmt.Errorf("%w: VM name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name)
	}
	if err := checkDisks(en.Disks); err != nil {
		return nil, nil, err
	}
	storage, err := resolveDir(entry.Storage)
	if err != nil {
		return nil, nil, fmt.Errorf("apply: storage %s: %w", entry.Storage, err)
	}
	dir := join(storage, name)
	if !inside(storage, dir) {
		return nil, nil, fmt.Errorf("%w: VM %q would live outside storage %s", ErrForbidden, name, storage)
	}
	undo := &created{}
	defer func() {
		if err != nil {
			undo.undo(s.fs)
		}
	}()
	// The storage directory is the admin's (made by Allow): never undone.
	if _, err := mkdirDurable(s.fs, storage); err != nil {
		return nil, nil, fmt.Errorf("apply: storage %s: %w", storage, err)
	}
	if err := undo.mkdir(s.fs, dir); err != nil {
		return nil, nil, fmt.Errorf("apply: VM directory: %w", err)
	}
	// The VM directory may have been there, and be a link elsewhere.
	if real, err := resolveDir(dir); err != nil {
		return nil, nil, fmt.Errorf("apply: VM directory: %w", err)
	} else if !inside(storage, real) {
		return nil, nil, fmt.Errorf("%w: VM directory %s leads outside storage %s", ErrForbidden, dir, storage)
	}
	if err := undo.mkdir(s.fs, join(dir, stagingDir)); err != nil {
		return nil, nil, fmt.Errorf("apply: staging directory: %w", err)
	}
	st := replicaState{
		VM:         name,
		Primary:    peer,
		TrustGroup: entry.TrustGroup,
		Disks:      slices.Clone(en.Disks),
		State:      stateNew,
		NeedsSync:  en.Existing,
		Created:    s.now().UTC(),

		Points:        en.RecoveryPoints,
		PointInterval: en.PointInterval,
		Excluded:      slices.Clone(en.Excluded),
		Frequency:     en.Frequency,
	}
	madeImages := false
	for _, d := range en.Disks {
		p := join(dir, d.Name+imageExt)
		fi, err := s.fs.Stat(p)
		switch {
		case err == nil && (!fi.Mode().IsRegular() || fi.Size() != d.Size):
			return nil, nil, fmt.Errorf("%w: image %s is not a regular file of %d bytes", ErrMismatch, p, d.Size)
		case err == nil:
			// An image already there holds data we know nothing of: like
			// Existing, only a sync makes it follow the primary.
			st.NeedsSync = true
		case !errors.Is(err, fs.ErrNotExist):
			return nil, nil, fmt.Errorf("apply: image %s: %w", p, err)
		case en.Existing:
			return nil, nil, fmt.Errorf("%w: image %s does not exist (the VM was enabled with existing images)", ErrMismatch, p)
		default:
			if err := s.createImage(p, d.Size, undo); err != nil {
				return nil, nil, err
			}
			madeImages = true
		}
	}
	if madeImages {
		if err := s.fs.SyncDir(dir); err != nil {
			return nil, nil, fmt.Errorf("apply: VM directory: %w", err)
		}
	}
	undo.files = append(undo.files, join(dir, stateFile))
	if err := writeState(s.fs, join(dir, stateFile), formatReplica, &st); err != nil {
		return nil, nil, err
	}
	v := newVM(s, name, dir, st)
	undo.dirs = append(undo.dirs, join(dir, pointsDir))
	if err := v.openPoints(); err != nil {
		return nil, nil, err
	}
	// A tree left by a VM of this name removed before describes images
	// that were not the new VM's: it starts afresh.
	if err := removeAll(s.fs, v.treePath()); err != nil {
		return nil, nil, fmt.Errorf("apply: block tree: %w", err)
	}
	undo.dirs = append(undo.dirs, v.treePath())
	v.openTree()
	undo.vm = v
	return v, undo, nil
}

// createImage makes a sparse image of size bytes.
func (s *Server) createImage(p string, size int64, undo *created) error {
	f, err := s.fs.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("apply: create image: %w", err)
	}
	undo.files = append(undo.files, p)
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("apply: create image %s: %w", p, err)
	}
	return nil
}

// register adds a created VM to the registry.
func (s *Server) register(v *vm) error {
	s.mu.Lock()
	s.vms[v.name] = v
	s.mu.Unlock()
	if err := s.saveRegistry(); err != nil {
		s.mu.Lock()
		delete(s.vms, v.name)
		s.mu.Unlock()
		return err
	}
	return nil
}

// enable is PUT /v1/replicas/{vm}: create the VM, or confirm an existing
// one has the same disks.
func (s *Server) enable(name, peer string, cert *x509.Certificate, entry AllowEntry, en wire.Enable) (wire.Replica, error) {
	if err := checkDisks(en.Disks); err != nil {
		return wire.Replica{}, err
	}
	if err := checkPolicy(en); err != nil {
		return wire.Replica{}, err
	}
	for {
		if v, err := s.lookup(name); err == nil {
			if err := v.authorize(peer, entry, true); err != nil {
				return wire.Replica{}, err
			}
			r := v.replica()
			if !slices.Equal(r.Disks, en.Disks) {
				return wire.Replica{}, fmt.Errorf("%w: replica VM %q has disks %v, the primary sends %v", ErrMismatch, name, r.Disks, en.Disks)
			}
			if err := v.setPolicy(en); err != nil {
				return wire.Replica{}, err
			}
			return v.replica(), nil
		}
		err := s.reserve(name)
		if errors.Is(err, ErrExists) {
			continue // created meanwhile: confirm it
		}
		if err != nil {
			return wire.Replica{}, err
		}
		defer s.release(name)
		break
	}
	if s.host != nil && s.host.Local(name) {
		v, err := s.adopt(name, peer, cert, entry, en)
		if err != nil {
			return wire.Replica{}, err
		}
		return v.replica(), nil
	}
	v, undo, err := s.createVM(name, entry, peer, en)
	if err != nil {
		return wire.Replica{}, err
	}
	if err := s.register(v); err != nil {
		v.apply.Lock()
		undo.undo(s.fs)
		v.apply.Unlock()
		return wire.Replica{}, err
	}
	s.log.Info("replica VM created", "vm", name, "peer", peer, "dir", v.dir, "existing", en.Existing)
	return v.replica(), nil
}
