package ship

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// ReplicaError is a non-2xx answer of the replica (or of a proxy on the
// way). Wire holds the replica's JSON error; its Code is empty when the body
// was not one (a proxy's error page). errors.As finds the *wire.Error too.
type ReplicaError struct {
	Op     string // what was asked, e.g. "commit c12"
	Status int
	Wire   wire.Error
}

func (e *ReplicaError) Error() string {
	if e.Wire.Code == "" {
		return fmt.Sprintf("ship: %s: HTTP %d %s", e.Op, e.Status, http.StatusText(e.Status))
	}
	return fmt.Sprintf("ship: %s: HTTP %d: %s (%s)", e.Op, e.Status, e.Wire.Message, e.Wire.Code)
}

func (e *ReplicaError) Unwrap() error {
	if e.Wire.Code == "" {
		return nil
	}
	return &e.Wire
}

// code is the wire error code of err, "" if it is not a replica's answer.
func code(err error) string {
	var re *ReplicaError
	if errors.As(err, &re) {
		return re.Wire.Code
	}
	return ""
}

// Timeouts of one request. A commit answers only once the cycle is durable
// and applied on the replica, which for a cycle of gigabytes takes a while.
const (
	smallTimeout  = 2 * time.Minute
	chunkTimeout  = 10 * time.Minute
	commitTimeout = time.Hour
	maxAnswer     = 1 << 20 // bytes of a JSON answer we read at most
)

// client speaks the HTTP protocol of package wire to one replica for one VM.
type client struct {
	base string // https://host:port/v1/replicas/VM
	hc   *http.Client
	tr   *http.Transport
	// peer is the replica's certificate in the last answer.
	peer atomic.Pointer[x509.Certificate]
	// now is the clock of answered; answered is when the replica last
	// answered (a success or its JSON error, not a proxy's page), in
	// Unix nanoseconds, 0 if never.
	now      func() time.Time
	answered atomic.Int64
}

// lastAnswer is when the replica last answered; zero if it never did.
func (c *client) lastAnswer() time.Time {
	if n := c.answered.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// newClient builds the client's own transport: HTTP/1.1 (no
// ForceAttemptHTTP2) and net/http's default buffer sizes, both measured with
// bench/tlscost's BenchmarkReplicate. A chunk's body never passes through
// the transport's write buffer: with "Expect: 100-continue" the headers are
// flushed first, and the body is then copied straight to the connection
// (persistConnWriter.ReadFrom) in io.Copy's 32 KiB writes, each two full
// 16 KiB TLS records, so WriteBufferSize changes nothing for uploads.
// HTTP/2 over the same TLS cost more: 13% of plain HTTP's rate and 0.96
// CPU-s more per GiB, against 5-15% and 0.78 for HTTP/1.1 in the runs
// around it (its server copies every DATA frame into a stream buffer).
func newClient(replica, vm string, tlsConf *tls.Config, bypassProxy bool) *client {
	tr := &http.Transport{
		TLSClientConfig:       tlsConf.Clone(),
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   2,
		ExpectContinueTimeout: time.Second,
	}
	if !bypassProxy {
		tr.Proxy = http.ProxyFromEnvironment
	}
	u := url.URL{Scheme: "https", Host: replica, Path: wire.ReplicasPath + vm}
	return &client{base: u.String(), hc: &http.Client{Transport: tr}, tr: tr, now: time.Now}
}

// plainHTTP makes c speak http:// instead of https:// (Config.PlainHTTP,
// for bench/tlscost only): the same transport, without TLS.
func (c *client) plainHTTP() {
	u, _ := url.Parse(c.base)
	u.Scheme = "http"
	c.base = u.String()
}

func (c *client) close() { c.tr.CloseIdleConnections() }

// do sends one request and decodes a JSON answer into out (if not nil).
func (c *client) do(ctx context.Context, op, method, path string, body io.Reader, size int64, hdr http.Header, timeout time.Duration, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("ship: %s: %w", op, err)
	}
	if body != nil {
		req.ContentLength = size
		if size == 0 {
			req.Body = http.NoBody
		}
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("ship: %s: %w", op, err)
	}
	defer resp.Body.Close()
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		c.peer.Store(resp.TLS.PeerCertificates[0])
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return fmt.Errorf("ship: %s: read answer: %w", op, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		re := &ReplicaError{Op: op, Status: resp.StatusCode}
		if json.Unmarshal(b, &re.Wire) != nil {
			re.Wire = wire.Error{}
		}
		if re.Wire.Code != "" {
			c.answered.Store(c.now().UnixNano())
		}
		return re
	}
	c.answered.Store(c.now().UnixNano())
	if out == nil {
		return nil
	}
	if raw, ok := out.(*rawAnswer); ok {
		raw.body, raw.header = b, resp.Header
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%w: %s: answer: %v", ErrProtocol, op, err)
	}
	return nil
}

// rawAnswer is an answer that is not JSON, with its headers.
type rawAnswer struct {
	body   []byte
	header http.Header
}

func (c *client) jsonBody(v any) (io.Reader, int64, http.Header) {
	b, _ := json.Marshal(v)
	return bytes.NewReader(b), int64(len(b)), http.Header{"Content-Type": {"application/json"}}
}

func (c *client) get(ctx context.Context) (wire.Replica, error) {
	var r wire.Replica
	err := c.do(ctx, "get replica", http.MethodGet, "", nil, 0, nil, smallTimeout, &r)
	return r, err
}

func (c *client) enable(ctx context.Context, e wire.Enable) (wire.Replica, error) {
	var r wire.Replica
	body, n, h := c.jsonBody(e)
	err := c.do(ctx, "enable", http.MethodPut, "", body, n, h, smallTimeout, &r)
	return r, err
}

// offset is how much of upload id the replica has staged; an upload it
// does not know has none.
func (c *client) offset(ctx context.Context, id string) (int64, error) {
	var u wire.Upload
	err := c.do(ctx, "upload "+id, http.MethodGet, "/uploads/"+id, nil, 0, nil, smallTimeout, &u)
	var re *ReplicaError
	if errors.As(err, &re) && re.Status == http.StatusNotFound && re.Wire.Code != wire.CodeUnknownVM {
		return 0, nil
	}
	return u.Offset, err
}

// put sends one chunk at off, whose CRC32C is crc, and returns the offset
// staged after it.
func (c *client) put(ctx context.Context, id string, off int64, chunk []byte, crc uint32, body io.Reader) (int64, error) {
	h := http.Header{
		wire.ChunkCRCHeader: {fmt.Sprintf("%08x", crc)},
		// The replica reads the body only once the chunk can be staged
		// next (after the chunks before it were received, apply's
		// putChunk), and refuses it without the body otherwise; a server
		// that does not answer 100 gets the body after
		// ExpectContinueTimeout.
		"Expect":       {"100-continue"},
		"Content-Type": {"application/octet-stream"},
	}
	var u wire.Upload
	path := "/uploads/" + id + "?offset=" + strconv.FormatInt(off, 10)
	err := c.do(ctx, "upload "+id, http.MethodPut, path, body, int64(len(chunk)), h, chunkTimeout, &u)
	return u.Offset, err
}

func (c *client) commit(ctx context.Context, id string) (wire.Replica, error) {
	var r wire.Replica
	err := c.do(ctx, "commit "+id, http.MethodPost, "/uploads/"+id+"/commit", bytes.NewReader(nil), 0, nil, commitTimeout, &r)
	return r, err
}

func (c *client) discard(ctx context.Context, id string) error {
	err := c.do(ctx, "discard "+id, http.MethodDelete, "/uploads/"+id, nil, 0, nil, smallTimeout, nil)
	var re *ReplicaError
	if errors.As(err, &re) && re.Status == http.StatusNotFound && re.Wire.Code != wire.CodeUnknownVM {
		return nil
	}
	return err
}

func (c *client) syncStart(ctx context.Context, s wire.SyncStart) (wire.SyncState, error) {
	var st wire.SyncState
	body, n, h := c.jsonBody(s)
	err := c.do(ctx, "sync start", http.MethodPost, "/sync", body, n, h, smallTimeout, &st)
	return st, err
}

func (c *client) syncFinish(ctx context.Context, f wire.SyncFinish) (wire.Replica, error) {
	var r wire.Replica
	body, n, h := c.jsonBody(f)
	err := c.do(ctx, "sync finish", http.MethodPost, "/sync/finish", body, n, h, commitTimeout, &r)
	return r, err
}
