package apply

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// maxJSONBody bounds the JSON body of a request.
const maxJSONBody = 1 << 20

const prefix = wire.ReplicasPath

// Handler serves the HTTP protocol of internal/wire. It must be served over
// TLS that verifies client certificates (pki's ServerConfig): the peer is
// the verified leaf of r.TLS; a request without one gets 403.
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// request is one request after authentication and routing.
type request struct {
	w     http.ResponseWriter
	r     *http.Request
	peer  string
	entry AllowEntry
	vm    string
	rest  []string // path elements after the VM
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	done, err := s.enter()
	if err != nil {
		s.fail(w, r, "", "", err)
		return
	}
	defer done()
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		s.reject(w, r, "", "", "no verified client certificate")
		return
	}
	peer := pki.PeerName(r.TLS)
	if r.URL.Path == wire.PeerPath {
		s.probe(w, r, peer)
		return
	}
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), prefix)
	if !ok || rest == "" {
		s.fail(w, r, "", peer, fmt.Errorf("%w: no endpoint %s %s", ErrInvalid, r.Method, r.URL.Path))
		return
	}
	elems := strings.Split(rest, "/")
	for i, e := range elems {
		u, err := url.PathUnescape(e)
		if err != nil {
			s.fail(w, r, "", peer, fmt.Errorf("%w: path %q: %v", ErrInvalid, r.URL.Path, err))
			return
		}
		elems[i] = u
	}
	entry, ok := s.entryFor(r.TLS.VerifiedChains[0][0])
	if !ok {
		s.reject(w, r, elems[0], peer, fmt.Sprintf("primary %q is not on the allow-list", peer))
		return
	}
	q := &request{w: w, r: r, peer: peer, entry: entry, vm: elems[0], rest: elems[1:]}
	if !wire.ValidName(q.vm) {
		s.fail(w, r, "", peer, fmt.Errorf("%w: VM name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, q.vm))
		return
	}
	if len(q.rest) == 0 && r.Method == http.MethodPut {
		var en wire.Enable
		if err := readJSON(r, &en); err != nil {
			s.fail(w, r, q.vm, peer, err)
			return
		}
		rep, err := s.enable(q.vm, peer, r.TLS.VerifiedChains[0][0], entry, en)
		s.answer(q, rep, err)
		return
	}
	handover := len(q.rest) == 1 && q.rest[0] == "failover" && r.Method == http.MethodPost
	v, err := s.lookup(q.vm)
	if err != nil && handover {
		s.serveHandover(q, nil) // a repeat: the daemon may have finished it
		return
	}
	if err != nil {
		s.fail(w, r, q.vm, peer, err)
		return
	}
	// A handover reaches a VM failed over by an earlier, interrupted one;
	// Promote checks it is that one.
	write := r.Method != http.MethodGet && !(len(q.rest) == 1 && q.rest[0] == "sums") && !handover
	if err := v.authorize(peer, entry, write); err != nil {
		if errors.Is(err, ErrForbidden) {
			s.reject(w, r, q.vm, peer, err.Error())
		} else {
			s.fail(w, r, q.vm, peer, err)
		}
		return
	}
	s.route(q, v)
}

// route dispatches a request for an existing VM.
func (s *Server) route(q *request, v *vm) {
	r := q.r
	switch p := q.rest; {
	case len(p) == 0:
		switch r.Method {
		case http.MethodGet:
			s.answer(q, v.replica(), nil)
		case http.MethodDelete:
			if err := s.RemoveReplica(q.vm); err != nil {
				s.fail(q.w, r, q.vm, q.peer, err)
				return
			}
			q.w.WriteHeader(http.StatusNoContent)
		default:
			s.badMethod(q)
		}
	case len(p) == 2 && p[0] == "uploads", len(p) == 3 && p[0] == "uploads" && p[2] == "commit":
		u, err := parseUploadID(p[1])
		if err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		s.upload(q, v, u, len(p) == 3)
	case len(p) == 1 && p[0] == "sync" && r.Method == http.MethodPost:
		var req wire.SyncStart
		if err := readJSON(r, &req); err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		st, err := v.syncStart(req)
		s.answer(q, st, err)
	case len(p) == 2 && p[0] == "sync" && p[1] == "finish" && r.Method == http.MethodPost:
		var req wire.SyncFinish
		if err := readJSON(r, &req); err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		rep, err := v.syncFinish(req)
		s.answer(q, rep, err)
	case len(p) == 1 && p[0] == "failover" && r.Method == http.MethodPost:
		s.serveHandover(q, v)
	case len(p) == 1 && p[0] == "sums" && r.Method == http.MethodPost:
		var req wire.SumsRequest
		if err := readJSON(r, &req); err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		b, err := v.sums(req)
		if err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		q.w.Header().Set("Content-Type", "application/octet-stream")
		q.w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		q.w.Write(b)
	case len(p) == 1 && (p[0] == "sync" || p[0] == "sums"), len(p) == 2 && p[0] == "sync" && p[1] == "finish":
		s.badMethod(q)
	default:
		s.fail(q.w, r, q.vm, q.peer, fmt.Errorf("%w: no endpoint %s %s", ErrInvalid, r.Method, r.URL.Path))
	}
}

// serveHandover serves POST /v1/replicas/{vm}/failover.
func (s *Server) serveHandover(q *request, v *vm) {
	var h wire.Handover
	if err := readJSON(q.r, &h); err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	rep, err := s.handover(q.vm, q.peer, v, h)
	s.answer(q, rep, err)
}

// upload serves the requests of one upload.
func (s *Server) upload(q *request, v *vm, u uploadID, commit bool) {
	r := q.r
	switch {
	case commit && r.Method == http.MethodPost:
		rep, err := v.commit(u)
		s.answer(q, rep, err)
	case commit:
		s.badMethod(q)
	case r.Method == http.MethodGet:
		up, err := v.uploadOffset(u)
		s.answer(q, up, err)
	case r.Method == http.MethodDelete:
		if err := v.discard(u); err != nil {
			s.fail(q.w, r, q.vm, q.peer, err)
			return
		}
		q.w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPut:
		off, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		if err != nil || off < 0 {
			s.fail(q.w, r, q.vm, q.peer, fmt.Errorf("%w: chunk needs ?offset=N", ErrInvalid))
			return
		}
		h := r.Header.Get(wire.ChunkCRCHeader)
		crc, err := strconv.ParseUint(h, 16, 32)
		if err != nil || len(h) != 8 {
			s.fail(q.w, r, q.vm, q.peer, fmt.Errorf("%w: chunk needs header %s: 8 hex digits of its CRC32C", ErrInvalid, wire.ChunkCRCHeader))
			return
		}
		if r.ContentLength > wire.MaxChunk {
			s.fail(q.w, r, q.vm, q.peer, fmt.Errorf("%w: chunk of %d bytes; at most %d", ErrTooLarge, r.ContentLength, wire.MaxChunk))
			return
		}
		up, err := v.putChunk(u, off, uint32(crc), r.Body)
		s.answer(q, up, err)
	default:
		s.badMethod(q)
	}
}

func readJSON(r *http.Request, v any) error {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxJSONBody+1))
	if err != nil {
		return fmt.Errorf("%w: read body: %v", ErrInvalid, err)
	}
	if len(b) > maxJSONBody {
		return fmt.Errorf("%w: body larger than %d bytes", ErrTooLarge, maxJSONBody)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: body: %v", ErrInvalid, err)
	}
	return nil
}

// answer writes a JSON result, or err.
func (s *Server) answer(q *request, v any, err error) {
	if err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	writeJSON(q.w, http.StatusOK, v)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

func (s *Server) badMethod(q *request) {
	q.w.Header().Set("Allow", "GET, PUT, POST, DELETE")
	s.writeError(q.w, q.r, q.vm, q.peer, http.StatusMethodNotAllowed, wire.Error{Code: wire.CodeBadReq, Message: fmt.Sprintf("method %s not allowed on %s", q.r.Method, q.r.URL.Path)})
}

// reject answers 403.
func (s *Server) reject(w http.ResponseWriter, r *http.Request, vm, peer, reason string) {
	if f := s.ev.Rejected; f != nil {
		f(vm, peer, reason)
	}
	s.writeError(w, r, vm, peer, http.StatusForbidden, wire.Error{Code: wire.CodeForbidden, Message: reason})
}

// fail answers an error with the status and wire code it maps to.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, vm, peer string, err error) {
	status, body := errorAnswer(err)
	if status == http.StatusForbidden {
		s.reject(w, r, vm, peer, body.Message)
		return
	}
	s.writeError(w, r, vm, peer, status, body)
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, vm, peer string, status int, body wire.Error) {
	level := slog.LevelDebug
	switch {
	case status >= 500:
		level = slog.LevelError
	case status == http.StatusForbidden || body.Code == wire.CodeCorrupt || body.Code == wire.CodeMismatch:
		level = slog.LevelWarn
	}
	s.log.Log(r.Context(), level, "request failed", "vm", vm, "peer", peer, "method", r.Method, "path", r.URL.Path, "status", status, "code", body.Code, "err", body.Message)
	writeJSON(w, status, body)
}

// isFull reports whether err is the filesystem running out of space.
func isFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// errorAnswer maps an error to its HTTP status and wire error.
func errorAnswer(err error) (int, wire.Error) {
	var gap *GapError
	var off *OffsetError
	e := wire.Error{Message: err.Error()}
	switch {
	case isFull(err):
		e.Code, e.Message = wire.CodeFull, "replica storage full: no space left in the storage directory of the VM: "+err.Error()
		return http.StatusInsufficientStorage, e
	case errors.As(err, &gap):
		e.Code, e.Applied = wire.CodeGap, gap.Applied
		return http.StatusConflict, e
	case errors.As(err, &off):
		e.Code, e.Offset = wire.CodeOffset, off.Offset
		return http.StatusConflict, e
	case errors.Is(err, ErrForbidden):
		e.Code = wire.CodeForbidden
		return http.StatusForbidden, e
	case errors.Is(err, ErrFailedOver):
		e.Code = wire.CodeFailedOver
		return http.StatusConflict, e
	case errors.Is(err, ErrExists):
		e.Code = wire.CodeMismatch
		return http.StatusConflict, e
	case errors.Is(err, ErrUnknownVM):
		e.Code = wire.CodeUnknownVM
		return http.StatusNotFound, e
	case errors.Is(err, ErrTooLarge):
		e.Code = wire.CodeBadReq
		return http.StatusRequestEntityTooLarge, e
	case errors.Is(err, ErrChunkCRC):
		e.Code = wire.CodeCorrupt
		return http.StatusBadRequest, e
	case errors.Is(err, ErrCorrupt):
		e.Code = wire.CodeCorrupt
		return http.StatusUnprocessableEntity, e
	case errors.Is(err, ErrMismatch):
		e.Code = wire.CodeMismatch
		return http.StatusConflict, e
	case errors.Is(err, ErrInvalid):
		e.Code = wire.CodeBadReq
		return http.StatusBadRequest, e
	case errors.Is(err, ErrBusy), errors.Is(err, ErrClosed):
		e.Code = wire.CodeBusy
		return http.StatusServiceUnavailable, e
	}
	e.Code = wire.CodeInternal
	return http.StatusInternalServerError, e
}
