package control

import (
	"context"
	"net/http"
	"net/url"
)

// NBDAllowEntry lets the NBD clients whose TLS client certificate matches
// Client open the exports that match Export over a TLS listener.
//
// Client is a certificate name pattern as for the replica allow-list
// (pki.Match): an exact name, *.domain, or * for any certificate from the
// host's CA. Export is an export name VM/DISK in which '*' stands for any
// run of characters other than '/' (web1/*, */data); a VM name alone means
// all its disks, and * alone every export. ReadOnly serves the exports
// read-only; when several entries match, one that is not read-only wins.
type NBDAllowEntry struct {
	Client   string `json:"client"`
	Export   string `json:"export"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// NBDAccessHost keeps the NBD allow-list. Changes take effect at the next
// handshake; removing an entry also ends the connections it allowed.
type NBDAccessHost interface {
	NBDAllowList() []NBDAllowEntry
	NBDAllow(NBDAllowEntry) error
	// NBDDisallow removes the entry for client and export, as listed.
	NBDDisallow(client, export string) error
}

func nbdRoutes(mux *http.ServeMux, h NBDAccessHost) {
	mux.HandleFunc("GET /v1/nbd/allow", func(w http.ResponseWriter, r *http.Request) {
		reply(w, h.NBDAllowList(), nil)
	})
	mux.HandleFunc("POST /v1/nbd/allow", decoded(func(_ *http.Request, e NBDAllowEntry) (any, error) {
		return e, h.NBDAllow(e)
	}))
	mux.HandleFunc("DELETE /v1/nbd/allow", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		reply(w, struct{}{}, h.NBDDisallow(q.Get("client"), q.Get("export")))
	})
}

// NBDAllowList lists the NBD allow-list.
func (c *Client) NBDAllowList(ctx context.Context) ([]NBDAllowEntry, error) {
	var out []NBDAllowEntry
	err := c.do(ctx, http.MethodGet, "/v1/nbd/allow", nil, &out)
	return out, err
}

// NBDAllow adds an NBD allow-list entry.
func (c *Client) NBDAllow(ctx context.Context, e NBDAllowEntry) error {
	return c.do(ctx, http.MethodPost, "/v1/nbd/allow", e, nil)
}

// NBDDisallow removes an NBD allow-list entry.
func (c *Client) NBDDisallow(ctx context.Context, client, export string) error {
	q := url.Values{"client": {client}, "export": {export}}
	return c.do(ctx, http.MethodDelete, "/v1/nbd/allow?"+q.Encode(), nil, nil)
}
