package ship

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// Journal is what the shipper needs of a VM's journal. *journal.Journal
// provides all of it but ReadAt, which FromJournal adds.
type Journal interface {
	Seal(flags uint64) (journal.CycleInfo, error)
	Cycles() []journal.CycleInfo
	Extents(c uint64, fn func(journal.Extent) error) error
	ReadExtent(e journal.Extent, p []byte) error
	Release(c uint64) error
	Stats() journal.Stats
	// BeginResync seals a barrier cycle, releases every cycle up to it,
	// leaves dirty-block tracking and keeps the cycles after it.
	BeginResync() (journal.CycleInfo, error)
	// EndResync records that the replica holds everything up to base.
	EndResync(base uint64) error
	// ReadAt reads the live disk, the newest data.
	ReadAt(disk int, p []byte, off int64) error
	// BlockTree is the images' block-hash tree, nil if none is kept.
	BlockTree() *blocktree.Tree
	// WaitWrittenBack returns once the images and the tree hold every
	// record of the cycles up to c.
	WaitWrittenBack(ctx context.Context, c uint64) error
	// RootsAt returns the tree's roots at cycle c's barrier (nil: unknown).
	RootsAt(ctx context.Context, c uint64) ([]blocktree.Root, error)
}

// FromJournal adapts a *journal.Journal to Journal.
func FromJournal(j *journal.Journal) Journal { return journalDisks{j} }

type journalDisks struct{ *journal.Journal }

func (j journalDisks) ReadAt(disk int, p []byte, off int64) error {
	_, err := j.Disk(disk).ReadAt(p, off)
	return err
}

// Events are optional callbacks; each may be nil. They run on the
// shipper's goroutines and must not call back into the Shipper.
type Events struct {
	// CycleShipped: the replica applied a cycle that sent bytesOnWire,
	// latency after its seal.
	CycleShipped func(info journal.CycleInfo, bytesOnWire int64, latency time.Duration)
	// StateChanged: Status would now report state, for reason.
	StateChanged func(state, reason string)
}

// Config of a Shipper.
type Config struct {
	VM string
	// Disks are the replicated disks (excluded ones left out); DiskIndex[i]
	// is the journal's index of Disks[i] (nil: 0, 1, 2...).
	Disks     []wire.Disk
	DiskIndex []int
	Journal   Journal
	// Replica is host:port of the replica's HTTPS listener; TLS the client
	// configuration (pki Identity.ClientConfig).
	Replica string
	TLS     *tls.Config
	// PlainHTTP speaks http:// to Replica, without TLS (TLS is still
	// required: it names the primary). Only bench/tlscost sets it, to
	// measure what TLS costs replication; the daemon never does, and a
	// vdrepl replica refuses every request that lacks a verified client
	// certificate (apply.Server.Handler).
	PlainHTTP bool
	// Primary is our certificate name, written into an offline manifest;
	// default: the name of TLS's client certificate.
	Primary     string
	BypassProxy bool // else HTTPS_PROXY/NO_PROXY from the environment
	Compress    bool // zstd data frames
	// Frequency: a cycle is sealed this often.
	Frequency time.Duration
	// Initial is how the first copy is made, when none was: "network",
	// "at:RFC3339", "offline:DIR" or "existing". Default "network".
	Initial string
	// StateFile keeps the shipper's progress (required); spools go in a
	// directory beside it (STATE.spool for STATE.json).
	StateFile string
	FS        vfs.FS // nil: the real filesystem
	// Limit paces this VM, HostLimit every VM of the host, SyncLimit initial
	// copies and resyncs on top of both. nil is unlimited.
	Limit, HostLimit, SyncLimit *Limiter
	// RetryScale multiplies the back-off (2 s, doubling per failure, at
	// most 30 min; retry.go).
	RetryScale float64
	// PieceSize is a sync piece (default 64 MiB); BlockSize the resync
	// checksum block (default DefaultBlockSize). PieceSize must be a
	// multiple of BlockSize.
	PieceSize int64
	BlockSize int64
	// ResyncWindow is when automatic resyncs may start (default
	// "18:30-06:00", local time); a manual Resync starts at once.
	ResyncWindow string
	Logger       *slog.Logger
	Now          func() time.Time
	Events       Events
	// Progress is called as a sync advances (a terminal progress bar).
	Progress func(done, total int64)
	// RecoveryPoints and PointInterval are the replica's recovery point
	// policy, sent with every enable (wire.Enable).
	RecoveryPoints int
	PointInterval  time.Duration
	// Excluded names the VM's disks left out of Disks (wire.Enable).
	Excluded []string
	// AppConsistentEvery: a scheduled seal at least this long after the
	// last quiesced one is quiesced through Quiesce (appseal.go); 0 = never.
	AppConsistentEvery time.Duration
	Quiesce            QuiesceFunc
	// VerifyEvery runs Verify this long after the last one finished (0:
	// only when asked), reading at VerifyRate (nil: unlimited).
	VerifyEvery time.Duration
	VerifyRate  *Limiter
}

// Defaults.
const (
	DefaultPieceSize    = 64 << 20
	DefaultResyncWindow = "18:30-06:00"
)

type initialMode struct {
	kind string // "network", "at", "offline", "existing"
	at   time.Time
	dir  string
}

func parseInitial(s string) (initialMode, error) {
	switch {
	case s == "" || s == "network":
		return initialMode{kind: "network"}, nil
	case s == "existing":
		return initialMode{kind: "existing"}, nil
	case strings.HasPrefix(s, "at:"):
		t, err := time.Parse(time.RFC3339, strings.TrimPrefix(s, "at:"))
		if err != nil {
			return initialMode{}, fmt.Errorf("%w: initial %q: %v", ErrBadConfig, s, err)
		}
		return initialMode{kind: "at", at: t}, nil
	case strings.HasPrefix(s, "offline:") && len(s) > len("offline:"):
		return initialMode{kind: "offline", dir: strings.TrimPrefix(s, "offline:")}, nil
	}
	return initialMode{}, fmt.Errorf("%w: initial %q: want network, at:TIME, offline:DIR or existing", ErrBadConfig, s)
}

// Shipper ships one VM's cycles to its replica. Its methods are safe for
// concurrent use. Lock order: opMu, then saveMu, then mu; journal and
// network calls are made with mu not held.
type Shipper struct {
	cfg      Config
	j        Journal
	log      *slog.Logger
	fs       vfs.FS
	now      func() time.Time
	c        *client
	window   Window
	initial  initialMode
	spoolDir string
	chunk    int64       // upload chunk size: wire.MaxChunk (tests lower it)
	wireOf   map[int]int // journal disk index -> wire disk index
	sizes    []int64

	opMu   sync.Mutex // one sync operation (the loop's step, WriteOffline) at a time
	saveMu sync.Mutex
	buf    []byte // chunk buffer, under opMu
	// unanswered is the cycle whose last commit got no answer, under opMu
	// (cycle.go).
	unanswered uint64
	// tsync is how the sync under way compares pieces (treesync.go);
	// roots the block-tree roots of the cycles being shipped, kept so that
	// a cycle sent again has the same header (roots.go); rootsWait bounds
	// the wait for them. Under opMu.
	tsync      *treeResync
	roots      map[uint64][]string
	rootsWait  time.Duration
	unverified bool // the last cycle shipped without roots

	mu        sync.Mutex
	st        persisted
	changed   chan struct{} // closed and replaced at every change
	stopped   error         // non-recoverable; cleared by Resume
	attempt   int           // failures since the last success
	retryAt   time.Time
	lastErr   string
	lastErrAt time.Time
	failingAt time.Time // the first failure since the last success
	lastFail  error     // the error of lastErr
	runAt     time.Time // when Run began
	waiting   string    // why the loop idles: "", "at", "window", "import"
	waitUntil time.Time
	enabled   bool // PUT /v1/replicas/{vm} answered since the last (re)start
	polls     int  // GETs while waiting for an offline import
	prevTick  uint64
	samples   []sample
	prog      progress
	opCancel  context.CancelFunc
	lastState string
	lastWhy   string
	closed    bool
	// committing is the cycle whose commit is in flight: uploaded whole,
	// being applied by the replica (cycle.go); 0 if none.
	committing uint64
	verify     *VerifyProgress // the verify under way (verify.go)

	done chan struct{} // closed by Close
	wg   sync.WaitGroup
}

type sample struct {
	t     time.Time
	bytes int64
}

type progress struct {
	kind              string
	done, total       int64
	started           time.Time
	startDone         int64
	pieces, doneCount int64
}

// New checks cfg and loads the state file; it starts nothing (see Run).
func New(cfg Config) (*Shipper, error) {
	if !wire.ValidName(cfg.VM) {
		return nil, fmt.Errorf("%w: VM name %q", ErrBadConfig, cfg.VM)
	}
	if cfg.Journal == nil {
		return nil, fmt.Errorf("%w: no journal", ErrBadConfig)
	}
	if len(cfg.Disks) == 0 {
		return nil, fmt.Errorf("%w: no disks to replicate", ErrBadConfig)
	}
	if cfg.DiskIndex == nil {
		for i := range cfg.Disks {
			cfg.DiskIndex = append(cfg.DiskIndex, i)
		}
	}
	if len(cfg.DiskIndex) != len(cfg.Disks) {
		return nil, fmt.Errorf("%w: %d disk indexes for %d disks", ErrBadConfig, len(cfg.DiskIndex), len(cfg.Disks))
	}
	if cfg.Replica == "" || cfg.TLS == nil {
		return nil, fmt.Errorf("%w: replica address and TLS configuration are required", ErrBadConfig)
	}
	if cfg.Frequency < time.Second {
		return nil, fmt.Errorf("%w: frequency %v is below 1s", ErrBadConfig, cfg.Frequency)
	}
	if cfg.PieceSize == 0 {
		cfg.PieceSize = DefaultPieceSize
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if cfg.BlockSize < journal.BlockSize || cfg.BlockSize&(cfg.BlockSize-1) != 0 || cfg.BlockSize > wire.MaxFrameData {
		return nil, fmt.Errorf("%w: block size %d: want a power of two from 4 KiB to 1 MiB", ErrBadConfig, cfg.BlockSize)
	}
	if cfg.PieceSize < cfg.BlockSize || cfg.PieceSize%cfg.BlockSize != 0 {
		return nil, fmt.Errorf("%w: piece size %d is not a multiple of the block size %d", ErrBadConfig, cfg.PieceSize, cfg.BlockSize)
	}
	if cfg.ResyncWindow == "" {
		cfg.ResyncWindow = DefaultResyncWindow
	}
	win, err := ParseWindow(cfg.ResyncWindow)
	if err != nil {
		return nil, err
	}
	init, err := parseInitial(cfg.Initial)
	if err != nil {
		return nil, err
	}
	s := &Shipper{
		cfg: cfg, j: cfg.Journal, log: cfg.Logger, fs: cfg.FS, now: cfg.Now,
		window: win, initial: init, chunk: wire.MaxChunk,
		roots: map[uint64][]string{}, rootsWait: rootsWait,
		wireOf:  make(map[int]int),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("vm", cfg.VM, "peer", cfg.Replica)
	if s.fs == nil {
		s.fs = vfs.Default
	}
	if s.now == nil {
		s.now = time.Now
	}
	for i, d := range cfg.Disks {
		if !wire.ValidName(d.Name) || d.Size <= 0 {
			return nil, fmt.Errorf("%w: disk %q of %d bytes", ErrBadConfig, d.Name, d.Size)
		}
		if _, dup := s.wireOf[cfg.DiskIndex[i]]; dup || cfg.DiskIndex[i] < 0 {
			return nil, fmt.Errorf("%w: disk index %d", ErrBadConfig, cfg.DiskIndex[i])
		}
		s.wireOf[cfg.DiskIndex[i]] = i
		s.sizes = append(s.sizes, d.Size)
	}
	if cfg.StateFile == "" {
		return nil, fmt.Errorf("%w: no state file", ErrBadConfig)
	}
	s.spoolDir = strings.TrimSuffix(cfg.StateFile, filepath.Ext(cfg.StateFile)) + ".spool"
	st, ok, err := loadState(s.fs, cfg.StateFile)
	if err != nil {
		return nil, err
	}
	if ok && st.VM != cfg.VM {
		return nil, fmt.Errorf("%w: %s belongs to VM %q", ErrState, cfg.StateFile, st.VM)
	}
	s.st = st
	s.st.VM = cfg.VM
	s.c = newClient(cfg.Replica, cfg.VM, cfg.TLS, cfg.BypassProxy)
	s.c.now = s.now
	if cfg.PlainHTTP {
		s.c.plainHTTP()
	}
	return s, nil
}

// Run seals a cycle every Frequency and ships closed cycles in order, doing
// the initial copy and resyncs as they are due, until ctx ends or Close. It
// returns nil then; errors on the way are retried or stop replication (see
// Status), never returned.
// untilClosed is ctx, also cancelled when the shipper closes: the work of
// Run and Verify ends with the shipper. cancel releases it.
func (s *Shipper) untilClosed(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func (s *Shipper) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	ctx, cancel := s.untilClosed(ctx)
	defer cancel()
	s.mu.Lock()
	var gen uint64
	if s.st.Sync != nil {
		gen = s.st.Sync.Gen
	}
	s.enabled = false
	s.runAt = s.now()
	s.mu.Unlock()
	s.cleanSpools(gen)

	var wg sync.WaitGroup
	wg.Go(func() { s.sealLoop(ctx) })
	if s.cfg.VerifyEvery > 0 {
		wg.Go(func() { s.verifySchedule(ctx) })
	}
	s.loop(ctx)
	cancel()
	wg.Wait()
	return nil
}

// Close stops Run and waits for it. It is idempotent.
func (s *Shipper) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.done)
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.c.close()
	return nil
}

// signal wakes everything waiting for a change. Call with mu held.
func (s *Shipper) signalLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Shipper) signal() {
	s.mu.Lock()
	s.signalLocked()
	s.mu.Unlock()
}

// wait blocks until ch is closed, until (if not zero) passes, or ctx ends.
func (s *Shipper) wait(ctx context.Context, ch <-chan struct{}, until time.Time) {
	var timer <-chan time.Time
	if !until.IsZero() {
		d := until.Sub(s.now())
		if d <= 0 {
			return
		}
		t := time.NewTimer(d)
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-ctx.Done():
	case <-ch:
	case <-timer:
	}
}

// save writes the state file. Saves are serialised so the file never goes
// back to an older state.
func (s *Shipper) save() error {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.mu.Lock()
	b, err := encodeState(&s.st)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("ship: encode state: %w", err)
	}
	if err := s.fs.MkdirAll(filepath.Dir(s.cfg.StateFile), 0o700); err != nil {
		return fmt.Errorf("ship: state directory: %w", err)
	}
	if err := vfs.WriteFileAtomic(s.fs, s.cfg.StateFile, b, 0o600); err != nil {
		return fmt.Errorf("ship: write state: %w", err)
	}
	return nil
}

// update changes the persisted state under mu, saves it and wakes waiters.
func (s *Shipper) update(fn func(st *persisted)) error {
	s.mu.Lock()
	fn(&s.st)
	s.mu.Unlock()
	err := s.save() // durable before anyone waiting on it hears of it
	s.mu.Lock()
	s.signalLocked()
	s.mu.Unlock()
	s.notifyState()
	return err
}

// loop runs steps until ctx ends, waiting while paused, stopped, between
// retries and when there is nothing to do.
func (s *Shipper) loop(ctx context.Context) {
	for ctx.Err() == nil {
		s.mu.Lock()
		ch := s.changed
		hold := s.st.Paused || s.stopped != nil
		until := s.retryAt
		s.mu.Unlock()
		if hold || s.now().Before(until) {
			s.notifyState()
			s.wait(ctx, ch, until)
			continue
		}
		opCtx, cancel := context.WithCancel(ctx)
		s.mu.Lock()
		s.opCancel = cancel
		s.mu.Unlock()
		s.opMu.Lock()
		more, wake, err := s.step(opCtx)
		s.opMu.Unlock()
		s.mu.Lock()
		s.opCancel = nil
		s.mu.Unlock()
		paused := opCtx.Err() != nil && ctx.Err() == nil
		cancel()
		if more || err != nil {
			s.setWaiting("", time.Time{})
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && paused:
			// Pause cut the operation short; it resumes where it stopped.
		case err != nil:
			s.fail(err)
		case !more:
			s.notifyState()
			s.wait(ctx, ch, wake)
		}
	}
}

// fail records an error: retried after the back-off, or replication stops.
func (s *Shipper) fail(err error) {
	retry := retryable(err)
	now := s.now()
	s.mu.Lock()
	s.lastErr, s.lastErrAt, s.lastFail = err.Error(), now, err
	var next time.Duration
	if s.attempt == 0 {
		s.failingAt = now
	}
	if retry {
		s.attempt++
		next = jitter(backoff(s.attempt, s.cfg.RetryScale), rand.Float64())
		s.retryAt = now.Add(next)
		s.st.Counters.Retries++
	} else {
		s.stopped = err
	}
	s.mu.Unlock()
	if retry {
		s.log.Warn("replication failed, will retry", "err", err, "retry_in", next)
	} else {
		s.log.Error("replication stopped", "err", err)
	}
	s.signal()
	s.notifyState()
}

// succeeded resets the back-off after progress.
func (s *Shipper) succeeded() {
	s.mu.Lock()
	s.attempt = 0
	s.retryAt = time.Time{}
	s.failingAt = time.Time{}
	s.mu.Unlock()
}

// step does the next thing due. more says call it again at once; else the
// loop waits for a change or until wake (if not zero).
func (s *Shipper) step(ctx context.Context) (more bool, wake time.Time, err error) {
	s.mu.Lock()
	st := s.st
	enabled := s.enabled
	s.mu.Unlock()

	// An offline copy needs no replica: write it before anything else.
	if !st.InitialDone && st.Sync == nil && s.initial.kind == "offline" {
		return true, time.Time{}, s.writeOffline(ctx, s.initial.dir)
	}
	if !enabled {
		existing := !st.InitialDone && s.initial.kind == "existing"
		rep, err := s.c.enable(ctx, wire.Enable{Disks: s.cfg.Disks, Existing: existing,
			RecoveryPoints: s.cfg.RecoveryPoints, PointInterval: s.cfg.PointInterval, Excluded: s.cfg.Excluded,
			Frequency: s.cfg.Frequency})
		if err != nil {
			return false, time.Time{}, err
		}
		if err := s.noteReplica(rep); err != nil {
			return false, time.Time{}, err
		}
		if !st.InitialDone && st.Sync == nil && (s.initial.kind == "network" || s.initial.kind == "at") && rep.Applied > 0 {
			// The replica already holds this VM (replication was disabled
			// and enabled again): a full copy would overwrite its last
			// consistent point, a resync sends only what differs.
			s.log.Info("replica already holds the VM, resyncing instead of a full copy", "applied", rep.Applied)
			s.initial.kind = "existing"
		}
		s.mu.Lock()
		s.enabled = true
		s.mu.Unlock()
		s.log.Debug("replica enabled")
		return true, time.Time{}, nil
	}
	if st.Sync != nil {
		return s.runSync(ctx)
	}
	if !st.InitialDone {
		switch s.initial.kind {
		case "at":
			if now := s.now(); now.Before(s.initial.at) {
				s.setWaiting("at", s.initial.at)
				return false, s.initial.at, nil
			}
			return true, time.Time{}, s.startSync(wire.KindFull, "initial copy (scheduled)", "")
		case "existing":
			return true, time.Time{}, s.startSync(wire.KindResync, "initial resync against existing replica images", "")
		default:
			return true, time.Time{}, s.startSync(wire.KindFull, "initial copy", "")
		}
	}
	js := s.j.Stats()
	pending := st.Resync
	if pending == nil && js.ResyncRequired {
		pending = &pendingResync{Reason: "the journal passed its cap; changed blocks are only tracked"}
		if js.ResyncReason != "" {
			pending.Reason = js.ResyncReason
		}
		if err := s.update(func(p *persisted) { p.Resync = pending }); err != nil {
			return false, time.Time{}, err
		}
	}
	if pending == nil && js.ResyncBase != 0 {
		// The journal has a resync under way we have no record of (the state
		// was lost or a crash came between its start and our save): the
		// replica is not complete, so run one now.
		pending = &pendingResync{Reason: "a resync was interrupted", Manual: true}
	}
	if pending != nil {
		now := s.now()
		if !pending.Manual && !s.window.Contains(now) {
			next := s.window.Next(now)
			s.setWaiting("window", next)
			return false, next, nil
		}
		return true, time.Time{}, s.startSyncFor(wire.KindResync, pending.Reason, "", pending)
	}
	cycles := s.j.Cycles()
	if len(cycles) == 0 {
		return false, time.Time{}, nil
	}
	if cycles[0].Cycle <= st.Applied {
		// Applied before a crash that came ahead of the journal's next
		// checkpoint (Release is durable only there): release, do not resend.
		return true, time.Time{}, s.shipped(cycles[0], wire.Replica{Applied: st.Applied}, 0, 0)
	}
	if err := s.shipCycles(ctx, cycles[0]); err != nil {
		var de *journal.DamageError
		if errors.As(err, &de) {
			return true, time.Time{}, s.damaged(de)
		}
		return false, time.Time{}, err
	}
	return true, time.Time{}, nil
}

// damaged handles a cycle whose journaled data does not verify (damage at
// rest in a segment): it is never shipped, and no later cycle can follow it
// onto the replica. The VM is marked resync required with a reason naming
// the record, the disk range and the segment; the resync ships what differs
// from the primary's image, which the write-back filled from the record
// before it was damaged (or the damage was found there and failed the
// journal). The cycle, half uploaded at most, is released by the resync's
// barrier. DESIGN invariant 2.
func (s *Shipper) damaged(de *journal.DamageError) error {
	reason := de.Error()
	s.log.Error("journal damaged, resync required", "reason", reason, "segment", de.Segment, "lsn", de.LSN,
		"disk", de.DiskName, "range", fmt.Sprintf("[%d,%d)", de.Off, de.Off+de.Len))
	return s.update(func(st *persisted) { st.Resync = &pendingResync{Reason: reason} })
}

// setWaiting records why the loop idles and until when. Waiters are woken
// when the reason changes (not for a new poll time, which would wake the
// loop itself at once).
func (s *Shipper) setWaiting(why string, until time.Time) {
	s.mu.Lock()
	changed := why != s.waiting
	s.waiting, s.waitUntil = why, until
	if changed {
		s.signalLocked()
	}
	s.mu.Unlock()
}

// sealLoop seals a cycle every Frequency.
func (s *Shipper) sealLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.Frequency)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.tick(ctx)
		}
	}
}

// tick is one scheduled seal. A seal that finds the cycle of the previous
// tick still unshipped counts a missed cycle. No cycle is sealed while
// paused, nor before the initial copy or while a sync runs: then every write
// made while the pieces were read lands in the one cycle after the base,
// sealed after the last read, and the replica equals the primary at that
// cycle's barrier once it applied it (apply marks it consistent then). A
// cycle sealed mid-sync would be marked consistent without being so.
func (s *Shipper) tick(ctx context.Context) {
	js := s.j.Stats()
	s.mu.Lock()
	s.addSample(js.RetainedBytes)
	skip := s.st.Paused || !s.st.InitialDone || s.st.Sync != nil
	prev := s.prevTick
	app := s.appSealDue(s.now())
	s.mu.Unlock()
	if skip {
		return
	}
	info, err := s.seal(ctx, app)
	if err != nil {
		s.log.Warn("seal cycle", "err", err)
		return
	}
	missed := false
	if prev != 0 {
		for _, c := range s.j.Cycles() {
			if c.Cycle == prev {
				missed = true
				break
			}
		}
	}
	s.mu.Lock()
	s.prevTick = info.Cycle
	if missed {
		s.st.Counters.Missed++
	}
	s.signalLocked()
	s.mu.Unlock()
	s.log.Debug("cycle sealed", "cycle", info.Cycle, "missed", missed)
}

func (s *Shipper) addSample(retained int64) {
	s.samples = append(s.samples, sample{t: s.now(), bytes: retained})
	if len(s.samples) > 16 {
		s.samples = s.samples[len(s.samples)-16:]
	}
}

// Sync seals a cycle now and waits until the replica applied it. It
// returns the cycle, or why it cannot be applied (paused, stopped by a
// non-recoverable error, a resync that waits for its window, ctx). During an
// initial copy or resync it waits for the end of it before sealing. When
// ctx's deadline comes first, the error is a *SyncTimeoutError, which says
// what it waited for and why that did not come (timeout.go). With
// app, the cycle is sealed with the guest quiesced (appseal.go); without a
// quiescer that is an error.
func (s *Shipper) Sync(ctx context.Context, app bool) (uint64, error) {
	if app && s.cfg.Quiesce == nil {
		return 0, fmt.Errorf("%w: VM %s has no quiescer (enable replication with --quiesce-cmd or --qga-socket)", ErrBadConfig, s.cfg.VM)
	}
	start := time.Now() // ctx's clock, not Config.Now
	s.mu.Lock()
	err := s.haltedLocked()
	s.mu.Unlock()
	if err != nil {
		return 0, err
	}
	// Seal only once no sync runs (see tick). Wake the loop first: an
	// offline copy's import is then looked for now, not at the next poll.
	s.signal()
	err = s.await(ctx, func() (bool, error) {
		if s.st.InitialDone && s.st.Sync == nil {
			return true, nil
		}
		if err := s.haltedLocked(); err != nil {
			return false, err
		}
		if s.waiting == "at" {
			return false, fmt.Errorf("ship: the initial copy is scheduled for %s", s.initial.at.Format(time.RFC3339))
		}
		return false, nil
	})
	if err != nil {
		return 0, s.timedOut(ctx, err, 0, start)
	}
	info, err := s.seal(ctx, app)
	if err != nil {
		return 0, fmt.Errorf("ship: seal: %w", err)
	}
	s.signal()
	err = s.await(ctx, func() (bool, error) {
		if s.st.Applied >= info.Cycle {
			return true, nil
		}
		if err := s.haltedLocked(); err != nil {
			return false, err
		}
		// Only a pending automatic resync waits for the window; the
		// loop's waiting reason may lag behind a manual one or a start.
		if s.waiting == "window" && s.st.Sync == nil && s.st.Resync != nil && !s.st.Resync.Manual {
			return false, fmt.Errorf("%w: it waits for the resync window; run `vdrepl replication resync` to start it now", ErrResyncRequired)
		}
		return false, nil
	})
	if err != nil {
		return 0, s.timedOut(ctx, err, info.Cycle, start)
	}
	return info.Cycle, nil
}

// haltedLocked says why the shipper makes no progress until an admin acts:
// closed, paused, or stopped by a non-recoverable error. Call with mu held.
func (s *Shipper) haltedLocked() error {
	switch {
	case s.closed:
		return ErrClosed
	case s.st.Paused:
		return ErrPaused
	case s.stopped != nil:
		return fmt.Errorf("%w: %w", ErrStopped, s.stopped)
	}
	return nil
}

// await calls check with mu held until it reports done or an error, waiting
// for a change of state between calls, or until ctx ends.
func (s *Shipper) await(ctx context.Context, check func() (bool, error)) error {
	for {
		s.mu.Lock()
		ch := s.changed
		done, err := check()
		s.mu.Unlock()
		if done || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// Pause stops shipping (an upload under way is cut short and resumed later)
// and sealing; writes gather in the journal. It is persisted.
func (s *Shipper) Pause() error {
	err := s.update(func(st *persisted) { st.Paused = true })
	s.mu.Lock()
	if s.opCancel != nil {
		s.opCancel()
	}
	s.mu.Unlock()
	s.log.Info("replication paused")
	return err
}

// Resume undoes Pause, and clears a stop after a non-recoverable error
// (retrying at once).
func (s *Shipper) Resume() error {
	s.mu.Lock()
	s.clearStopLocked()
	s.enabled = false
	s.mu.Unlock()
	err := s.update(func(st *persisted) { st.Paused = false })
	s.log.Info("replication resumed")
	return err
}

// clearStopLocked forgets a stop, the back-off and what the loop waited for:
// the admin acted, try at once.
func (s *Shipper) clearStopLocked() {
	s.stopped = nil
	s.attempt = 0
	s.retryAt = time.Time{}
	s.failingAt = time.Time{}
	s.waiting, s.waitUntil = "", time.Time{}
}

// Resync starts a resync now, outside the resync window too. One already
// under way goes on.
func (s *Shipper) Resync() error {
	s.mu.Lock()
	s.clearStopLocked()
	running := s.st.Sync != nil
	s.mu.Unlock()
	if running {
		s.signal()
		return nil
	}
	s.log.Info("manual resync requested")
	return s.update(func(st *persisted) { st.Resync = &pendingResync{Reason: "manual resync", Manual: true} })
}

// primaryName is our certificate's name, for an offline manifest.
func (s *Shipper) primaryName() string {
	if s.cfg.Primary != "" {
		return s.cfg.Primary
	}
	var cert *tls.Certificate
	if f := s.cfg.TLS.GetClientCertificate; f != nil {
		cert, _ = f(&tls.CertificateRequestInfo{})
	} else if len(s.cfg.TLS.Certificates) > 0 {
		cert = &s.cfg.TLS.Certificates[0]
	}
	if cert == nil || len(cert.Certificate) == 0 {
		return ""
	}
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return ""
		}
	}
	if leaf.Subject.CommonName != "" {
		return leaf.Subject.CommonName
	}
	if len(leaf.DNSNames) > 0 {
		return leaf.DNSNames[0]
	}
	return ""
}
