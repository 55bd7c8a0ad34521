package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

// Replica is the replica role as the relays need it (apply.Server).
type Replica interface {
	Replica(vm string) (wire.Replica, bool)
	Images(vm string) []string
	SetRelay(vm string, r apply.Relay) error
}

// Spec is an extension of a replica VM to a third host.
type Spec struct {
	Replica     string
	Frequency   time.Duration
	Compression bool
	BypassProxy bool
	Enabled     time.Time
}

// Config of Relays.
type Config struct {
	// StateDir holds extend.json and extend/VM/.
	StateDir string
	FS       vfs.FS // vfs.Default when nil
	Replica  Replica
	// TLS returns the client configuration to reach host; nil when this
	// host has no identity, and NoTLS then says why.
	TLS   func(host string) *tls.Config
	NoTLS error
	// What the extensions' journals and shippers take, as a primary's.
	JournalCap   int64
	HostLimit    *ship.Limiter
	RetryScale   float64
	BlockSize    int64
	ResyncWindow string
	Logger       *slog.Logger
}

// Relays runs the extensions of one replica host.
type Relays struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	running map[string]*extension
}

// extension is a running extension.
type extension struct {
	vm    string
	spec  Spec
	relay *relay
	ship  *ship.Shipper
	stop  context.CancelFunc
	done  chan struct{}
}

// Running is a running extension as status shows it.
type Running struct {
	VM     string
	Spec   Spec
	Status ship.Status
}

const (
	stateFile   = "extend.json"
	stateFormat = "vdrepl-extend"
)

// New returns Relays with no extension running.
func New(cfg Config) *Relays {
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Relays{cfg: cfg, log: cfg.Logger, running: map[string]*extension{}}
}

// Dir is where the relay journal and shipper state of vm live.
func (rs *Relays) Dir(vm string) string {
	return filepath.Join(rs.cfg.StateDir, "extend", vm)
}

// Running reports whether vm is extended from here, and where to.
func (rs *Relays) Running(vm string) (Spec, bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	x, ok := rs.running[vm]
	if !ok {
		return Spec{}, false
	}
	return x.spec, true
}

// Start opens the relay of replica VM vm and starts its shipper under ctx.
// fresh: a relay journal left under the name is an earlier extension's and
// is removed first.
func (rs *Relays) Start(ctx context.Context, vm string, s Spec, fresh bool) error {
	if fresh {
		if err := vfs.RemoveAll(rs.cfg.FS, rs.Dir(vm)); err != nil {
			return fmt.Errorf("extend %s: remove an earlier relay journal: %w", vm, err)
		}
	}
	rep, ok := rs.cfg.Replica.Replica(vm)
	if !ok {
		return fmt.Errorf("%w: %s is not a replica VM on this host", apply.ErrUnknownVM, vm)
	}
	j, err := rs.openJournal(vm, rep)
	if err != nil {
		return err
	}
	r := &relay{j: j, replica: rs.cfg.Replica, vm: vm}
	host, _, _ := net.SplitHostPort(s.Replica)
	sh, err := ship.New(ship.Config{
		VM: vm, Disks: rep.Disks, Journal: relayJournal{Journal: ship.FromJournal(j), r: r},
		Replica: s.Replica, TLS: rs.cfg.TLS(host), BypassProxy: s.BypassProxy,
		Compress: s.Compression, Frequency: s.Frequency, Initial: "network",
		StateFile: filepath.Join(rs.Dir(vm), "ship.json"), HostLimit: rs.cfg.HostLimit,
		RetryScale: rs.cfg.RetryScale, BlockSize: rs.cfg.BlockSize, ResyncWindow: rs.cfg.ResyncWindow,
		Logger: rs.log.With("role", "extended"),
	})
	if err != nil {
		j.Close()
		return fmt.Errorf("extend %s: %w", vm, err)
	}
	if err := rs.cfg.Replica.SetRelay(vm, r); err != nil {
		sh.Close()
		j.Close()
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	x := &extension{vm: vm, spec: s, relay: r, ship: sh, stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(x.done)
		if err := sh.Run(ctx); err != nil {
			rs.log.Error("extended replication stopped", "vm", vm, "err", err)
		}
	}()
	rs.mu.Lock()
	rs.running[vm] = x
	rs.mu.Unlock()
	return nil
}

// openJournal opens the relay journal of vm over its replica images.
func (rs *Relays) openJournal(vm string, rep wire.Replica) (*journal.Journal, error) {
	images := map[string]bool{}
	jc := journal.Config{
		Dir:      filepath.Join(rs.Dir(vm), "journal"),
		IndexDir: filepath.Join(rs.Dir(vm), "index"),
		Retain:   true,
		Cap:      rs.cfg.JournalCap,
		Logger:   rs.log.With("vm", vm, "role", "relay"),
	}
	paths := rs.cfg.Replica.Images(vm)
	for i, disk := range rep.Disks {
		p := paths[i]
		images[filepath.Clean(p)] = true
		jc.Disks = append(jc.Disks, journal.DiskSpec{Name: disk.Name, Path: p, Size: disk.Size})
	}
	jc.FS = sinkFS{FS: rs.cfg.FS, images: images}
	j, err := journal.Open(jc)
	if err != nil {
		return nil, fmt.Errorf("extend %s: relay journal: %w", vm, err)
	}
	return j, nil
}

// Stop stops the shipper of vm's extension and closes its relay; false
// when vm is not extended.
func (rs *Relays) Stop(vm string) bool {
	rs.mu.Lock()
	x, ok := rs.running[vm]
	delete(rs.running, vm)
	rs.mu.Unlock()
	if !ok {
		return false
	}
	rs.cfg.Replica.SetRelay(vm, nil)
	x.stop()
	<-x.done
	x.ship.Close()
	if err := x.relay.j.Close(); err != nil {
		rs.log.Warn("close relay journal", "vm", vm, "err", err)
	}
	return true
}

// Remove drops the relay journal and shipper state of a stopped
// extension.
func (rs *Relays) Remove(vm string) error {
	return vfs.RemoveAll(rs.cfg.FS, rs.Dir(vm))
}

// Close stops every extension.
func (rs *Relays) Close() {
	rs.mu.Lock()
	names := make([]string, 0, len(rs.running))
	for name := range rs.running {
		names = append(names, name)
	}
	rs.mu.Unlock()
	for _, name := range names {
		rs.Stop(name)
	}
}

// fileSpec is a Spec as extend.json holds it.
type fileSpec struct {
	Replica     string    `json:"replica"`
	Frequency   duration  `json:"frequency"`
	Compression bool      `json:"compression"`
	BypassProxy bool      `json:"bypass_proxy,omitempty"`
	Enabled     time.Time `json:"enabled"`
}

type duration time.Duration

func (d duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = duration(v)
	return err
}

// Save records the running extensions in extend.json.
func (rs *Relays) Save() error {
	rs.mu.Lock()
	m := map[string]fileSpec{}
	for name, x := range rs.running {
		s := x.spec
		m[name] = fileSpec{Replica: s.Replica, Frequency: duration(s.Frequency), Compression: s.Compression, BypassProxy: s.BypassProxy, Enabled: s.Enabled}
	}
	rs.mu.Unlock()
	b, err := statefile.Encode(stateFormat, 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(rs.cfg.FS, filepath.Join(rs.cfg.StateDir, stateFile), b, 0o600)
}

// load reads extend.json; no file is no extension.
func (rs *Relays) load() (map[string]Spec, error) {
	b, err := vfs.ReadFile(rs.cfg.FS, filepath.Join(rs.cfg.StateDir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var m map[string]fileSpec
	if err := statefile.Decode(stateFormat, 1, b, &m); err != nil {
		return nil, err
	}
	out := make(map[string]Spec, len(m))
	for name, f := range m {
		out[name] = Spec{Replica: f.Replica, Frequency: time.Duration(f.Frequency), Compression: f.Compression, BypassProxy: f.BypassProxy, Enabled: f.Enabled}
	}
	return out, nil
}

// Restart starts the extensions recorded in extend.json under ctx; each
// one that cannot start is logged and left recorded.
func (rs *Relays) Restart(ctx context.Context) {
	m, err := rs.load()
	if err != nil {
		rs.log.Error("extended replication not started", "file", stateFile, "err", err)
		return
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, name := range names {
		if rs.cfg.TLS == nil {
			rs.log.Error("extended replication not running", "vm", name, "err", rs.cfg.NoTLS)
			continue
		}
		if err := rs.Start(ctx, name, m[name], false); err != nil {
			rs.log.Error("extended replication not running", "vm", name, "err", err)
		}
	}
}

// Shipper returns the shipper of an extended replica VM.
func (rs *Relays) Shipper(vm string) (*ship.Shipper, bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	x, ok := rs.running[vm]
	if !ok {
		return nil, false
	}
	return x.ship, true
}

// List lists the running extensions of vm ("" = all), by VM name.
func (rs *Relays) List(vm string) []Running {
	rs.mu.Lock()
	xs := make([]*extension, 0, len(rs.running))
	for _, x := range rs.running {
		if vm == "" || x.vm == vm {
			xs = append(xs, x)
		}
	}
	rs.mu.Unlock()
	slices.SortFunc(xs, func(a, b *extension) int { return strings.Compare(a.vm, b.vm) })
	out := make([]Running, 0, len(xs))
	for _, x := range xs {
		out = append(out, Running{VM: x.vm, Spec: x.spec, Status: x.ship.Status()})
	}
	return out
}
