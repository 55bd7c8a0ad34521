// The NBD export: NBDServer speaks the NBD protocol (fixed newstyle
// handshake, simple replies, and structured replies for clients that ask)
// over any net.Listener and turns each request into one call on the export's
// Disk. The wire format is drawn in nbdproto.go; the negotiation, one method
// per option, is in nbd_handshake.go.
//
// Holes. A client that negotiates structured replies gets sparse reads:
// the parts of a READ that the Disk's map (Mapper) says read as zeroes are
// sent as OFFSET_HOLE chunks, without reading them from the Disk. With the
// base:allocation context selected as well, BLOCK_STATUS answers that map
// (NBD_STATE_HOLE, NBD_STATE_ZERO), so nbdinfo --map, nbdcopy and qemu-img
// skip holes. A Disk without a map is all data; block status then reports
// one data extent, which is true if not useful.
//
// Concurrency: NBDServer's methods are safe for concurrent use; Serve may run
// on several listeners at once (a unix socket and a TCP port). Each accepted
// connection gets one goroutine that runs the handshake and then reads
// requests. That reader decodes a request, reads a WRITE payload in full into
// a pooled buffer, and starts one worker goroutine for it; at most
// NBDConfig.MaxInFlight requests (and about max(64 MiB, MaxRequest) bytes of
// payload) are in flight per connection, beyond which the reader stops
// reading: that is the back-pressure. Workers call the Disk concurrently and
// reply as they finish, so replies go out of order. Replies are serialised by
// a per-connection write mutex into a buffer that is flushed when no other
// reply is waiting (large READ payloads go out with writev).
//
// Lock order: NBDServer.mu before nbdConn.mu; nbdConn.wmu before nbdConn.mu.
// The in-flight counter's mutex is a leaf.
//
// Shutdown: Close, a cancelled Serve context and CloseExport stop a
// connection's reader, let in-flight requests finish and reply (writes get a
// grace period, after which a client that does not read is cut off), then close
// the socket. Close and CloseExport wait for this, so no Disk call happens after
// they return.
//
// Errors: a request the server can answer gets an NBD error and the connection
// goes on (a rejected WRITE's payload is read and dropped). Two things end a
// connection: a request without the request magic (the stream is out of step)
// and a WRITE declaring more than MaxRequest bytes (its payload is not read,
// so the stream cannot be resynchronised; it is answered with EOVERFLOW
// first). A Disk that panics takes the process down: a storage fault is not
// papered over.
//
// TLS: a listener served with ServeTLS speaks NBD over TLS only, as the
// spec's FORCEDTLS mode: before NBD_OPT_STARTTLS the client may only ask
// for TLS or abort; every other option is refused with
// NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which has no error
// reply) ends the connection. NBDConfig.TLS decides the handshake (the
// daemon's is TLS 1.3 with a verified client certificate), and
// NBDConfig.Authorize what each client certificate may open: an export it
// may not open is left out of NBD_OPT_LIST and refused with
// NBD_REP_ERR_POLICY, whether it exists or not, so a client learns nothing
// of exports it cannot use. Listeners served with Serve (a unix socket,
// whose file permissions are its access control) never offer TLS and
// allow every export.
//
// Not offered: NBD_CMD_CACHE, resize, and FAST_ZERO (a journaled zero syncs the journal,
// so a small one is no faster than a write, and the front end cannot tell
// which kind a request is).
package blockdev

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// NBD server defaults.
const (
	DefaultNBDMaxRequest       = 32 << 20
	DefaultNBDMaxInFlight      = 64
	DefaultNBDHandshakeTimeout = 30 * time.Second
	// nbdShutdownGrace is how long replies may take to drain at shutdown.
	nbdShutdownGrace = 5 * time.Second
	// nbdMinInflightBytes bounds payload memory per connection (one request
	// larger than this is still admitted when nothing else is in flight).
	nbdMinInflightBytes = 64 << 20
	// Replies are buffered up to nbdFlushAt bytes; READ payloads up to
	// nbdInlinePayload are copied into that buffer, larger ones are written
	// with writev straight from their own buffer.
	nbdFlushAt       = 64 << 10
	nbdInlinePayload = 16 << 10
	nbdReadBuffer    = 128 << 10
	// nbdTLSReadBuffer is what the TLS layer reads the socket into.
	nbdTLSReadBuffer = 256 << 10
	// nbdMaxOptionData bounds the option data the server reads into memory;
	// longer options are skipped and refused. It takes an INFO/GO naming
	// the longest export with a thousand info types, or a meta context
	// option with the longest name and two of the longest queries.
	nbdMaxOptionData = 4 + nbdMaxStringLength + 4 + 2*(4+nbdMaxStringLength)
)

// NBDConfig configures an NBDServer.
type NBDConfig struct {
	// Exports is the live catalogue. Names are looked up at each handshake;
	// a connection keeps the Export it negotiated until it ends (use
	// CloseExport to end connections to an export being withdrawn).
	Exports Exports
	// Logger gets connection events and request failures; nil discards.
	Logger *slog.Logger
	// MaxRequest is the largest READ or WRITE payload, advertised as the
	// maximum block size. 0 means DefaultNBDMaxRequest; it is clamped to
	// [4 KiB, 1 GiB].
	MaxRequest uint32
	// MaxInFlight is the number of requests one connection may have in
	// flight; 0 means DefaultNBDMaxInFlight.
	MaxInFlight int
	// HandshakeTimeout bounds the handshake; 0 means
	// DefaultNBDHandshakeTimeout. The transmission phase has no timeout (an
	// idle guest is normal).
	HandshakeTimeout time.Duration
	// OnConnect is called when a client enters the transmission phase on an
	// export, and OnDisconnect when that connection has ended and all its
	// requests have finished. writable is false for read-only exports. They
	// are called from connection goroutines: they must not block for long
	// and must not call Close or CloseExport.
	OnConnect    func(export string, writable bool)
	OnDisconnect func(export string, writable bool)
	// TLS configures the server side of NBD_OPT_STARTTLS on ServeTLS
	// listeners. It should require and verify a client certificate: that
	// certificate is what Authorize is asked about.
	TLS *tls.Config
	// Authorize says what the client with the verified certificate client
	// (nil if the TLS config did not ask for one) may do with the export
	// named export, on a TLS connection; it is asked at each option that
	// names or lists exports, and again by Reauthorize. It is called from
	// connection goroutines and must not block for long. nil allows every
	// export read-write.
	Authorize func(client *x509.Certificate, export string) NBDAccess
}

// NBDAccess is what a client may do with an export.
type NBDAccess int

// NBD access levels. The zero value denies.
const (
	NBDDeny NBDAccess = iota
	NBDReadOnly
	NBDReadWrite
)

// ErrNBDNoTLS is ServeTLS on a server without NBDConfig.TLS.
var ErrNBDNoTLS = errors.New("blockdev: NBD over TLS needs a TLS configuration")

// NBDClient describes one connection in the transmission phase.
type NBDClient struct {
	Export string
	// Remote is the client's address ("tcp:10.0.0.5:51234"), or for a unix
	// socket the client's process ("unix:pid=1234").
	Remote   string
	Writable bool
	// Client is the name (common name) of the client's certificate on a
	// TLS connection, else "".
	Client string
}

// NBDServer serves the exports of a catalogue over NBD. Create it with
// NewNBDServer, run Serve on one or more listeners, stop it with Close.
type NBDServer struct {
	cfg NBDConfig
	log *slog.Logger

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*nbdConn]struct{}
	wg        sync.WaitGroup // Serve calls and connection goroutines
}

// NewNBDServer returns a server for cfg. It does not listen; call Serve.
func NewNBDServer(cfg NBDConfig) *NBDServer {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case cfg.MaxRequest == 0:
		cfg.MaxRequest = DefaultNBDMaxRequest
	case cfg.MaxRequest < nbdPreferredBlock:
		cfg.MaxRequest = nbdPreferredBlock
	case cfg.MaxRequest > 1<<30:
		cfg.MaxRequest = 1 << 30
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultNBDMaxInFlight
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultNBDHandshakeTimeout
	}
	return &NBDServer{
		cfg:       cfg,
		log:       cfg.Logger,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*nbdConn]struct{}),
	}
}

// Serve accepts connections on l until ctx is done, Close is called or Accept
// fails. Before returning it closes l, ends the connections it accepted
// (letting their in-flight requests finish) and waits for them. It returns
// nil when stopped by ctx or Close (also when Close came first), and the
// Accept error otherwise.
func (s *NBDServer) Serve(ctx context.Context, l net.Listener) error {
	return s.serve(ctx, l, false)
}

// ServeTLS is Serve for a listener where NBD is spoken over TLS only
// (FORCEDTLS; see the package comment), with NBDConfig.TLS and
// NBDConfig.Authorize. Without NBDConfig.TLS it closes l and returns
// ErrNBDNoTLS.
func (s *NBDServer) ServeTLS(ctx context.Context, l net.Listener) error {
	if s.cfg.TLS == nil {
		l.Close()
		return ErrNBDNoTLS
	}
	return s.serve(ctx, l, true)
}

func (s *NBDServer) serve(ctx context.Context, l net.Listener, withTLS bool) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	stop := make(chan struct{})
	var stopOnce sync.Once
	stopServe := func() { stopOnce.Do(func() { close(stop); l.Close() }) }
	unwatch := context.AfterFunc(ctx, stopServe)
	defer unwatch()

	err := s.acceptLoop(l, stop, withTLS)
	stopServe()

	s.mu.Lock()
	delete(s.listeners, l)
	var mine []*nbdConn
	for c := range s.conns {
		if c.listener == l {
			mine = append(mine, c)
		}
	}
	for _, c := range mine {
		c.shutdown()
	}
	closed := s.closed
	s.mu.Unlock()
	for _, c := range mine {
		<-c.done
	}
	if closed || ctx.Err() != nil {
		return nil
	}
	return err
}

func (s *NBDServer) acceptLoop(l net.Listener, stop <-chan struct{}, withTLS bool) error {
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			select {
			case <-stop:
				return nil
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				s.mu.Lock()
				closed := s.closed
				s.mu.Unlock()
				if closed {
					return nil
				}
				return err
			}
			if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) &&
				!errors.Is(err, syscall.ECONNABORTED) && !errors.Is(err, syscall.ENOBUFS) {
				return err
			}
			// Out of descriptors or a connection aborted before accept:
			// wait a little and keep serving, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("NBD accept failed; retrying", "err", err, "backoff", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-stop:
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		backoff = 0
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		c := s.newConn(nc, l)
		c.tlsRequired = withTLS
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
		}()
	}
}

// Close stops every Serve, ends every connection (in-flight requests finish
// and are replied to first) and waits for all of the server's goroutines. It
// is idempotent and always returns nil.
func (s *NBDServer) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for l := range s.listeners {
			l.Close()
		}
		for c := range s.conns {
			c.shutdown()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// CloseExport ends every connection that uses (or is entering transmission
// on) the named export, letting in-flight requests finish, and waits for them.
// Remove the export from the catalogue first, so no new client can open it;
// then no Disk call for it happens after CloseExport returns. It returns the
// number of connections ended.
func (s *NBDServer) CloseExport(name string) int {
	s.mu.Lock()
	var victims []*nbdConn
	for c := range s.conns {
		if c.exportSet && c.exportName == name {
			victims = append(victims, c)
			c.shutdown()
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		<-c.done
	}
	return len(victims)
}

// Clients lists the connections in the transmission phase.
func (s *NBDServer) Clients() []NBDClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []NBDClient
	for c := range s.conns {
		if c.transmitting {
			out = append(out, NBDClient{Export: c.exportName, Remote: c.remote, Writable: !c.exp.ReadOnly, Client: c.peerName()})
		}
	}
	return out
}

// Reauthorize asks NBDConfig.Authorize again about every TLS connection in
// the transmission phase and ends (as CloseExport does) those whose client
// may no longer open its export, or only read-only while the connection
// may write. Call it after the rules behind Authorize changed. It returns
// the number of connections ended.
func (s *NBDServer) Reauthorize() int {
	if s.cfg.Authorize == nil {
		return 0
	}
	s.mu.Lock()
	var check []*nbdConn
	for c := range s.conns {
		if c.transmitting && c.tlsOn {
			check = append(check, c)
		}
	}
	s.mu.Unlock()
	var victims []*nbdConn
	for _, c := range check {
		acc := s.cfg.Authorize(c.peer, c.exp.Name)
		if acc == NBDDeny || acc == NBDReadOnly && !c.exp.ReadOnly {
			c.log.Info("NBD client no longer allowed on its export; disconnecting", "access", acc)
			c.shutdown()
			victims = append(victims, c)
		}
	}
	for _, c := range victims {
		<-c.done
	}
	return len(victims)
}

// nbdConn is one client connection.
type nbdConn struct {
	s  *NBDServer
	nc net.Conn // the socket: deadlines are set on it
	// conn carries the protocol: nc, or after NBD_OPT_STARTTLS the TLS
	// connection over it. Only the handshake replaces it, under mu.
	conn     net.Conn
	listener net.Listener
	remote   string
	log      *slog.Logger
	br       *bufio.Reader
	done     chan struct{} // closed when serve returns

	// Guarded by s.mu.
	exportSet    bool   // a GO/EXPORT_NAME is under way or done
	exportName   string // its (resolved) name
	transmitting bool

	// TLS: tlsRequired is set at accept (a ServeTLS listener); tlsOn and
	// peer (the verified client certificate) by NBD_OPT_STARTTLS, then
	// read-only.
	tlsRequired, tlsOn bool
	peer               *x509.Certificate

	exp    Export // set before transmission, then read-only
	limits exportLimits
	// What the handshake negotiated (set by it, then read-only): see
	// exportLimits.
	structured, blockStatus bool

	mu      sync.Mutex // guards closing and the deadlines
	closing bool

	// Reply writing.
	wmu    sync.Mutex
	wbuf   []byte
	werr   error
	queued atomic.Int32 // replies waiting for wmu or being written

	inflight nbdInflight
}

func (s *NBDServer) newConn(nc net.Conn, l net.Listener) *nbdConn {
	c := &nbdConn{
		s:        s,
		nc:       nc,
		conn:     nc,
		listener: l,
		remote:   peerName(nc),
		br:       bufio.NewReaderSize(nc, nbdReadBuffer),
		done:     make(chan struct{}),
		wbuf:     make([]byte, 0, nbdFlushAt+nbdInlinePayload+nbdReplySize),
	}
	c.log = s.log.With("remote", c.remote)
	c.inflight.init(s.cfg.MaxInFlight, max(nbdMinInflightBytes, int64(s.cfg.MaxRequest)))
	return c
}

// peerName names the client for logs: its address, or for a unix socket
// (whose client address is empty) the peer's process id.
func peerName(nc net.Conn) string {
	if uc, ok := nc.(*net.UnixConn); ok {
		if rc, err := uc.SyscallConn(); err == nil {
			var cred *unix.Ucred
			rc.Control(func(fd uintptr) {
				cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
			})
			if cred != nil {
				return fmt.Sprintf("unix:pid=%d", cred.Pid)
			}
		}
	}
	if a := nc.RemoteAddr(); a != nil {
		return a.Network() + ":" + a.String()
	}
	return "?"
}

// shutdown makes the reader stop at its next read and gives replies a grace
// period. Safe to call more than once and from any goroutine.
func (c *nbdConn) shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	c.closing = true
	c.nc.SetReadDeadline(time.Now())
	c.nc.SetWriteDeadline(time.Now().Add(nbdShutdownGrace))
}

// abort stops the connection at once: the peer is gone or out of step.
func (c *nbdConn) abort() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closing = true
	c.nc.SetDeadline(time.Now())
}

// setDeadline sets the read and write deadline unless shutdown has already
// set its own.
func (c *nbdConn) setDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closing {
		c.nc.SetDeadline(t)
	}
}

func (c *nbdConn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// serve runs the connection to its end.
func (c *nbdConn) serve() {
	s := c.s
	defer func() {
		c.mu.Lock()
		conn := c.conn
		c.mu.Unlock()
		conn.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		close(c.done)
	}()
	c.log.Debug("NBD client connected")
	exp, err := c.handshake()
	if err != nil {
		switch {
		case errors.Is(err, errNBDAbort):
			c.log.Debug("NBD client ended the handshake")
		case c.isClosing() || errors.Is(err, io.EOF):
			c.log.Debug("NBD handshake ended", "err", err)
		default:
			c.log.Info("NBD handshake failed", "err", err)
		}
		return
	}
	c.exp = exp
	c.limits = exportLimits{size: exp.Disk.Size(), readOnly: exp.ReadOnly, maxRequest: s.cfg.MaxRequest,
		structured: c.structured, blockStatus: c.blockStatus}
	c.log = c.log.With("export", exp.Name)
	c.setDeadline(time.Time{})
	s.mu.Lock()
	c.transmitting = true
	s.mu.Unlock()
	c.log.Info("NBD client attached", "read_only", exp.ReadOnly, "size", c.limits.size,
		"structured", c.structured, "block_status", c.blockStatus, "tls", c.tlsOn)
	if f := s.cfg.OnConnect; f != nil {
		f(exp.Name, !exp.ReadOnly)
	}

	c.transmit()

	c.inflight.waitIdle()
	c.wmu.Lock()
	c.flushLocked()
	c.wmu.Unlock()
	s.mu.Lock()
	c.transmitting = false
	s.mu.Unlock()
	c.log.Info("NBD client detached")
	if f := s.cfg.OnDisconnect; f != nil {
		f(exp.Name, !exp.ReadOnly)
	}
}

// list returns the catalogue (empty if there is none).
func (s *NBDServer) list() []Export {
	if s.cfg.Exports == nil {
		return nil
	}
	return s.cfg.Exports.List()
}

// lookup finds an export by name; the default name "" means the only export
// when there is exactly one.
func (s *NBDServer) lookup(name string) (Export, bool) {
	if s.cfg.Exports == nil {
		return Export{}, false
	}
	if e, ok := s.cfg.Exports.Lookup(name); ok || name != "" {
		return e, ok
	}
	if l := s.cfg.Exports.List(); len(l) == 1 {
		return s.cfg.Exports.Lookup(l[0].Name)
	}
	return Export{}, false
}

// attach looks an export up for entering transmission. The connection is
// marked with the name before the lookup, so a CloseExport that runs after
// the export has left the catalogue either finds this connection or this
// lookup fails: a connection never starts serving a withdrawn export.
func (c *nbdConn) attach(name string) (Export, bool) {
	if name == "" {
		e, ok := c.s.lookup("")
		if !ok {
			return Export{}, false
		}
		name = e.Name
	}
	c.s.mu.Lock()
	c.exportSet, c.exportName = true, name
	c.s.mu.Unlock()
	e, ok := c.s.lookup(name)
	if !ok || e.Disk == nil {
		c.s.mu.Lock()
		c.exportSet, c.exportName = false, ""
		c.s.mu.Unlock()
		return Export{}, false
	}
	return e, true
}

// transmit reads and dispatches requests until the client disconnects, the
// stream breaks or the connection is shut down. It does not wait for the
// requests it started.
func (c *nbdConn) transmit() {
	var hdr [nbdRequestSize]byte
	for {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if !c.isClosing() && !errors.Is(err, io.EOF) {
				c.log.Warn("NBD read failed", "err", err)
			}
			return
		}
		r, err := decodeRequest(hdr[:])
		if err != nil {
			c.log.Warn("NBD stream out of step; closing", "err", err)
			return
		}
		if r.Type == nbdCmdDisc {
			c.log.Debug("NBD client disconnecting")
			return
		}
		if errno := checkRequest(r, c.limits); errno != 0 {
			c.log.Debug("NBD bad request", "cmd", nbdCmdName(r.Type), "flags", r.CommandFlags,
				"offset", r.Offset, "length", r.Length, "error", nbdErrName(errno))
			if r.Type == nbdCmdWrite {
				if r.Length > c.limits.maxRequest {
					// Skipping an arbitrary payload could mean
					// reading gigabytes; the stream cannot be
					// trusted either. Reply, then hang up.
					c.log.Warn("NBD write payload too large; closing", "length", r.Length, "max", c.limits.maxRequest)
					c.replyError(r, errno, "request too large", -1)
					return
				}
				if _, err := c.br.Discard(int(r.Length)); err != nil {
					return
				}
			}
			c.replyError(r, errno, "bad request", -1)
			continue
		}
		var n int
		if r.Type == nbdCmdRead || r.Type == nbdCmdWrite {
			n = int(r.Length)
		}
		c.inflight.acquire(int64(n))
		// A write's payload goes into a buffer of ours, or, for a large
		// one on a Receiver disk, into the disk's own.
		var bp *[]byte
		var write func(off int64) error
		switch rcv, ok := c.exp.Disk.(Receiver); {
		case ok && r.Type == nbdCmdWrite && n >= rcv.ReceiveMin():
			write, err = rcv.ReceiveWrite(c.br, n)
		case n > 0:
			bp = getNBDBuf(n)
			if r.Type == nbdCmdWrite {
				_, err = io.ReadFull(c.br, *bp)
			}
		}
		if err != nil {
			putNBDBuf(bp)
			c.inflight.release(int64(n))
			if !c.isClosing() {
				c.log.Warn("NBD write payload cut short", "err", err)
			}
			return
		}
		go c.handle(r, bp, write)
	}
}

// handle runs one validated request on the Disk and replies. A write comes
// with its payload in bp, or received by the Disk (write, see Receiver).
func (c *nbdConn) handle(r request, bp *[]byte, write func(off int64) error) {
	var buf []byte
	if bp != nil {
		buf = *bp
	}
	var n int64 // what transmit acquired
	if r.Type == nbdCmdRead || r.Type == nbdCmdWrite {
		n = int64(r.Length)
	}
	defer c.inflight.release(n)
	defer putNBDBuf(bp)
	switch {
	case r.Type == nbdCmdRead && c.structured:
		c.structuredRead(r, buf)
		return
	case r.Type == nbdCmdBlockStatus:
		c.blockStatusReply(r)
		return
	}
	d := c.exp.Disk
	off := int64(r.Offset)
	var err error
	switch r.Type {
	case nbdCmdRead:
		var n int
		n, err = d.ReadAt(buf, off)
		if n == len(buf) && err == io.EOF {
			err = nil
		} else if err == nil && n < len(buf) {
			err = io.ErrUnexpectedEOF
		}
	case nbdCmdWrite:
		if write != nil {
			err = write(off)
		} else {
			_, err = d.WriteAt(buf, off)
		}
	case nbdCmdFlush:
		if !c.exp.ReadOnly {
			err = d.Flush()
		}
	case nbdCmdTrim:
		err = d.Trim(off, int64(r.Length))
	case nbdCmdWriteZeroes:
		err = d.Zero(off, int64(r.Length), r.CommandFlags&nbdCmdFlagNoHole == 0)
	}
	if err == nil && r.CommandFlags&nbdCmdFlagFUA != 0 && r.Type != nbdCmdRead && r.Type != nbdCmdFlush {
		err = d.Flush()
	}
	if err != nil {
		c.failed(r, err, -1)
		return
	}
	var payload []byte
	if r.Type == nbdCmdRead {
		payload = buf
	}
	c.reply(r.Handle, 0, payload)
}

// failed logs a request the Disk failed and answers it with the matching
// error, at off if that is not negative (see replyError). The client's
// message names the command only: the Disk's error may name files of the
// host, which are none of the client's business.
func (c *nbdConn) failed(r request, err error, off int64) {
	errno := nbdErrno(err)
	c.log.Error("NBD request failed", "cmd", nbdCmdName(r.Type), "offset", r.Offset,
		"length", r.Length, "error", nbdErrName(errno), "err", err)
	c.replyError(r, errno, nbdCmdName(r.Type)+" failed", off)
}

// structuredRead answers a READ with structured replies: holes (as the
// Disk's map has them) as OFFSET_HOLE chunks, which cost neither a read nor
// their bytes on the wire, and the rest as OFFSET_DATA chunks, read into buf
// at their place. With DF the whole range is one data chunk. Everything is
// read before anything is sent, so the last chunk can carry DONE and a
// failure is one ERROR_OFFSET chunk at the extent that failed.
func (c *nbdConn) structuredRead(r request, buf []byte) {
	off := int64(r.Offset)
	ext := []Extent{{Offset: off, Length: int64(len(buf))}}
	if r.CommandFlags&nbdCmdFlagDF == 0 {
		m, err := diskMap(c.exp.Disk, off, int64(len(buf)))
		if err != nil {
			// The map only saves work: read it all instead.
			c.log.Warn("NBD disk map failed; reading the range as data", "offset", off, "length", len(buf), "err", err)
		} else {
			ext = m
		}
	}
	if e := ext[len(ext)-1]; e.Offset+e.Length < off+int64(len(buf)) {
		// A map may stop short; the rest is read as data.
		ext = append(ext, Extent{Offset: e.Offset + e.Length, Length: off + int64(len(buf)) - e.Offset - e.Length})
	}
	for _, e := range ext {
		if e.Zero {
			continue
		}
		p := buf[e.Offset-off : e.Offset-off+e.Length]
		n, err := c.exp.Disk.ReadAt(p, e.Offset)
		if n == len(p) && err == io.EOF {
			err = nil
		} else if err == nil && n < len(p) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			c.failed(r, err, e.Offset)
			return
		}
	}
	chunks := make([]nbdChunk, 0, len(ext))
	for i, e := range ext {
		var flags uint16
		if i == len(ext)-1 {
			flags = nbdReplyFlagDone
		}
		if e.Zero {
			h := appendChunk(nil, flags, nbdReplyTypeOffsetHole, r.Handle, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(e.Offset))
			chunks = append(chunks, nbdChunk{hdr: binary.BigEndian.AppendUint32(h, uint32(e.Length))})
			continue
		}
		h := appendChunk(nil, flags, nbdReplyTypeOffsetData, r.Handle, 8+int(e.Length))
		chunks = append(chunks, nbdChunk{hdr: binary.BigEndian.AppendUint64(h, uint64(e.Offset)),
			payload: buf[e.Offset-off : e.Offset-off+e.Length]})
	}
	c.send(chunks...)
}

// blockStatusReply answers BLOCK_STATUS for base:allocation, the one
// context there is (checkRequest refused it without one): one chunk with
// the Disk's map of the range, or its first extent alone for REQ_ONE.
func (c *nbdConn) blockStatusReply(r request) {
	off := int64(r.Offset)
	ext, err := diskMap(c.exp.Disk, off, int64(r.Length))
	if err != nil {
		c.failed(r, err, off)
		return
	}
	if r.CommandFlags&nbdCmdFlagReqOne != 0 {
		ext = ext[:1]
	}
	ext = ext[:min(len(ext), nbdMaxExtents)]
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 4+8*len(ext)), nbdContextAllocationID)
	for _, e := range ext {
		var flags uint32
		if e.Hole {
			flags |= nbdStateHole
		}
		if e.Zero {
			flags |= nbdStateZero
		}
		p = binary.BigEndian.AppendUint32(p, uint32(e.Length))
		p = binary.BigEndian.AppendUint32(p, flags)
	}
	c.send(nbdChunk{hdr: appendChunk(nil, nbdReplyFlagDone, nbdReplyTypeBlockStat, r.Handle, len(p)), payload: p})
}

// replyError answers r with an error: without structured replies a simple
// reply, with them one final ERROR chunk carrying msg, or ERROR_OFFSET if
// off is not negative.
func (c *nbdConn) replyError(r request, errno uint32, msg string, off int64) {
	if !c.structured {
		c.reply(r.Handle, errno, nil)
		return
	}
	c.send(nbdChunk{hdr: appendErrorChunk(nil, r.Handle, errno, msg, off)})
}

// nbdErrno maps a Disk error to an NBD error value.
func nbdErrno(err error) uint32 {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return nbdENOSPC
	case errors.Is(err, ErrReadOnly), errors.Is(err, syscall.EROFS):
		return nbdEPERM
	case errors.Is(err, ErrOutOfRange):
		return nbdEINVAL
	}
	return nbdEIO
}

// nbdChunk is one piece of a reply: a header (a simple reply's, a chunk's
// with any fixed fields) and the data that follows it.
type nbdChunk struct {
	hdr, payload []byte
}

// reply sends a simple reply.
func (c *nbdConn) reply(handle uint64, errno uint32, payload []byte) {
	var hdr [nbdReplySize]byte
	c.send(nbdChunk{hdr: appendReply(hdr[:0], errno, handle), payload: payload})
}

// send writes the pieces of one reply, back to back. Replies from
// concurrent workers are batched: the buffer is flushed by whichever writer
// finds no other reply waiting. Small payloads are copied into the buffer,
// large ones go out with writev behind it.
func (c *nbdConn) send(chunks ...nbdChunk) {
	c.queued.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for _, ch := range chunks {
		if c.werr != nil {
			break
		}
		c.wbuf = append(c.wbuf, ch.hdr...)
		if len(ch.payload) <= nbdInlinePayload {
			c.wbuf = append(c.wbuf, ch.payload...)
		} else {
			bufs := net.Buffers{c.wbuf, ch.payload}
			_, err := bufs.WriteTo(c.conn)
			c.wbuf = c.wbuf[:0]
			c.writeFailed(err)
		}
		if len(c.wbuf) >= nbdFlushAt {
			c.flushLocked()
		}
	}
	if c.queued.Add(-1) == 0 {
		c.flushLocked()
	}
}

// flushLocked writes the reply buffer. c.wmu must be held.
func (c *nbdConn) flushLocked() {
	if len(c.wbuf) > 0 && c.werr == nil {
		_, err := c.conn.Write(c.wbuf)
		c.writeFailed(err)
	}
	c.wbuf = c.wbuf[:0]
}

// writeFailed records a reply write error; the connection is then useless.
// c.wmu must be held.
func (c *nbdConn) writeFailed(err error) {
	if err == nil || c.werr != nil {
		return
	}
	c.werr = err
	if !c.isClosing() || !errors.Is(err, os.ErrDeadlineExceeded) {
		c.log.Warn("NBD reply write failed; closing", "err", err)
	}
	c.abort()
}

// nbdInflight bounds the requests (and payload bytes) of one connection.
type nbdInflight struct {
	mu       sync.Mutex
	cond     sync.Cond
	n        int
	bytes    int64
	waiting  int // acquire calls blocked (0 or 1: only the reader acquires)
	maxN     int
	maxBytes int64
}

func (f *nbdInflight) init(maxN int, maxBytes int64) {
	f.cond.L = &f.mu
	f.maxN, f.maxBytes = maxN, maxBytes
}

// acquire waits for room for one request of size bytes. A request larger than
// the byte budget is admitted alone.
func (f *nbdInflight) acquire(size int64) {
	f.mu.Lock()
	for f.n >= f.maxN || (f.n > 0 && f.bytes+size > f.maxBytes) {
		f.waiting++
		f.cond.Wait()
		f.waiting--
	}
	f.n++
	f.bytes += size
	f.mu.Unlock()
}

func (f *nbdInflight) release(size int64) {
	f.mu.Lock()
	f.n--
	f.bytes -= size
	f.mu.Unlock()
	f.cond.Broadcast()
}

// waitIdle waits until no request is in flight.
func (f *nbdInflight) waitIdle() {
	f.mu.Lock()
	for f.n > 0 {
		f.cond.Wait()
	}
	f.mu.Unlock()
}

// Payload buffers are pooled by power-of-two size class, from 4 KiB up. The
// pools hold *[]byte so that Put does not allocate.
const nbdMinBufClass = 12

var nbdBufPools [31]sync.Pool // classes 2^12 .. 2^30 used

func nbdBufClass(n int) int {
	return max(nbdMinBufClass, bits.Len(uint(n-1)))
}

// getNBDBuf returns a pooled buffer whose slice has length n
// (1 <= n <= 1 GiB); give it back with putNBDBuf.
func getNBDBuf(n int) *[]byte {
	class := nbdBufClass(n)
	p, ok := nbdBufPools[class].Get().(*[]byte)
	if !ok {
		b := make([]byte, 1<<class)
		p = &b
	}
	*p = (*p)[:n]
	return p
}

func putNBDBuf(p *[]byte) {
	if p == nil {
		return
	}
	*p = (*p)[:cap(*p)]
	nbdBufPools[nbdBufClass(cap(*p))].Put(p)
}
