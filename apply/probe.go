package apply

import (
	"fmt"
	"io"
	"net/http"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// probe serves wire.PeerPath for a peer with a verified certificate.
func (s *Server) probe(w http.ResponseWriter, r *http.Request, peer string) {
	entry, ok := s.entryFor(r.TLS.VerifiedChains[0][0])
	if !ok {
		s.reject(w, r, "", peer, fmt.Sprintf("primary %q is not on the allow-list", peer))
		return
	}
	info := wire.PeerInfo{Peer: peer, Pattern: entry.Primary}
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
		s.writeError(w, r, "", peer, http.StatusMethodNotAllowed, wire.Error{Code: wire.CodeBadReq, Message: fmt.Sprintf("method %s not allowed on %s", r.Method, wire.PeerPath)})
		return
	}
	writeJSON(w, http.StatusOK, info)
}
