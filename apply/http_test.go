package apply

import (
	"bytes"
	"io"
	"net/http"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// TestRoutingEdges pins the answers to requests no endpoint takes, which
// ServeMux alone would give otherwise (its own 404 and 405, a redirect of
// a path that is not clean, HEAD served as GET): the allow-list, the VM
// name, the VM and the peer's rights are checked first, then an endpoint's
// path with another method is 405 and anything else 400, as they were
// before ServeMux routed the protocol.
func TestRoutingEdges(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("a.example.com", h.storage, "")
	h.client("a.example.com").enable("vm1", []wire.Disk{{Name: "d0", Size: 1 << 20}})
	a, stranger := h.client("a.example.com"), h.client("x.other.org")
	for _, tc := range []struct {
		c            *client
		method, path string
		status       int
		code         string
	}{
		{a, "GET", "/v1/replicas/vm1/sync", http.StatusMethodNotAllowed, wire.CodeBadReq},
		{a, "PUT", "/v1/replicas/vm1/uploads/c1/commit", http.StatusMethodNotAllowed, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1/uploads/c1", http.StatusMethodNotAllowed, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1/uploads/x1", http.StatusBadRequest, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1", http.StatusMethodNotAllowed, wire.CodeBadReq},
		{a, "HEAD", "/v1/replicas/vm1", http.StatusMethodNotAllowed, ""},
		{a, "GET", "/v1/replicas/vm1/failover", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/replicas/vm1/", http.StatusBadRequest, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1/sync/", http.StatusBadRequest, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1//sync", http.StatusBadRequest, wire.CodeBadReq},
		{a, "POST", "/v1/replicas/vm1/./sync", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/replicas/vm1/../vm1", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/%72eplicas/vm1", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/replicas/%76m1", http.StatusOK, ""},
		{a, "GET", "/v1/replicas/", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/replicas/a%2Fb/sync", http.StatusBadRequest, wire.CodeBadReq},
		{a, "GET", "/v1/replicas/nosuch/sync", http.StatusNotFound, wire.CodeUnknownVM},
		{a, "GET", "/", http.StatusBadRequest, wire.CodeBadReq},
		{stranger, "GET", "/v1/replicas/vm1/sync", http.StatusForbidden, wire.CodeForbidden},
		{stranger, "GET", "/v1/replicas/vm1/x", http.StatusForbidden, wire.CodeForbidden},
		{stranger, "GET", "/v1/replicas/vm1//x", http.StatusForbidden, wire.CodeForbidden},
		{stranger, "GET", "/v1/peer/", http.StatusBadRequest, wire.CodeBadReq},
	} {
		req, err := http.NewRequest(tc.method, tc.c.base+tc.path, bytes.NewReader([]byte("{")))
		if err != nil {
			t.Fatal(err)
		}
		req.URL.Opaque = "//" + req.URL.Host + tc.path // send the path as written
		resp, err := tc.c.hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var code string
		if resp.StatusCode/100 != 2 && tc.method != "HEAD" {
			_, e := tc.c.decode(resp.StatusCode, b, nil)
			code = e.Code
		}
		if resp.StatusCode != tc.status || code != tc.code {
			t.Errorf("%s %s %s: %d %q, want %d %q", tc.c.name, tc.method, tc.path, resp.StatusCode, code, tc.status, tc.code)
		}
		if resp.StatusCode == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != "GET, PUT, POST, DELETE" {
			t.Errorf("%s %s: Allow %q", tc.method, tc.path, resp.Header.Get("Allow"))
		}
	}
}
