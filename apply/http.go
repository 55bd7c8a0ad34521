package apply

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// maxJSONBody bounds the JSON body of a request.
const maxJSONBody = 1 << 20

// Handler serves the HTTP protocol of internal/wire. It must be served over
// TLS that verifies client certificates (pki's ServerConfig): the peer is
// the verified leaf of r.TLS; a request without one gets 403.
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// request is one request for a VM after authentication.
type request struct {
	w     http.ResponseWriter
	r     *http.Request
	peer  string
	entry AllowEntry
	vm    string
}

// newMux routes the endpoints of replica VMs (internal/wire/doc.go). Each
// handler checks the peer against the allow-list and the VM name, finds the
// VM and authorizes the peer for it (write: the request changes the VM)
// before it serves. What no endpoint takes goes to unrouted.
func (s *Server) newMux() *http.ServeMux {
	mux := http.NewServeMux()
	onVM := func(pattern string, write bool, serve func(*request, *vm)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			if q, ok := s.vmRequest(w, r, r.PathValue("vm")); ok {
				if v, ok := s.existing(q, write); ok {
					serve(q, v)
				}
			}
		})
	}
	onUpload := func(pattern string, write bool, serve func(*request, *vm, uploadID)) {
		onVM(pattern, write, func(q *request, v *vm) {
			u, err := parseUploadID(q.r.PathValue("id"))
			if err != nil {
				s.fail(q.w, q.r, q.vm, q.peer, err)
				return
			}
			serve(q, v, u)
		})
	}
	mux.HandleFunc("PUT /v1/replicas/{vm}", func(w http.ResponseWriter, r *http.Request) {
		if q, ok := s.vmRequest(w, r, r.PathValue("vm")); ok {
			serveJSON(s, q, func(en wire.Enable) (wire.Replica, error) {
				return s.enable(q.vm, q.peer, r.TLS.VerifiedChains[0][0], q.entry, en)
			})
		}
	})
	mux.HandleFunc("POST /v1/replicas/{vm}/failover", func(w http.ResponseWriter, r *http.Request) {
		q, ok := s.vmRequest(w, r, r.PathValue("vm"))
		if !ok {
			return
		}
		// Without the VM (v nil) it is a repeat: the daemon may have
		// finished it. A handover reaches a VM failed over by an earlier,
		// interrupted one; Promote checks it is that one.
		v, err := s.lookup(q.vm)
		if err == nil && !s.authorized(q, v, false) {
			return
		}
		serveJSON(s, q, func(h wire.Handover) (wire.Replica, error) { return s.handover(q.vm, q.peer, v, h) })
	})
	onVM("GET /v1/replicas/{vm}", false, func(q *request, v *vm) { s.answer(q, v.replica(), nil) })
	onVM("DELETE /v1/replicas/{vm}", true, func(q *request, v *vm) { s.noContent(q, s.RemoveReplica(q.vm)) })
	onUpload("GET /v1/replicas/{vm}/uploads/{id}", false, func(q *request, v *vm, u uploadID) {
		up, err := v.uploadOffset(u)
		s.answer(q, up, err)
	})
	onUpload("PUT /v1/replicas/{vm}/uploads/{id}", true, s.serveChunk)
	onUpload("DELETE /v1/replicas/{vm}/uploads/{id}", true, func(q *request, v *vm, u uploadID) { s.noContent(q, v.discard(u)) })
	onUpload("POST /v1/replicas/{vm}/uploads/{id}/commit", true, func(q *request, v *vm, u uploadID) {
		rep, err := v.commit(u)
		s.answer(q, rep, err)
	})
	onVM("POST /v1/replicas/{vm}/sync", true, func(q *request, v *vm) { serveJSON(s, q, v.syncStart) })
	onVM("POST /v1/replicas/{vm}/sync/finish", true, func(q *request, v *vm) { serveJSON(s, q, v.syncFinish) })
	onVM("POST /v1/replicas/{vm}/sums", false, s.serveSums) // reading sums changes nothing
	mux.HandleFunc("/", s.unrouted)
	return mux
}

// serve authenticates a request and routes it: the probe (for any method),
// then the endpoints of VMs. What ServeMux would take other than the
// protocol always did goes straight to unrouted: HEAD (a GET pattern would
// serve it), CONNECT, a path that does not start with ReplicasPath as sent
// (ServeMux also matches "/v1/%72eplicas/..."), and one that is not clean
// (ServeMux would redirect it).
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
	p := r.URL.EscapedPath()
	switch {
	case r.URL.Path == wire.PeerPath:
		s.probe(w, r, pki.PeerName(r.TLS))
	case r.Method == http.MethodHead, r.Method == http.MethodConnect, !strings.HasPrefix(p, wire.ReplicasPath), !cleanPath(p):
		s.unrouted(w, r)
	default:
		s.routes.ServeHTTP(w, r)
	}
}

// cleanPath says whether ServeMux takes p as it is: no empty, "." or ".."
// element (a trailing slash is kept).
func cleanPath(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// vmRequest checks the peer against the allow-list and the VM's name.
func (s *Server) vmRequest(w http.ResponseWriter, r *http.Request, name string) (*request, bool) {
	peer := pki.PeerName(r.TLS)
	entry, ok := s.entryFor(r.TLS.VerifiedChains[0][0])
	if !ok {
		s.reject(w, r, name, peer, fmt.Sprintf("primary %q is not on the allow-list", peer))
		return nil, false
	}
	if !wire.ValidName(name) {
		s.fail(w, r, "", peer, fmt.Errorf("%w: VM name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name))
		return nil, false
	}
	return &request{w: w, r: r, peer: peer, entry: entry, vm: name}, true
}

// existing finds the VM of q and authorizes its peer for it.
func (s *Server) existing(q *request, write bool) (*vm, bool) {
	v, err := s.lookup(q.vm)
	if err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return nil, false
	}
	return v, s.authorized(q, v, write)
}

// authorized says whether q's peer may use v (write: to change it), and
// answers the request when not.
func (s *Server) authorized(q *request, v *vm, write bool) bool {
	err := v.authorize(q.peer, q.entry, write)
	switch {
	case errors.Is(err, ErrForbidden):
		s.reject(q.w, q.r, q.vm, q.peer, err.Error())
	case err != nil:
		s.fail(q.w, q.r, q.vm, q.peer, err)
	}
	return err == nil
}

// unrouted answers a request no endpoint takes as the hand-written router
// before ServeMux did: 400 for a path outside ReplicasPath; for one under
// it, the checks of the VM (allow-list, name, lookup, authorization), then
// 405 for an endpoint's path with a method it does not take and 400 for
// any other path.
func (s *Server) unrouted(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), wire.ReplicasPath)
	if !ok || rest == "" {
		s.fail(w, r, "", pki.PeerName(r.TLS), noEndpoint(r))
		return
	}
	elems := strings.Split(rest, "/")
	for i, e := range elems {
		elems[i], _ = url.PathUnescape(e) // EscapedPath is well-formed
	}
	q, ok := s.vmRequest(w, r, elems[0])
	if !ok {
		return
	}
	p := elems[1:]
	if _, ok := s.existing(q, r.Method != http.MethodGet && !slices.Equal(p, []string{"sums"})); !ok {
		return
	}
	switch {
	case len(p) == 2 && p[0] == "uploads", len(p) == 3 && p[0] == "uploads" && p[2] == "commit":
		if _, err := parseUploadID(p[1]); err != nil {
			s.fail(w, r, q.vm, q.peer, err)
			return
		}
		s.badMethod(q)
	case len(p) == 0, len(p) == 1 && (p[0] == "sync" || p[0] == "sums"), len(p) == 2 && p[0] == "sync" && p[1] == "finish":
		s.badMethod(q)
	default:
		s.fail(w, r, q.vm, q.peer, noEndpoint(r))
	}
}

func noEndpoint(r *http.Request) error {
	return fmt.Errorf("%w: no endpoint %s %s", ErrInvalid, r.Method, r.URL.Path)
}

// serveChunk serves PUT /v1/replicas/{vm}/uploads/{id}?offset=N, one chunk.
func (s *Server) serveChunk(q *request, v *vm, u uploadID) {
	r := q.r
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
}

// serveSums serves POST /v1/replicas/{vm}/sums: binary, not JSON.
func (s *Server) serveSums(q *request, v *vm) {
	var req wire.SumsRequest
	if err := readJSON(q.r, &req); err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	b, at, err := v.sums(req)
	if err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	if at != 0 {
		q.w.Header().Set(wire.SumsCycleHeader, strconv.FormatUint(at, 10))
	}
	if req.Kind != "" {
		q.w.Header().Set(wire.SumsKindHeader, req.Kind)
	}
	q.w.Header().Set("Content-Type", "application/octet-stream")
	q.w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	q.w.Write(b)
}

// serveJSON reads a JSON request, calls do with it and answers its result.
func serveJSON[In, Out any](s *Server, q *request, do func(In) (Out, error)) {
	var in In
	if err := readJSON(q.r, &in); err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	out, err := do(in)
	s.answer(q, out, err)
}

// noContent answers 204, or err.
func (s *Server) noContent(q *request, err error) {
	if err != nil {
		s.fail(q.w, q.r, q.vm, q.peer, err)
		return
	}
	q.w.WriteHeader(http.StatusNoContent)
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
	case errors.Is(err, ErrUnavailable):
		// 409, not 503: the primary should ask another way (BLAKE3
		// sums) at once, not retry with back-off.
		e.Code = wire.CodeUnavailable
		return http.StatusConflict, e
	case errors.Is(err, ErrBusy), errors.Is(err, ErrClosed):
		e.Code = wire.CodeBusy
		return http.StatusServiceUnavailable, e
	}
	e.Code = wire.CodeInternal
	return http.StatusInternalServerError, e
}
