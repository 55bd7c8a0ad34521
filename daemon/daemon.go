// Package daemon is the vdrepl host: what runs on every host, primary and
// replica alike. It keeps the registry of VMs (vms.json), one journal per
// VM, and each VM's life: added, served, stopped and served again through
// the one VM transition (transition.go), removed. It serves the VMs' disks
// as exports (NBD, FUSE through mount.go) behind the read-only gate of a
// planned failover, and it wires the packages that do the rest: the
// control API (package control serves it; the Daemon is its Host), a
// shipper per replicated VM (ship), the replica role (apply), the failover
// state machine (failover: the Daemon is its Host and PrimaryRole, and
// adapts apply as its ReplicaRole), extended replication (relay) and the
// metrics.
//
// It decides no failover step and defines no control type: those live in
// failover and control. What it owns is mechanics: which journal, export
// and shipper a VM has, and how they open and close.
//
// Use: New(cfg), then Run(ctx), which opens every registered VM (after
// failover.Machine.Reconcile), serves, and returns after a clean shutdown
// when ctx is done.
//
// A Daemon is safe for concurrent use. Operations that change a VM are
// serialised by opMu (the failover machine takes it itself for a planned
// failover and an adoption, and lets it go while it waits on a peer); mu
// guards the maps and is never held across I/O. Lock order: opMu, then mu.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/control"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/failover"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/relay"
	"github.com/vdrepl/vdrepl/ship"
)

// Config of a Daemon.
type Config struct {
	// StateDir holds the registry, journals and the control socket.
	StateDir string
	// Control is the control socket; default StateDir/control.sock.
	Control string
	// NBD lists listen addresses: "unix:PATH" or "tcp:HOST:PORT" (see
	// nbdlisten.go: TCP is TLS-only unless NBDInsecure).
	NBD []string
	// NBDGroup is the group of the NBD unix sockets (name or number; ""
	// leaves the daemon's), which are mode 0660.
	NBDGroup string
	// NBDInsecure serves the TCP listeners without TLS; only loopback
	// addresses may be served so.
	NBDInsecure bool
	// JournalCap is the per-VM journal cap; 0 = half the VM's disk size.
	JournalCap int64
	// SyncInterval: how often a VM's journal syncs when clients never flush.
	SyncInterval time.Duration
	Logger       *slog.Logger

	// TLSCert, TLSKey and TLSCA are this host's identity, used to ship to
	// replicas and, with ReplicaListen, to serve as one.
	TLSCert, TLSKey, TLSCA string
	// ReplicaListen enables the replica role on HOST:PORT (HTTPS, mutual TLS).
	ReplicaListen string
	// BandwidthLimit caps all shipping of this host ("" = unlimited); see
	// ship.ParseBandwidth for the schedule syntax.
	BandwidthLimit string
	// ResyncWindow is when automatic resyncs may run ("" = 18:30-06:00).
	ResyncWindow string
	// RetryScale multiplies the retry back-off (1 = 2 s, doubling to a
	// ceiling of 30 minutes; see ship.Config.RetryScale); tests make it small.
	RetryScale float64
	// ResyncBlockSize is the checksum block of resyncs (0 = ship's default).
	ResyncBlockSize int64
	// NoBlockTree: journals keep no block tree (journal.Config.NoBlockTree),
	// so resyncs compare sums and cycles ship unverified. Only bench/fio.sh
	// sets it, to measure what the tree costs guest writes.
	NoBlockTree bool
	// MetricsListen serves Prometheus metrics on HOST:PORT ("" = off).
	MetricsListen string
	// QuiesceTimeout bounds a guest freeze (0 = DefaultQuiesceTimeout).
	QuiesceTimeout time.Duration
	// MemoryLimit is the process's soft memory limit (memory.go): 0 sets
	// one from the number of VMs, > 0 that many bytes, < 0 none. GOMEMLIMIT
	// in the environment wins.
	MemoryLimit int64
}

// Daemon is a running vdrepl host.
type Daemon struct {
	cfg Config
	log *slog.Logger
	// fs takes every persistent write of the daemon (state files, images
	// it creates, journal directories it removes). The os calls left in
	// the package need a descriptor or the OS itself: the state lock and
	// the images' OFD locks, unix sockets, /proc, file identity.
	fs  vfs.FS
	reg registry

	opMu sync.Mutex

	mu           sync.Mutex
	vms          map[string]*vm
	mounts       map[string]*blockdev.FUSEMount
	fuseOpen     map[string]int // export -> files open through FUSE
	lastShutdown string
	listeners    []string
	closed       bool

	nbd      *blockdev.NBDServer
	nbdAddrs []nbdAddr
	nbdGID   int           // group of the NBD sockets, -1 to leave it
	nbdAllow *nbdAllowList // which TLS clients may open which exports
	control  *http.Server
	lock     *os.File

	ctx         context.Context // lives as long as Run; shippers run under it
	identity    *pki.Identity   // nil without --tls-cert
	identityErr error           // why the configured identity could not be loaded
	replica     *apply.Server
	replicaEv   *replicaEvents // counts what the replica role reports
	shipEv      *shipEvents    // counts what the shippers report
	// tests and relays lock on their own, inside mu when both are held
	// (the export catalogue looks up test failovers under mu).
	tests       *failover.Tests[*testFailover]
	relays      *relay.Relays     // extended replication from this replica host; set by Run
	fo          *failover.Machine // over the replica role Run sets
	replicaAddr string
	metricsAddr string
	hostLimit   *ship.Limiter
}

type vm struct {
	gate  gate // read-only during a planned failover (planned.go)
	spec  control.VMSpec
	j     *journal.Journal
	locks []*os.File // OFD locks on the images
	err   error      // why the VM is not served, if it is not
	busy  bool       // a stand-in while the VM is in a transition (transition.go)

	ship     *ship.Shipper // non-nil while replication runs
	shipStop context.CancelFunc
	shipDone chan struct{}
}

// New prepares a daemon; Run starts it.
func New(cfg Config) (*Daemon, error) {
	if cfg.StateDir == "" {
		cfg.StateDir = control.DefaultStateDir
	}
	abs, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	cfg.StateDir = abs
	if cfg.Control == "" {
		cfg.Control = control.DefaultControl(cfg.StateDir)
	}
	if cfg.NBD == nil {
		cfg.NBD = control.DefaultNBD(cfg.StateDir)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	configureMemoryLimit(cfg.MemoryLimit)
	d := &Daemon{
		cfg:       cfg,
		replicaEv: newReplicaEvents(),
		shipEv:    newShipEvents(),
		log:       cfg.Logger,
		fs:        vfs.Default,
		reg:       registry{fs: vfs.Default, path: filepath.Join(cfg.StateDir, "vms.json")},
		vms:       make(map[string]*vm),
		mounts:    make(map[string]*blockdev.FUSEMount),
		fuseOpen:  make(map[string]int),
	}
	d.tests = d.newTests()
	d.fo = d.newMachine()
	d.nbdAllow = &nbdAllowList{fs: d.fs, path: filepath.Join(cfg.StateDir, "nbd-allow.json")}
	if d.nbdAddrs, err = parseNBDAddrs(cfg.NBD, cfg.NBDInsecure); err != nil {
		return nil, err
	}
	d.nbdGID = -1
	if cfg.NBDGroup != "" {
		if d.nbdGID, err = lookupGroup(cfg.NBDGroup); err != nil {
			return nil, err
		}
	}
	if cfg.TLSCert != "" || cfg.TLSKey != "" || cfg.TLSCA != "" {
		if cfg.TLSCert == "" || cfg.TLSKey == "" || cfg.TLSCA == "" {
			return nil, fmt.Errorf("%w: give all of --tls-cert, --tls-key and --tls-ca", control.ErrInvalid)
		}
		// An unusable certificate (expired, say) stops replication, not the
		// disks: the daemon still serves every VM and says why in status.
		if d.identity, err = pki.Load(cfg.TLSCert, cfg.TLSKey, cfg.TLSCA); err != nil {
			d.identityErr = fmt.Errorf("TLS identity unusable, replication, the replica role and NBD over TLS are off until it is fixed and the daemon restarted: %w", err)
		}
	}
	nbdCfg := blockdev.NBDConfig{Exports: (*exports)(d), Logger: cfg.Logger, Authorize: d.nbdAllow.access}
	for _, a := range d.nbdAddrs {
		if a.tls && d.identity == nil && d.identityErr == nil {
			return nil, fmt.Errorf("%w: --nbd tcp:%s serves NBD over TLS, which needs --tls-cert, --tls-key and --tls-ca (make them with `vdrepl pki init` and `vdrepl pki issue`); for plain NBD on this host only, use a loopback address with --nbd-insecure", control.ErrInvalid, a.addr)
		}
	}
	if d.identity != nil {
		nbdCfg.TLS = d.identity.ServerConfig()
	}
	d.nbd = blockdev.NewNBDServer(nbdCfg)
	if cfg.ReplicaListen != "" && d.identity == nil && d.identityErr == nil {
		return nil, fmt.Errorf("%w: --replica-listen needs --tls-cert, --tls-key and --tls-ca (make them with `vdrepl pki init` and `vdrepl pki issue`)", control.ErrInvalid)
	}
	if cfg.BandwidthLimit != "" {
		if d.hostLimit, err = ship.ParseBandwidth(cfg.BandwidthLimit); err != nil {
			return nil, fmt.Errorf("%w: --bandwidth-limit %q: %v", control.ErrInvalid, cfg.BandwidthLimit, err)
		}
	}
	if cfg.ResyncWindow != "" {
		if _, err := ship.ParseWindow(cfg.ResyncWindow); err != nil {
			return nil, fmt.Errorf("%w: --resync-window %q: %v", control.ErrInvalid, cfg.ResyncWindow, err)
		}
	}
	return d, nil
}

// Run opens every registered VM, serves NBD and the control API, and returns
// when ctx is done (after a clean shutdown) or a listener fails.
func (d *Daemon) Run(ctx context.Context) error {
	if err := d.fs.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := d.lockState(); err != nil {
		return err
	}
	d.lastShutdown = d.detectShutdown()
	d.log.Info("starting", "state", d.cfg.StateDir, "last_shutdown", d.lastShutdown)
	d.ctx = ctx
	if d.identity != nil {
		for _, w := range d.identity.Warnings(time.Now()) {
			d.log.Warn(w)
		}
	}
	if d.identityErr != nil {
		d.log.Error(d.identityErr.Error())
	}
	var err error
	if d.replica, err = apply.New(apply.Config{StateDir: d.cfg.StateDir, Logger: d.log.With("role", "replica"), Host: (*hostHooks)(d), DeferRecovery: true, Events: d.replicaEv.events()}); err != nil {
		d.shutdown()
		return fmt.Errorf("replica role: %w", err)
	}
	// Relays first: an apply a crash interrupted is redone by Recover and
	// must reach the third host too.
	d.relays = d.newRelays()
	d.relays.Restart(ctx)
	d.replica.Recover()

	specs, err := d.reg.load()
	if err != nil {
		d.shutdown()
		return fmt.Errorf("registry: %w", err)
	}
	for _, s := range d.applyFixes(specs, d.fo.Reconcile(entries(specs))) {
		d.serveRegistered(s)
	}

	d.tests.Restart()

	errc := make(chan error, len(d.cfg.NBD)+4)
	if d.cfg.ReplicaListen != "" && d.identityErr == nil {
		stop, err := d.serveReplica(ctx, errc)
		if err != nil {
			d.shutdown()
			return err
		}
		defer stop()
	}
	if d.cfg.MetricsListen != "" {
		stop, err := d.serveMetrics(errc)
		if err != nil {
			d.shutdown()
			return err
		}
		defer stop()
	}
	if err := d.nbdAllow.load(); err != nil {
		d.shutdown()
		return err
	}
	var wg sync.WaitGroup
	for _, a := range d.nbdAddrs {
		addr := a.network + ":" + a.addr
		if a.tls && d.identity == nil {
			d.log.Error("NBD TLS listener not started: the TLS identity is unusable", "addr", addr)
			continue
		}
		l, err := d.listenNBD(a)
		if err != nil {
			d.shutdown()
			return fmt.Errorf("NBD listen %s: %w", addr, err)
		}
		if a.network == "unix" && d.nbdGID >= 0 {
			if w := socketDirWarning(a.addr); w != "" {
				d.log.Warn(w)
			}
		}
		d.mu.Lock()
		d.listeners = append(d.listeners, l.Addr().Network()+":"+l.Addr().String())
		d.mu.Unlock()
		serve := d.nbd.Serve
		if a.tls {
			serve = d.nbd.ServeTLS
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := serve(ctx, l); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("NBD %s: %w", addr, err)
			}
		}()
	}
	cl, err := listen("unix:" + d.cfg.Control)
	if err != nil {
		d.shutdown()
		return fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(d.cfg.Control, 0o600); err != nil {
		cl.Close()
		d.shutdown()
		return fmt.Errorf("control socket: %w", err)
	}
	d.control = &http.Server{Handler: d.handler(), BaseContext: func(net.Listener) context.Context { return ctx }}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := d.control.Serve(cl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("control: %w", err)
		}
	}()
	d.log.Info("serving", "control", d.cfg.Control, "nbd", d.cfg.NBD)

	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutErr := d.shutdown()
	wg.Wait()
	if err != nil {
		return err
	}
	return shutErr
}

// shutdown stops serving and closes every journal (sync, write back,
// checkpoint), then records the clean shutdown.
func (d *Daemon) shutdown() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	mounts := make([]*blockdev.FUSEMount, 0, len(d.mounts))
	for _, m := range d.mounts {
		mounts = append(mounts, m)
	}
	d.mu.Unlock()
	for _, m := range mounts {
		d.unmount(m)
	}
	if d.control != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d.control.Shutdown(ctx)
		cancel()
	}
	d.nbd.Close()
	var errs []error
	d.mu.Lock()
	vms := d.vms
	d.vms = map[string]*vm{}
	d.mu.Unlock()
	for _, v := range vms {
		d.stopShipper(v)
	}
	if d.relays != nil {
		d.relays.Close()
	}
	// The test failovers stay recorded: the next start starts them again.
	if err := d.tests.CloseAll(); err != nil {
		d.log.Warn("close test failovers", "err", err)
	}
	// Journals first: a failed-over VM writes back through the replica's
	// recovery points, which close with the replica role.
	for name, v := range vms {
		if err := v.close(); err != nil {
			errs = append(errs, fmt.Errorf("vm %s: %w", name, err))
		}
	}
	if d.replica != nil {
		if err := d.replica.Close(); err != nil {
			errs = append(errs, fmt.Errorf("replica role: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	err := d.fs.Remove(filepath.Join(d.cfg.StateDir, runningFile))
	if err == nil {
		err = d.fs.SyncDir(d.cfg.StateDir)
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		// The next start takes this stop for a crash; say why.
		d.log.Warn("clean-shutdown marker not recorded", "err", err)
	}
	if d.lock != nil {
		d.lock.Close()
	}
	d.log.Info("stopped cleanly")
	return nil
}

// serveRegistered opens a VM of the registry at start-up and starts its
// replication; a VM that cannot open is listed with the reason.
func (d *Daemon) serveRegistered(s control.VMSpec) {
	v, err := d.openVM(s, false)
	if err != nil {
		d.log.Error("VM not served", "vm", s.Name, "err", err)
		v = &vm{spec: s, err: err}
	}
	d.mu.Lock()
	d.vms[s.Name] = v
	d.mu.Unlock()
	if s.HandedOver != nil {
		v.gate.set(true)
		d.log.Warn("VM handed over in a planned failover: served read-only until its new primary replicates back", "vm", s.Name, "to", s.HandedOver.To)
	}
	if f := s.Fenced; f != nil {
		d.log.Error("VM FENCED: "+f.Sentence()+"; its disks are read-only here until replication is reversed from there or `vdrepl vm unfence "+s.Name+" --force`", "vm", s.Name, "replica", f.Replica)
	}
	if v.j == nil || s.Replication == nil || s.HandedOver != nil {
		return
	}
	if d.identity == nil {
		why := d.identityErr
		if why == nil {
			why = errNoIdentity
		}
		v.err = fmt.Errorf("replication not running: %w", why)
		d.log.Error("replication not running", "vm", s.Name, "err", why)
	} else if err := d.startShipper(v); err != nil {
		d.log.Error("replication not running", "vm", s.Name, "err", err)
	}
}

func (v *vm) close() error {
	var err error
	if v.j != nil {
		err = v.j.Close()
		v.j = nil
		journalsOpen(-1)
	}
	for _, f := range v.locks {
		f.Close()
	}
	v.locks = nil
	return err
}

func listen(addr string) (net.Listener, error) {
	network, a, ok := strings.Cut(addr, ":")
	if !ok || (network != "unix" && network != "tcp") || a == "" {
		return nil, fmt.Errorf("%w: listen address %q: want unix:PATH or tcp:HOST:PORT", control.ErrInvalid, addr)
	}
	if network == "unix" {
		if err := removeStaleSocket(a); err != nil {
			return nil, err
		}
	}
	return net.Listen(network, a)
}

// removeStaleSocket removes a socket file nobody listens on (left by a crash).
func removeStaleSocket(p string) error {
	st, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", p)
	}
	if c, err := net.DialTimeout("unix", p, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%s: another process is listening", p)
	}
	return os.Remove(p)
}

// lockState keeps a second daemon off the same state directory.
func (d *Daemon) lockState() error {
	f, err := os.OpenFile(filepath.Join(d.cfg.StateDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("state directory %s is in use by another vdrepl daemon", d.cfg.StateDir)
	}
	d.lock = f
	return nil
}

const runningFile = "running"

// detectShutdown tells how the previous run ended: the running marker holds
// the kernel boot id while the daemon runs and is removed on a clean stop.
// A marker from this boot means the process was killed (page cache intact); a
// marker from another boot means the host went down (unsynced data lost).
// The journal recovers both the same way; this is for status and logs.
func (d *Daemon) detectShutdown() string {
	p := filepath.Join(d.cfg.StateDir, runningFile)
	boot := bootID()
	prev, err := vfs.ReadFile(d.fs, p)
	result := "clean"
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if _, err := d.fs.Stat(d.reg.path); errors.Is(err, fs.ErrNotExist) {
			result = "first start"
		}
	case err != nil:
		result = "unknown"
	case strings.TrimSpace(string(prev)) == boot:
		result = "process crash"
	default:
		result = "host crash"
	}
	if err := vfs.WriteFileAtomic(d.fs, p, []byte(boot+"\n"), 0o600); err != nil {
		d.log.Warn("cannot write running marker", "err", err)
	}
	return result
}

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// openVM locks and opens a VM's images and journal. With create, missing
// images that have a size are created sparse, and removed again on failure.
func (d *Daemon) openVM(s control.VMSpec, create bool) (_ *vm, err error) {
	v := &vm{spec: s}
	v.gate.fenced = s.Fenced != nil
	var created []string
	defer func() {
		if err != nil {
			v.close()
			for _, p := range created {
				if rerr := d.fs.Remove(p); rerr != nil {
					d.log.Warn("image created for a VM not added, not removed", "path", p, "err", rerr)
				}
			}
		}
	}()
	for i := range v.spec.Disks {
		ds := &v.spec.Disks[i]
		st, serr := d.fs.Stat(ds.Path)
		switch {
		case errors.Is(serr, fs.ErrNotExist) && create && ds.Create:
			f, err := d.fs.OpenFile(ds.Path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return nil, fmt.Errorf("disk %s: create %s: %w", ds.Name, ds.Path, err)
			}
			created = append(created, ds.Path)
			err = f.Truncate(ds.Size)
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return nil, fmt.Errorf("disk %s: create %s: %w", ds.Name, ds.Path, err)
			}
			if err := d.fs.SyncDir(filepath.Dir(ds.Path)); err != nil {
				return nil, err
			}
		case errors.Is(serr, fs.ErrNotExist):
			hint := ""
			if create {
				hint = " (give a size to create it: --disk PATH:SIZE)"
			}
			return nil, fmt.Errorf("%w: disk %s: %s does not exist%s", control.ErrInvalid, ds.Name, ds.Path, hint)
		case serr != nil:
			return nil, fmt.Errorf("disk %s: %w", ds.Name, serr)
		case !st.Mode().IsRegular():
			return nil, fmt.Errorf("%w: disk %s: %s is not a regular file", control.ErrInvalid, ds.Name, ds.Path)
		case ds.Size == 0 && create:
			ds.Size = st.Size()
		case st.Size() != ds.Size:
			return nil, fmt.Errorf("%w: disk %s: %s is %d bytes, but %d were given", control.ErrInvalid, ds.Name, ds.Path, st.Size(), ds.Size)
		}
		if ds.Size <= 0 || ds.Size%journal.BlockSize != 0 {
			return nil, fmt.Errorf("%w: disk %s: size %d is not a positive multiple of %d bytes", control.ErrInvalid, ds.Name, ds.Size, journal.BlockSize)
		}
		ds.Create = false
		lf, err := lockImage(ds.Path)
		if err != nil {
			return nil, fmt.Errorf("%w: disk %s: %v", control.ErrInUse, ds.Name, err)
		}
		v.locks = append(v.locks, lf)
	}
	jc := journal.Config{
		Retain:       s.Replication != nil,
		Dir:          filepath.Join(d.cfg.StateDir, "vms", s.Name, "journal"),
		IndexDir:     filepath.Join(d.cfg.StateDir, "vms", s.Name, "index"),
		Cap:          d.cfg.JournalCap,
		SyncInterval: d.cfg.SyncInterval,
		NoBlockTree:  d.cfg.NoBlockTree,
		Logger:       d.log.With("vm", s.Name),
	}
	for _, ds := range v.spec.Disks {
		jc.Disks = append(jc.Disks, journal.DiskSpec{Name: ds.Name, Path: ds.Path, Size: ds.Size})
	}
	if jc.FS, err = d.guardFS(s); err != nil {
		return nil, err
	}
	if v.j, err = journal.Open(jc); err != nil {
		return nil, err
	}
	journalsOpen(1)
	return v, nil
}

// lockImage takes an open-file-description write lock on an image, the kind
// QEMU takes too, so two users of one image are caught.
func lockImage(p string) (*os.File, error) {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s is locked by another process (a VM or another vdrepl?)", p)
	}
	return f, nil
}

// AddVM registers a VM, creating sparse images where sizes are given and the
// files are missing. On any error nothing is changed.
func (d *Daemon) AddVM(s control.VMSpec) (control.VMSpec, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := checkName("VM", s.Name); err != nil {
		return s, err
	}
	if len(s.Disks) == 0 {
		return s, fmt.Errorf("%w: VM %s needs at least one --disk", control.ErrInvalid, s.Name)
	}
	seen := map[string]bool{}
	for i := range s.Disks {
		ds := &s.Disks[i]
		if err := checkName("disk", ds.Name); err != nil {
			return s, err
		}
		if seen[ds.Name] {
			return s, fmt.Errorf("%w: VM %s has two disks named %s (name them with --disk NAME=PATH)", control.ErrInvalid, s.Name, ds.Name)
		}
		seen[ds.Name] = true
		if !filepath.IsAbs(ds.Path) {
			return s, fmt.Errorf("%w: disk path %q must be absolute", control.ErrInvalid, ds.Path)
		}
		ds.Path = filepath.Clean(ds.Path)
	}
	if d.replica != nil {
		if _, ok := d.replica.Replica(s.Name); ok {
			return s, fmt.Errorf("%w: this host keeps a replica VM named %s; a VM here and a replica may not share a name", control.ErrExists, s.Name)
		}
		for _, r := range d.replica.Replicas() {
			for _, img := range d.replica.Images(r.VM) {
				for _, ds := range s.Disks {
					if sameFile(img, ds.Path) {
						return s, fmt.Errorf("%w: %s is an image of replica VM %s", control.ErrInUse, ds.Path, r.VM)
					}
				}
			}
		}
	}
	d.mu.Lock()
	if _, ok := d.vms[s.Name]; ok {
		d.mu.Unlock()
		return s, fmt.Errorf("%w: VM %s is already registered", control.ErrExists, s.Name)
	}
	for _, other := range d.vms {
		for _, od := range other.spec.Disks {
			for _, ds := range s.Disks {
				if sameFile(od.Path, ds.Path) {
					d.mu.Unlock()
					return s, fmt.Errorf("%w: %s is already disk %s of VM %s", control.ErrInUse, ds.Path, od.Name, other.spec.Name)
				}
			}
		}
	}
	for i, a := range s.Disks {
		for _, b := range s.Disks[i+1:] {
			if sameFile(a.Path, b.Path) {
				d.mu.Unlock()
				return s, fmt.Errorf("%w: %s is given twice", control.ErrInvalid, a.Path)
			}
		}
	}
	d.mu.Unlock()
	s.Created = time.Now().UTC().Truncate(time.Second)
	v, err := d.openVM(s, true)
	if err != nil {
		return s, err
	}
	d.mu.Lock()
	next := append(d.specsLocked(), v.spec)
	d.mu.Unlock()
	if err := d.reg.save(next); err != nil {
		v.close()
		return s, fmt.Errorf("save registry: %w", err)
	}
	d.mu.Lock()
	d.vms[s.Name] = v
	d.mu.Unlock()
	d.log.Info("VM added", "vm", s.Name, "disks", len(s.Disks))
	return v.spec, nil
}

// usersLocked says who has a VM's disks open, or "" when nobody does.
func (d *Daemon) usersLocked(vm string) string {
	nbd, fuse := 0, 0
	for _, c := range d.nbd.Clients() {
		if strings.HasPrefix(c.Export, vm+"/") {
			nbd++
		}
	}
	for e, n := range d.fuseOpen {
		if strings.HasPrefix(e, vm+"/") {
			fuse += n
		}
	}
	var parts []string
	if nbd > 0 {
		parts = append(parts, fmt.Sprintf("%d NBD connection(s)", nbd))
	}
	if fuse > 0 {
		parts = append(parts, fmt.Sprintf("%d file(s) open through FUSE", fuse))
	}
	return strings.Join(parts, ", ")
}

func sameFile(a, b string) bool {
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}

func (d *Daemon) specsLocked() []control.VMSpec {
	out := make([]control.VMSpec, 0, len(d.vms))
	for _, v := range d.vms {
		out = append(out, v.spec)
	}
	slices.SortFunc(out, func(a, b control.VMSpec) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// RemoveVM stops serving a VM, closes its journal (everything written back to
// the images) and forgets it. The images stay.
func (d *Daemon) RemoveVM(name string) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	v, ok := d.vms[name]
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	if v.busy {
		d.mu.Unlock()
		return errBusy(v)
	}
	if users := d.usersLocked(name); users != "" {
		d.mu.Unlock()
		return fmt.Errorf("%w: VM %s is open (%s); disconnect its clients first", control.ErrInUse, name, users)
	}
	if v.spec.Replication != nil {
		d.mu.Unlock()
		return fmt.Errorf("%w: VM %s is replicated to %s; run `vdrepl replication disable %s` first", control.ErrInUse, name, v.spec.Replication.Replica, name)
	}
	if v.spec.FailedOver {
		d.mu.Unlock()
		return fmt.Errorf("%w: VM %s is failed over here; `vdrepl failover complete %s` or `vdrepl failover cancel %s` first", control.ErrInUse, name, name, name)
	}
	delete(d.vms, name)
	next := d.specsLocked()
	d.mu.Unlock()
	if err := d.reg.save(next); err != nil {
		d.mu.Lock()
		d.vms[name] = v
		d.mu.Unlock()
		return fmt.Errorf("save registry: %w", err)
	}
	// The catalogue no longer has the VM; end any connection that raced in.
	err := d.stopServing(v)
	if rerr := vfs.RemoveAll(d.fs, filepath.Join(d.cfg.StateDir, "vms", name)); err == nil {
		err = rerr
	}
	d.shipEv.forget(name)
	d.log.Info("VM removed", "vm", name)
	return err
}

// VMs lists the registered VMs, each with the exports of its test
// failover, and after them the replica VMs that are not registered here
// but have a test failover running (ReplicaOnly), so that every export
// this host serves is listed.
func (d *Daemon) VMs() []control.VMInfo {
	out := d.registeredVMs()
	for _, run := range d.tests.List() {
		info := testInfo(run)
		i := slices.IndexFunc(out, func(v control.VMInfo) bool { return v.Name == info.VM })
		if i < 0 {
			out = append(out, control.VMInfo{VMSpec: control.VMSpec{Name: info.VM, Disks: []control.DiskSpec{}}, Exports: []string{}, ReplicaOnly: true})
			i = len(out) - 1
		}
		out[i].TestExports, out[i].TestFailover = info.Exports, &info
	}
	return out
}

// registeredVMs lists the registered VMs, without test failovers.
func (d *Daemon) registeredVMs() []control.VMInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []control.VMInfo
	for _, s := range d.specsLocked() {
		v := d.vms[s.Name]
		info := control.VMInfo{VMSpec: s, TestExports: []string{}}
		for _, ds := range s.Disks {
			info.Exports = append(info.Exports, s.Name+"/"+ds.Name)
		}
		if v.j != nil {
			st := v.j.Stats()
			info.Journal = &st
		}
		if v.err != nil {
			info.Error = v.err.Error()
		}
		out = append(out, info)
	}
	return out
}

// setSpec changes a VM's spec: edit changes a copy, which is saved in the
// registry and only then becomes the VM's.
func (d *Daemon) setSpec(v *vm, edit func(*control.VMSpec)) error {
	next := v.spec
	edit(&next)
	if err := d.saveSpec(next); err != nil {
		return err
	}
	d.mu.Lock()
	v.spec = next
	d.mu.Unlock()
	return nil
}

// Seal closes the open cycle of a VM now.
func (d *Daemon) Seal(name string, flags uint64) (journal.CycleInfo, error) {
	d.mu.Lock()
	v, ok := d.vms[name]
	d.mu.Unlock()
	if !ok {
		return journal.CycleInfo{}, fmt.Errorf("%w: %s", control.ErrUnknownVM, name)
	}
	if v.j == nil {
		return journal.CycleInfo{}, fmt.Errorf("VM %s is not served: %v", name, v.err)
	}
	return v.j.Seal(flags)
}

// exports is the Daemon seen as the front ends' live catalogue.
type exports Daemon

func (e *exports) Lookup(name string) (blockdev.Export, bool) {
	vmName, diskName, ok := strings.Cut(name, "/")
	if !ok {
		return blockdev.Export{}, false
	}
	d := (*Daemon)(e)
	d.mu.Lock()
	defer d.mu.Unlock()
	v, ok := d.vms[vmName]
	if !ok {
		return d.testExport(vmName, diskName)
	}
	if v.j == nil {
		return blockdev.Export{}, false
	}
	for i, ds := range v.spec.Disks {
		if ds.Name == diskName {
			return blockdev.Export{Name: name, Disk: gatedDisk{v.j.Disk(i), &v.gate}, ReadOnly: v.spec.HandedOver != nil || v.spec.Fenced != nil,
				Description: "vdrepl VM " + vmName + " disk " + diskName}, true
		}
	}
	return blockdev.Export{}, false
}

func (e *exports) List() []blockdev.Export {
	d := (*Daemon)(e)
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []blockdev.Export
	for _, s := range d.specsLocked() {
		v := d.vms[s.Name]
		if v.j == nil {
			continue
		}
		for i, ds := range s.Disks {
			n := s.Name + "/" + ds.Name
			out = append(out, blockdev.Export{Name: n, Disk: gatedDisk{v.j.Disk(i), &v.gate}, ReadOnly: v.spec.HandedOver != nil || v.spec.Fenced != nil,
				Description: "vdrepl VM " + s.Name + " disk " + ds.Name})
		}
	}
	for _, run := range d.tests.List() {
		for _, disk := range run.Copy.disks {
			if x, ok := d.testExport(run.VM+testSuffix, disk); ok {
				out = append(out, x)
			}
		}
	}
	return out
}
