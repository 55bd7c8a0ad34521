package apply

import (
	"fmt"
	"io"
	"net/http"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// PeerPath is the replica's probe for `vdrepl doctor`, outside the wire
// protocol of VMs and changing nothing:
//
//	GET  /v1/peer   -> PeerInfo: the caller is on the allow-list; 403 (wire
//	                   code "forbidden") if it is not
//	POST /v1/peer   the same, after reading and discarding a body of at most
//	                wire.MaxChunk bytes (Received says how many arrived), so
//	                that a primary can see whether a proxy on the way lets a
//	                full upload chunk through
//
// Like every request it needs a verified client certificate.
const PeerPath = "/v1/peer"

// PeerInfo is the answer of the probe.
type PeerInfo struct {
	Peer     string `json:"peer"`    // the caller's certificate name
	Pattern  string `json:"pattern"` // the allow-list entry that matched it
	Received int64  `json:"received"`
}

// probe serves PeerPath for a peer with a verified certificate.
func (s *Server) probe(w http.ResponseWriter, r *http.Request, peer string) {
	entry, ok := s.entryFor(r.TLS.VerifiedChains[0][0])
	if !ok {
		s.reject(w, r, "", peer, fmt.Sprintf("primary %q is not on the allow-list", peer))
		return
	}
	info := PeerInfo{Peer: peer, Pattern: entry.Primary}
	switch r.Method {
	case http.MethodGet:
	case http.MethodPost:
		if r.ContentLength > wire.MaxChunk {
			s.fail(w, r, "", peer, fmt.Errorf("%w: probe body of %d bytes; at most %d", ErrTooLarge, r.ContentLength, wire.MaxChunk))
			return
		}
		n, err := io.Copy(io.Discard, io.LimitReader(r.Body, wire.MaxChunk+1))
		if err != nil {
			s.fail(w, r, "", peer, fmt.Errorf("%w: probe body after %d bytes: %v", ErrInvalid, n, err))
			return
		}
		if n > wire.MaxChunk {
			s.fail(w, r, "", peer, fmt.Errorf("%w: probe body over %d bytes", ErrTooLarge, wire.MaxChunk))
			return
		}
		info.Received = n
	default:
		w.Header().Set("Allow", "GET, POST")
		s.writeError(w, r, "", peer, http.StatusMethodNotAllowed, wire.Error{Code: wire.CodeBadReq, Message: fmt.Sprintf("method %s not allowed on %s", r.Method, PeerPath)})
		return
	}
	writeJSON(w, http.StatusOK, info)
}
