package apply

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// The doctor's probe tells an allowed primary so, refuses a stranger with
// 403 as every other endpoint does, reads a full chunk and no more, and
// leaves no trace in the state.
func TestPeerProbe(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("*.example.com", h.storage, "")
	a, stranger := h.client("a.example.com"), h.client("c.other.org")

	var info wire.PeerInfo
	if status, e := a.call("GET", wire.PeerPath, nil, &info); status != http.StatusOK {
		t.Fatalf("allowed primary: %d %+v", status, e)
	}
	if info != (wire.PeerInfo{Peer: "a.example.com", Pattern: "*.example.com"}) {
		t.Fatalf("probe answer %+v", info)
	}
	status, body := a.do("POST", wire.PeerPath, bytes.Repeat([]byte{7}, wire.MaxChunk), nil)
	if _, e := a.decode(status, body, &info); status != http.StatusOK || info.Received != wire.MaxChunk {
		t.Fatalf("a full chunk: %d %+v %+v", status, e, info)
	}
	status, body = a.do("POST", wire.PeerPath, make([]byte, wire.MaxChunk+1), nil)
	if _, e := a.decode(status, body, nil); status != http.StatusRequestEntityTooLarge {
		t.Fatalf("a chunk too large: %d %+v", status, e)
	}
	status, body = a.do("PUT", wire.PeerPath, nil, nil)
	if _, e := a.decode(status, body, nil); status != http.StatusMethodNotAllowed {
		t.Fatalf("PUT: %d %+v", status, e)
	}

	for _, method := range []string{"GET", "POST"} {
		status, body := stranger.do(method, wire.PeerPath, []byte("x"), nil)
		if _, e := stranger.decode(status, body, nil); status != http.StatusForbidden || e.Code != wire.CodeForbidden {
			t.Fatalf("stranger %s: %d %+v", method, status, e)
		}
	}
	if got := h.ev.get(&h.ev.rejected); len(got) != 2 {
		t.Fatalf("Rejected events %v, want the stranger's two", got)
	}

	// Without a verified certificate: 403, as everywhere.
	w := httptest.NewRecorder()
	h.server().Handler().ServeHTTP(w, httptest.NewRequest("GET", wire.PeerPath, nil))
	if w.Code != http.StatusForbidden {
		t.Fatalf("no certificate: %d %s", w.Code, w.Body)
	}

	entries, err := os.ReadDir(h.storage)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("the probe left %v in the storage directory", entries)
	}
	if b, _ := json.Marshal(h.server().AllowList()); !bytes.Contains(b, []byte(`"*.example.com"`)) || len(h.server().AllowList()) != 1 {
		t.Fatalf("allow-list changed: %s", b)
	}
}
