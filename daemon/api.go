package daemon

import (
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
)

// The daemon's side of the control API (package control): it serves
// control.NewHandler with itself as the control.Host.

var _ control.Host = (*Daemon)(nil)

// handler is the control API that Run serves on the control socket.
func (d *Daemon) handler() http.Handler { return control.NewHandler(d) }

// Status reports the daemon's state.
func (d *Daemon) Status() control.Status {
	// Test failovers have their own lines in status (Tests).
	vms := d.registeredVMs()
	tests := d.TestFailovers()
	var replicas []control.ReplicaStatus
	if d.replica != nil {
		for _, r := range d.replica.Statuses() {
			rs := control.NewReplicaStatus(r)
			rs.TestFailover = d.testFailoverOf(r.VM)
			replicas = append(replicas, rs)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	s := control.Status{StateDir: d.cfg.StateDir, LastShutdown: d.lastShutdown, NBD: append([]string(nil), d.listeners...), VMs: vms,
		ReplicaListen: d.replicaAddr, MetricsListen: d.metricsAddr, Tests: tests, Replicas: replicas}
	if d.identity != nil {
		s.Identity = d.identity.Name()
		s.Warnings = d.identity.Warnings(time.Now())
	}
	if d.identityErr != nil {
		s.Warnings = append(s.Warnings, d.identityErr.Error())
	}
	s.Warnings = append(s.Warnings, replicaWarnings(replicas)...)
	s.Warnings = append(s.Warnings, fenceWarnings(vms)...)
	for p := range d.mounts {
		s.Mounts = append(s.Mounts, p)
	}
	return s
}

// DoctorInfo reports the daemon's configuration and, for the replica
// addresses given and those of replicated VMs, the proxy it would use.
func (d *Daemon) DoctorInfo(replicas []string) control.DoctorInfo {
	d.mu.Lock()
	info := control.DoctorInfo{
		StateDir:      d.cfg.StateDir,
		NBD:           slices.Clone(d.listeners),
		JournalCap:    d.cfg.JournalCap,
		TLSCert:       absPath(d.cfg.TLSCert),
		TLSKey:        absPath(d.cfg.TLSKey),
		TLSCA:         absPath(d.cfg.TLSCA),
		ReplicaListen: d.replicaAddr,
		Proxies:       map[string]string{},
	}
	for _, v := range d.vms {
		if r := v.spec.Replication; r != nil {
			replicas = append(replicas, r.Replica)
		}
	}
	d.mu.Unlock()
	for _, addr := range replicas {
		// The same question ship's HTTP transport asks for every request.
		req := &http.Request{URL: &url.URL{Scheme: "https", Host: addr}}
		if p, err := http.ProxyFromEnvironment(req); err == nil && p != nil {
			info.Proxies[addr] = p.String()
		} else {
			info.Proxies[addr] = ""
		}
	}
	return info
}

// absPath makes a path given relative to the daemon's working directory
// usable by the CLI, which may run elsewhere.
func absPath(p string) string {
	if p == "" {
		return ""
	}
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// replicaWarnings are the lines `vdrepl status` shows for replica VMs
// whose health is not normal.
func replicaWarnings(replicas []control.ReplicaStatus) []string {
	var out []string
	for _, r := range replicas {
		if d := r.Diverged; d != nil {
			out = append(out, fmt.Sprintf("replica VM %s: DIVERGED after cycle %d: disks %s differ from the primary's; the primary resyncs them",
				r.VM, d.Cycle, strings.Join(d.Disks, ", ")))
		}
		if r.Health == apply.HealthNormal || r.Health == "" {
			continue
		}
		out = append(out, fmt.Sprintf("replica VM %s: health %s: %s; check the primary host and `vdrepl doctor` there", r.VM, r.Health, r.HealthReason))
	}
	return out
}
