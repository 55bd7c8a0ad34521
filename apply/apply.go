package apply

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// Errors. Every error of this package wraps one of them (or an I/O error);
// the HTTP handler turns them into wire error codes.
var (
	ErrExists    = errors.New("apply: already exists")
	ErrNotFound  = errors.New("apply: not found")
	ErrUnknownVM = errors.New("apply: unknown replica VM")
	ErrForbidden = errors.New("apply: forbidden")
	ErrInvalid   = errors.New("apply: invalid request")
	ErrTooLarge  = errors.New("apply: request too large")
	ErrMismatch  = errors.New("apply: mismatch")
	// ErrCorrupt: an upload or a staged stream failed its checksums or
	// framing.
	ErrCorrupt = errors.New("apply: corrupt stream")
	// ErrChunkCRC: one upload chunk did not match its CRC header; it was
	// not stored.
	ErrChunkCRC = errors.New("apply: chunk checksum mismatch")
	ErrClosed   = errors.New("apply: server closed")
	// ErrBusy: the VM is being created by another request; retry.
	ErrBusy = errors.New("apply: busy")
	// ErrState: a state file (allow.json, replicas.json, replica.json)
	// cannot be read or has an unsupported version.
	ErrState = errors.New("apply: bad state file")
)

// GapError is returned when a cycle does not follow the last applied one.
type GapError struct {
	Applied uint64 // the last cycle applied
	Cycle   uint64 // the cycle offered
	Prev    uint64 // the cycle it follows
}

func (e *GapError) Error() string {
	return fmt.Sprintf("apply: cycle %d (after %d) does not follow the last applied cycle %d", e.Cycle, e.Prev, e.Applied)
}

// OffsetError is returned for an upload chunk that is not at the end of
// what is staged.
type OffsetError struct {
	Offset int64 // staged so far: where the primary resumes
	Got    int64
}

func (e *OffsetError) Error() string {
	return fmt.Sprintf("apply: chunk at offset %d, %d bytes staged: resume at %d", e.Got, e.Offset, e.Offset)
}

// Events are optional callbacks for what an operator or the metrics want
// to know. They are called synchronously; all but Rejected run with the
// VM's apply lock held, so they must return quickly and must not call the
// Server about the same VM.
type Events struct {
	// CycleApplied: cycle is durable in the VM's images.
	CycleApplied func(vm string, cycle uint64)
	// Rejected: a request was refused for lack of authorization.
	Rejected func(vm, peer, reason string)
	// Corrupt: an upload or staged stream failed verification and was
	// discarded (or, for a staged stream found at recovery, kept).
	Corrupt func(vm, id string, err error)
	// SyncFinished: an initial copy or resync of generation gen completed.
	SyncFinished func(vm string, gen uint64)
	// Recovered: an apply interrupted by a crash or an I/O error was
	// finished; what is "cycle N" or "resync GEN".
	Recovered func(vm, what string)
	// Verified: after cycle was applied, the replica's block-tree roots
	// equalled the primary's at its barrier.
	Verified func(vm string, cycle uint64)
	// Diverged: after cycle was applied, the roots of disks differed
	// from the primary's: the replica is not what the primary had.
	Diverged func(vm string, cycle uint64, disks []string)
}

// Config configures a Server.
type Config struct {
	// StateDir holds allow.json and replicas.json (the daemon's state dir).
	StateDir string
	// FS does all file I/O; nil is the real filesystem.
	FS vfs.FS
	// Logger; nil discards.
	Logger *slog.Logger
	// Now; nil is time.Now.
	Now    func() time.Time
	Events Events
	// Host is the daemon's side of planned failover and reverse
	// replication (host.go); nil: neither is possible.
	Host Host
	// DeferRecovery leaves the recovery of interrupted applies to Recover,
	// so that relays (extended replication) can be set first and see the
	// applies redone.
	DeferRecovery bool
}

// Server is the replica side of vdrepl: see the package documentation.
type Server struct {
	fs        vfs.FS
	log       *slog.Logger
	now       func() time.Time
	ev        Events
	allowPath string
	regPath   string
	stateDir  string
	host      Host
	routes    *http.ServeMux // the endpoints of VMs (http.go)

	// regMu serialises writes of allow.json and replicas.json, so that a
	// file never goes back to an older snapshot.
	regMu sync.Mutex

	mu       sync.Mutex // guards the fields below
	allow    []AllowEntry
	vms      map[string]*vm
	reserved map[string]bool // VMs being created (not yet in vms)
	closed   bool
	inflight sync.WaitGroup

	// stop is closed by Close to stop the background builds of block
	// trees (tree.go); bg counts them.
	stop chan struct{}
	bg   sync.WaitGroup
}

// New loads the allow-list and the replica registry from cfg.StateDir and
// recovers every replica VM: an apply that a crash interrupted is finished
// (see the package documentation). A VM whose recovery fails on I/O is kept
// with its intent and retried by every request that needs its images; a
// state file that cannot be read makes New fail.
func New(cfg Config) (*Server, error) {
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("%w: no state directory", ErrInvalid)
	}
	s := &Server{
		fs:        cfg.FS,
		log:       cfg.Logger,
		now:       cfg.Now,
		ev:        cfg.Events,
		allowPath: join(cfg.StateDir, allowFile),
		stateDir:  cfg.StateDir,
		host:      cfg.Host,
		regPath:   join(cfg.StateDir, registryFile),
		vms:       map[string]*vm{},
		reserved:  map[string]bool{},
		stop:      make(chan struct{}),
	}
	s.routes = s.newMux()
	if s.fs == nil {
		s.fs = vfs.Default
	}
	if s.log == nil {
		s.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if s.now == nil {
		s.now = time.Now
	}
	if _, err := mkdirDurable(s.fs, cfg.StateDir); err != nil {
		return nil, fmt.Errorf("apply: state directory: %w", err)
	}
	allow, err := loadAllow(s.fs, s.allowPath)
	if err != nil {
		return nil, err
	}
	s.allow = allow
	reg, err := loadRegistry(s.fs, s.regPath)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(reg))
	for name := range reg {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		v, err := s.openVM(name, reg[name])
		if err != nil {
			s.Close()
			return nil, err
		}
		s.vms[name] = v
	}
	if !cfg.DeferRecovery {
		s.Recover()
	}
	return s, nil
}

// Recover finishes the applies, failovers and cancels a crash interrupted
// (see the package documentation); New does it unless DeferRecovery.
func (s *Server) Recover() {
	s.mu.Lock()
	vms := make([]*vm, 0, len(s.vms))
	for _, v := range s.vms {
		vms = append(vms, v)
	}
	s.mu.Unlock()
	sort.Slice(vms, func(i, j int) bool { return vms[i].name < vms[j].name })
	for _, v := range vms {
		s.recoverVM(v)
	}
}

// Close refuses new requests and waits for those in flight (applies
// included). It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.inflight.Wait()
	close(s.stop)
	s.bg.Wait()
	s.mu.Lock()
	vms := make([]*vm, 0, len(s.vms))
	for _, v := range s.vms {
		vms = append(vms, v)
	}
	s.mu.Unlock()
	var errs []error
	for _, v := range vms {
		if err := v.snap.Close(); err != nil {
			errs = append(errs, fmt.Errorf("apply: replica VM %q: %w", v.name, err))
		}
		v.apply.Lock() // taken after Server.mu is released: the lock order
		v.closeTree()
		v.apply.Unlock()
	}
	return errors.Join(errs...)
}

// enter registers an operation in flight; the caller calls the returned
// function when done.
func (s *Server) enter() (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	s.inflight.Add(1)
	return s.inflight.Done, nil
}

// lookup finds a replica VM.
func (s *Server) lookup(name string) (*vm, error) {
	s.mu.Lock()
	v := s.vms[name]
	s.mu.Unlock()
	if v == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownVM, name)
	}
	return v, nil
}

// Replicas lists the replica VMs, sorted by name.
func (s *Server) Replicas() []wire.Replica {
	s.mu.Lock()
	vms := make([]*vm, 0, len(s.vms))
	for _, v := range s.vms {
		vms = append(vms, v)
	}
	s.mu.Unlock()
	out := make([]wire.Replica, 0, len(vms))
	for _, v := range vms {
		out = append(out, v.replica())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out
}

// Replica is one replica VM's state.
func (s *Server) Replica(name string) (wire.Replica, bool) {
	v, err := s.lookup(name)
	if err != nil {
		return wire.Replica{}, false
	}
	return v.replica(), true
}

// ImageDir is the directory that holds the VM's replica images
// (<disk>.img) and its replica.json.
func (s *Server) ImageDir(name string) (string, bool) {
	v, err := s.lookup(name)
	if err != nil {
		return "", false
	}
	return v.dir, true
}

// RemoveReplica forgets a replica VM: it leaves the registry and its
// replica.json, staged uploads, staged sync pieces, recovery points and
// block tree are removed. The images stay where they are.
func (s *Server) RemoveReplica(name string) error {
	return s.removeReplica(name, false)
}

// DeleteReplica is RemoveReplica that deletes the VM's images too, and
// its directory once empty. A VM adopted as a replica (its images are a
// VM's of this host, outside any storage directory) is refused with
// ErrForbidden: those images were never the replica role's to delete.
func (s *Server) DeleteReplica(name string) error {
	return s.removeReplica(name, true)
}

func (s *Server) removeReplica(name string, images bool) error {
	done, err := s.enter()
	if err != nil {
		return err
	}
	defer done()
	v, err := s.lookup(name)
	if err != nil {
		return err
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	if images && len(v.images) > 0 {
		return fmt.Errorf("%w: replica VM %q was adopted: its images are %s, outside its replica directory %s, and are not deleted", ErrForbidden, name, strings.Join(v.images, ", "), v.dir)
	}
	s.mu.Lock()
	if s.vms[name] != v {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrUnknownVM, name)
	}
	delete(s.vms, name)
	s.mu.Unlock()
	if err := s.saveRegistry(); err != nil {
		s.mu.Lock()
		s.vms[name] = v
		s.mu.Unlock()
		return err
	}
	v.mu.Lock()
	v.removed = true
	v.mu.Unlock()
	// The registry no longer names the VM: what follows is tidying, and a
	// failure leaves only files that nothing reads.
	v.snap.Close()
	v.closeTree()
	for _, p := range []string{join(v.dir, stateFile), join(v.dir, stagingDir), join(v.dir, syncDir), join(v.dir, pointsDir), v.treePath()} {
		if err := removeAll(s.fs, p); err != nil {
			s.log.Warn("remove replica: leftover file", "vm", name, "path", p, "err", err)
		}
	}
	if images {
		for i := range v.disks {
			if err := removeAll(s.fs, v.image(i)); err != nil {
				s.log.Warn("remove replica: image not deleted", "vm", name, "path", v.image(i), "err", err)
			}
		}
		// Only an empty directory goes: anything else in it is not ours.
		if err := s.fs.Remove(v.dir); err != nil {
			s.fs.SyncDir(v.dir)
		} else {
			s.fs.SyncDir(filepath.Dir(v.dir))
		}
		s.log.Info("replica removed, its images deleted", "vm", name, "dir", v.dir)
		return nil
	}
	s.fs.SyncDir(v.dir)
	s.log.Info("replica removed", "vm", name, "dir", v.dir)
	return nil
}
