// Package doctor checks a vdrepl host, the way from it to its replicas and
// the replication of its VMs, and says for each thing wrong what it is and
// how to fix it, in one sentence an admin can act on.
//
// Each check returns Findings: ok (checked and fine), warning (works, but
// something is off or will be) or problem (replication or a front end does
// not work, or will not). Run composes them the way `vdrepl doctor` shows
// them:
//
//   - this host: FUSE (/dev/fuse, fusermount3), the state directory
//     (writable; room on its filesystem for the journals to reach their
//     caps), the NBD addresses (free, or held by our own daemon);
//   - the replica: its name (IPv4, IPv6, and whether this host can use each
//     family at all), TCP to its port directly and through the proxy
//     HTTPS_PROXY/NO_PROXY give (as shipping does, unless the VM bypasses
//     proxies), a full upload chunk through that path, the TLS handshake
//     both ways (the replica's certificate as we check it; ours as the
//     replica takes it), the allow-list, and the clocks;
//   - a VM: its replication state, lag against its frequency, journal fill
//     and last error, as the daemon's control API reports them;
//   - on a replica host, each VM it keeps a replica of: whether its cycles
//     keep arriving (the replica's health; a failed-over VM expects none).
//
// The network checks never change anything on the replica: they use the
// replica's probe (wire.PeerPath), which reads and discards what it is
// sent. Functions are safe for concurrent use; Run makes its checks one
// after another.
package doctor

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/control"
)

// Severity says how bad a finding is.
type Severity string

// The severities, from good to bad.
const (
	OK      Severity = "ok"
	Warning Severity = "warning"
	Problem Severity = "problem"
)

// Names of the checks, as Finding.Check holds them.
const (
	CheckDaemon      = "daemon"
	CheckFUSE        = "fuse"
	CheckStateDir    = "state-dir"
	CheckJournalRoom = "journal-room"
	CheckNBD         = "nbd"
	CheckReplica     = "replica"
	CheckIdentity    = "tls-identity"
	CheckResolve     = "resolve"
	CheckFamily      = "ip-family"
	CheckTCP         = "tcp"
	CheckProxy       = "proxy"
	CheckTLSServer   = "tls-server"
	CheckTLSClient   = "tls-client"
	CheckAllowList   = "allow-list"
	CheckClock       = "clock"
	CheckUpload      = "upload"
	CheckVM          = "vm"
	CheckVMLag       = "vm-lag"
	CheckVMJournal   = "vm-journal"
	CheckVMError     = "vm-error"
	CheckVMReplica   = "vm-replica"
	// CheckReplicaHealth: on a replica host, whether a VM's cycles keep
	// arriving from its primary.
	CheckReplicaHealth = "replica-health"
	// CheckFence: a VM of this host fenced after an unplanned failover on
	// its replica host.
	CheckFence = "fence"
)

// Finding is one result of a check.
type Finding struct {
	Check string `json:"check"`
	// Subject is what was checked, where the check name does not say: a
	// replica address, a VM, a path, an NBD address.
	Subject  string   `json:"subject,omitempty"`
	Severity Severity `json:"severity"`
	// Cause says what was found; Fix what to do about it (empty when ok).
	Cause string `json:"cause"`
	Fix   string `json:"fix,omitempty"`
}

// Sentence is the finding as one line: subject, cause and fix.
func (f Finding) Sentence() string {
	s := f.Cause
	if f.Subject != "" {
		s = f.Subject + ": " + s
	}
	if f.Fix != "" {
		s += "; " + f.Fix
	}
	return s
}

// Report is what Run found.
type Report struct {
	Findings []Finding `json:"findings"`
	Problems int       `json:"problems"`
	Warnings int       `json:"warnings"`
}

func (r *Report) add(fs ...Finding) {
	for _, f := range fs {
		r.Findings = append(r.Findings, f)
		switch f.Severity {
		case Problem:
			r.Problems++
		case Warning:
			r.Warnings++
		}
	}
}

// Config says what Run checks. The zero value checks the local host with
// default paths and nothing else.
type Config struct {
	// Daemon is this host's daemon; when nil or not answering, the checks
	// that need it say so and the rest use StateDir and NBD.
	Daemon *control.Client
	// StateDir is the daemon's state directory when the daemon does not
	// say (default control.DefaultStateDir).
	StateDir string
	// NBD lists the NBD addresses to check; empty: those the running
	// daemon listens on, else the defaults for StateDir.
	NBD []string
	// Replica is a replica HOST:PORT to check; "" means VM's replica, or
	// without VM every replica this host's VMs replicate to.
	Replica string
	// VM is a VM whose replication to check ("" = none).
	VM string
	// TLSCert, TLSKey and TLSCA are this host's identity; empty: the
	// running daemon's.
	TLSCert, TLSKey, TLSCA string
	// BypassProxy checks the direct way to Replica, as a VM replicated
	// with --bypass-proxy goes (VMs say so themselves).
	BypassProxy bool
	// Proxy gives the proxy for a request when the daemon cannot tell
	// which one it uses (default http.ProxyFromEnvironment, as shipping).
	Proxy func(*http.Request) (*url.URL, error)
	// DevFuse is the FUSE device (default /dev/fuse).
	DevFuse string
	// Timeout bounds each network step (default 10s); UploadTimeout the
	// upload of one full chunk (default 2m, the time shipping sizes a
	// chunk for).
	Timeout, UploadTimeout time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.StateDir == "" {
		c.StateDir = control.DefaultStateDir
	}
	if c.Proxy == nil {
		c.Proxy = http.ProxyFromEnvironment
	}
	if c.DevFuse == "" {
		c.DevFuse = "/dev/fuse"
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.UploadTimeout <= 0 {
		c.UploadTimeout = 2 * time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// daemonView is what the running daemon told.
type daemonView struct {
	status control.Status
	info   control.DoctorInfo
	repl   control.Replication
	vms    []control.VMInfo
}

// target is one replica to check, and how shipping reaches it.
type target struct {
	addr   string
	vm     string // the VM whose replica it is, if one was asked about
	bypass bool
}

// Run runs every check cfg asks for and reports what it found.
func Run(ctx context.Context, cfg Config) Report {
	cfg.defaults()
	var r Report
	dv, daemonFindings := askDaemon(ctx, cfg)
	r.add(daemonFindings...)

	stateDir, held := cfg.StateDir, []string(nil)
	if dv != nil {
		stateDir, held = dv.info.StateDir, dv.info.NBD
	}
	r.add(FUSE(cfg.DevFuse)...)
	need, why := int64(0), ""
	if dv != nil {
		need, why = journalRoom(dv.vms)
	}
	r.add(StateDir(stateDir, need, why)...)
	nbd := cfg.NBD
	if len(nbd) == 0 {
		nbd = held
	}
	if len(nbd) == 0 {
		nbd = control.DefaultNBD(stateDir)
	}
	r.add(NBD(nbd, held)...)

	targets, tf := targets(cfg, dv)
	r.add(tf...)
	if len(targets) > 0 {
		files := TLSFiles{Cert: cfg.TLSCert, Key: cfg.TLSKey, CA: cfg.TLSCA}
		if files == (TLSFiles{}) && dv != nil {
			files = TLSFiles{Cert: dv.info.TLSCert, Key: dv.info.TLSKey, CA: dv.info.TLSCA}
		}
		id, idf := LoadIdentity(files, cfg.Now())
		r.add(idf...)
		for _, t := range targets {
			proxy, source, err := proxyFor(cfg, dv, t)
			if err != nil {
				r.add(Finding{Check: CheckProxy, Subject: t.addr, Severity: Problem,
					Cause: fmt.Sprintf("the proxy setting is invalid: %v", err), Fix: "correct HTTPS_PROXY in the daemon's environment"})
				continue
			}
			r.add(ReplicaPath(ctx, ReplicaCheck{
				Addr: t.addr, VM: t.vm, Identity: id, Proxy: proxy, ProxySource: source,
				Timeout: cfg.Timeout, UploadTimeout: cfg.UploadTimeout, Now: cfg.Now,
			})...)
		}
	}
	if cfg.VM != "" && dv != nil {
		r.add(VMReplication(cfg.VM, dv.vms, dv.repl, cfg.Now())...)
	} else if dv != nil {
		r.add(Fences(dv.vms)...)
		r.add(ReplicaHealth(dv.repl.Replicas)...)
	}
	return r
}

// askDaemon reads the daemon's state; nil when it does not answer.
func askDaemon(ctx context.Context, cfg Config) (*daemonView, []Finding) {
	sev := Warning
	if cfg.VM != "" {
		sev = Problem // a VM's state is only known to the daemon
	}
	if cfg.Daemon == nil {
		return nil, nil
	}
	var dv daemonView
	var err error
	if dv.status, err = cfg.Daemon.Status(ctx); err != nil {
		return nil, []Finding{{Check: CheckDaemon, Severity: sev,
			Cause: fmt.Sprintf("the daemon does not answer (%v), so its VMs and settings are not checked", err),
			Fix:   "start it with `vdrepl serve`, or point --state or --control at the running one"}}
	}
	dv.vms = dv.status.VMs
	var replicas []string
	if cfg.Replica != "" {
		replicas = append(replicas, cfg.Replica)
	}
	if dv.info, err = cfg.Daemon.Doctor(ctx, replicas...); err != nil {
		return nil, []Finding{{Check: CheckDaemon, Severity: sev,
			Cause: fmt.Sprintf("the daemon does not tell its settings (%v): is it an older vdrepl than this command?", err),
			Fix:   "restart `vdrepl serve` from this vdrepl binary"}}
	}
	if dv.repl, err = cfg.Daemon.Replication(ctx, ""); err != nil {
		return nil, []Finding{{Check: CheckDaemon, Severity: sev,
			Cause: fmt.Sprintf("the daemon does not report replication (%v)", err),
			Fix:   "check the daemon's log"}}
	}
	cause := fmt.Sprintf("the daemon runs with state in %s and %d VM(s)", dv.info.StateDir, len(dv.vms))
	return &dv, []Finding{{Check: CheckDaemon, Severity: OK, Cause: cause}}
}

// targets are the replicas to check.
func targets(cfg Config, dv *daemonView) ([]target, []Finding) {
	var prims []control.ReplicationStatus
	if dv != nil {
		prims = dv.repl.Primaries
	}
	vmSpec := func(vm string) *control.ReplicationSpec {
		for _, p := range prims {
			if p.VM == vm {
				return &p.Spec
			}
		}
		return nil
	}
	if cfg.Replica != "" {
		t := target{addr: cfg.Replica, vm: cfg.VM, bypass: cfg.BypassProxy}
		if s := vmSpec(cfg.VM); s != nil && s.Replica == cfg.Replica && s.BypassProxy {
			t.bypass = true
		}
		return []target{t}, nil
	}
	if cfg.VM != "" {
		if s := vmSpec(cfg.VM); s != nil {
			return []target{{addr: s.Replica, vm: cfg.VM, bypass: s.BypassProxy || cfg.BypassProxy}}, nil
		}
		return nil, nil // VMReplication says why
	}
	var out []target
	for _, p := range prims {
		t := target{addr: p.Spec.Replica, bypass: p.Spec.BypassProxy}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	if len(out) == 0 {
		cause := "no VM of this host replicates, so no replica was checked; give --replica HOST:PORT to check one"
		if dv == nil {
			cause = "without the daemon it is not known where VMs replicate, so no replica was checked; give --replica HOST:PORT to check one"
		}
		return nil, []Finding{{Check: CheckReplica, Severity: OK, Cause: cause}}
	}
	return out, nil
}

// proxyFor is the proxy shipping to t uses (nil: direct) and where that
// setting comes from.
func proxyFor(cfg Config, dv *daemonView, t target) (*url.URL, string, error) {
	if t.bypass {
		return nil, "", nil
	}
	if dv != nil {
		if p, ok := dv.info.Proxies[t.addr]; ok {
			if p == "" {
				return nil, "", nil
			}
			u, err := url.Parse(p)
			return u, "the daemon's HTTPS_PROXY", err
		}
	}
	u, err := cfg.Proxy(&http.Request{URL: &url.URL{Scheme: "https", Host: t.addr}})
	return u, "HTTPS_PROXY", err
}

// journalRoom is how much the journals of replicated VMs may still grow
// before their caps, and which VMs that is.
func journalRoom(vms []control.VMInfo) (int64, string) {
	var need int64
	var names []string
	for _, v := range vms {
		if v.Replication == nil || v.Journal == nil || v.Journal.Cap <= 0 {
			continue
		}
		if more := v.Journal.Cap - v.Journal.JournalBytes; more > 0 {
			need += more
			names = append(names, v.Name)
		}
	}
	if len(names) == 0 {
		return 0, ""
	}
	return need, "the journals of " + strings.Join(names, ", ")
}
