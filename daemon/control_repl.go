package daemon

import (
	"context"
	"net/http"
	"net/url"

	"github.com/vdrepl/vdrepl/apply"
)

// The replication part of the control API.
//
//	GET    /v1/replication[?vm=NAME]              Replication
//	POST   /v1/vms/{name}/replication             ReplicationSpec -> ReplicationSpec
//	DELETE /v1/vms/{name}/replication
//	POST   /v1/vms/{name}/replication/sync        -> {"cycle": N} once applied
//	POST   /v1/vms/{name}/replication/{op}        op: pause, resume, resync
//	GET    /v1/replica/allow                      []apply.AllowEntry
//	POST   /v1/replica/allow                      apply.AllowEntry
//	DELETE /v1/replica/allow?primary=PATTERN
//	POST   /v1/replica/import                     {"vm": V, "dir": D}
func (d *Daemon) replicationRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/replication", func(w http.ResponseWriter, r *http.Request) {
		out, err := d.ReplicationStatus(r.URL.Query().Get("vm"))
		reply(w, out, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication", func(w http.ResponseWriter, r *http.Request) {
		var spec ReplicationSpec
		if err := decode(r, &spec); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := d.EnableReplication(r.PathValue("name"), spec)
		reply(w, out, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{name}/replication", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, d.DisableReplication(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication/sync", func(w http.ResponseWriter, r *http.Request) {
		c, err := d.SyncReplication(r.Context(), r.PathValue("name"), r.URL.Query().Get("app") == "1")
		reply(w, SyncResult{Cycle: c}, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication/{op}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, d.ReplicationControl(r.PathValue("name"), r.PathValue("op")))
	})
	mux.HandleFunc("GET /v1/replica/allow", func(w http.ResponseWriter, r *http.Request) {
		reply(w, d.AllowList(), nil)
	})
	mux.HandleFunc("POST /v1/replica/allow", func(w http.ResponseWriter, r *http.Request) {
		var e apply.AllowEntry
		if err := decode(r, &e); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, e, d.Allow(e))
	})
	mux.HandleFunc("DELETE /v1/replica/allow", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, d.Disallow(r.URL.Query().Get("primary")))
	})
	mux.HandleFunc("POST /v1/replica/import", func(w http.ResponseWriter, r *http.Request) {
		var req ImportRequest
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, struct{}{}, d.ImportInitial(req.VM, req.Dir))
	})
}

// SyncResult is the answer of a replication sync.
type SyncResult struct {
	Cycle uint64 `json:"cycle"`
}

// ImportRequest asks the replica role to load an offline initial copy.
type ImportRequest struct {
	VM  string `json:"vm"`
	Dir string `json:"dir"`
}

// Replication fetches replication status (vm "" = all).
func (c *Client) Replication(ctx context.Context, vm string) (Replication, error) {
	var out Replication
	p := "/v1/replication"
	if vm != "" {
		p += "?vm=" + url.QueryEscape(vm)
	}
	err := c.do(ctx, http.MethodGet, p, nil, &out)
	return out, err
}

// EnableReplication enables replication of a VM.
func (c *Client) EnableReplication(ctx context.Context, vm string, s ReplicationSpec) (ReplicationSpec, error) {
	var out ReplicationSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication", s, &out)
	return out, err
}

// DisableReplication disables replication of a VM.
func (c *Client) DisableReplication(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/replication", nil, nil)
}

// SyncReplication closes a cycle now (app: with the guest quiesced) and
// waits until the replica applied it.
func (c *Client) SyncReplication(ctx context.Context, vm string, app bool) (uint64, error) {
	var out SyncResult
	p := "/v1/vms/" + url.PathEscape(vm) + "/replication/sync"
	if app {
		p += "?app=1"
	}
	err := c.do(ctx, http.MethodPost, p, nil, &out)
	return out.Cycle, err
}

// ReplicationControl pauses, resumes or resyncs.
func (c *Client) ReplicationControl(ctx context.Context, vm, op string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/"+url.PathEscape(op), nil, nil)
}

// AllowList lists the replica role's allow-list.
func (c *Client) AllowList(ctx context.Context) ([]apply.AllowEntry, error) {
	var out []apply.AllowEntry
	err := c.do(ctx, http.MethodGet, "/v1/replica/allow", nil, &out)
	return out, err
}

// Allow adds an allow-list entry.
func (c *Client) Allow(ctx context.Context, e apply.AllowEntry) error {
	return c.do(ctx, http.MethodPost, "/v1/replica/allow", e, nil)
}

// Disallow removes an allow-list entry.
func (c *Client) Disallow(ctx context.Context, pattern string) error {
	return c.do(ctx, http.MethodDelete, "/v1/replica/allow?primary="+url.QueryEscape(pattern), nil, nil)
}

// ImportInitial loads an offline initial copy on the replica.
func (c *Client) ImportInitial(ctx context.Context, vm, dir string) error {
	return c.do(ctx, http.MethodPost, "/v1/replica/import", ImportRequest{VM: vm, Dir: dir}, nil)
}
