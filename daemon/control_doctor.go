package daemon

import (
	"context"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
)

// The part of the control API that `vdrepl doctor` reads: what the running
// daemon was configured with and how it would reach replicas.
//
//	GET    /v1/doctor[?replica=HOST:PORT]...      DoctorInfo
func (d *Daemon) doctorRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/doctor", func(w http.ResponseWriter, r *http.Request) {
		reply(w, d.DoctorInfo(r.URL.Query()["replica"]), nil)
	})
}

// DoctorInfo is the daemon's configuration as far as checks need it.
type DoctorInfo struct {
	StateDir string `json:"state_dir"`
	// NBD lists the NBD addresses the daemon listens on now.
	NBD []string `json:"nbd"`
	// JournalCap is --journal-cap (0: half of each VM's disk size).
	JournalCap int64 `json:"journal_cap"`
	// TLSCert, TLSKey and TLSCA are the identity files, made absolute.
	TLSCert       string `json:"tls_cert,omitempty"`
	TLSKey        string `json:"tls_key,omitempty"`
	TLSCA         string `json:"tls_ca,omitempty"`
	ReplicaListen string `json:"replica_listen,omitempty"`
	// Proxies maps each replica address asked about, and each one a VM
	// replicates to, to the proxy URL this daemon's environment
	// (HTTPS_PROXY, NO_PROXY) gives it, as shipping uses it; "" = direct.
	// A VM set to bypass proxies connects directly whatever it says here.
	Proxies map[string]string `json:"proxies"`
}

// DoctorInfo reports the daemon's configuration and, for the replica
// addresses given and those of replicated VMs, the proxy it would use.
func (d *Daemon) DoctorInfo(replicas []string) DoctorInfo {
	d.mu.Lock()
	info := DoctorInfo{
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

// Doctor fetches the daemon's DoctorInfo, with the proxies for replicas.
func (c *Client) Doctor(ctx context.Context, replicas ...string) (DoctorInfo, error) {
	q := url.Values{"replica": replicas}
	var out DoctorInfo
	err := c.do(ctx, http.MethodGet, "/v1/doctor?"+q.Encode(), nil, &out)
	return out, err
}
