package blockdev

// The NBD handshake (fixed newstyle negotiation): the server's greeting,
// the client's flags, then option after option until one of them picks an
// export (NBD_OPT_EXPORT_NAME, NBD_OPT_GO) or ends the connection
// (NBD_OPT_ABORT, an error). Each option is answered by one method of
// nbdHandshake, called from nbdHandshake.option; a new option gets its own
// method and a case there.
//
// On a ServeTLS listener the options before NBD_OPT_STARTTLS go through
// beforeTLS instead, and once TLS is up every option that names an export
// asks visible first, so that the answer to an export the client may not
// open is the same whether it exists or not.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// errNBDAbort ends the handshake after NBD_OPT_ABORT.
var errNBDAbort = errors.New("blockdev: NBD client aborted the handshake")

// Handshake errors that close the connection.
var (
	errNBDBadOptionMagic = errors.New("blockdev: bad NBD option magic")
	errNBDClientFlags    = errors.New("blockdev: unknown NBD client flags")
	errNBDUnknownExport  = errors.New("blockdev: unknown NBD export")
	errNBDTLSRequired    = errors.New("blockdev: NBD client chose an export without TLS on a TLS-only listener")
	errNBDTLSEarlyData   = errors.New("blockdev: NBD client sent data before the TLS handshake")
	errNBDNotAllowed     = errors.New("blockdev: NBD client may not open the export")
)

// nbdHandshake is the state of one connection's negotiation.
type nbdHandshake struct {
	c *nbdConn
	// noZeroes: the client set NBD_FLAG_C_NO_ZEROES, so the reply to
	// NBD_OPT_EXPORT_NAME leaves out its 124 zero bytes.
	noZeroes bool
	// structured: NBD_OPT_STRUCTURED_REPLY was acknowledged.
	structured bool
	// metaExport is the export the last NBD_OPT_SET_META_CONTEXT selected
	// base:allocation for; "" if it selected nothing.
	metaExport string
	// out is the reply to the current option, built by its method and
	// written by option; its buffer is reused from option to option.
	out []byte
}

// handshake runs the fixed newstyle negotiation and returns the export the
// client chose with NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
func (c *nbdConn) handshake() (Export, error) {
	c.setDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	h := &nbdHandshake{c: c}
	if err := h.greet(); err != nil {
		return Export{}, err
	}
	for {
		opt, data, ok, err := h.readOption()
		if err != nil {
			return Export{}, err
		}
		if !ok {
			continue
		}
		exp, done, err := h.option(opt, data)
		if done || err != nil {
			return exp, err
		}
	}
}

// greet sends the server's greeting and reads the client's flags.
func (h *nbdHandshake) greet() error {
	hello := binary.BigEndian.AppendUint64(nil, nbdMagic)
	hello = binary.BigEndian.AppendUint64(hello, nbdOptMagic)
	hello = binary.BigEndian.AppendUint16(hello, nbdFlagFixedNewstyle|nbdFlagNoZeroes)
	if _, err := h.c.conn.Write(hello); err != nil {
		return err
	}
	var b [4]byte
	if _, err := io.ReadFull(h.c.br, b[:]); err != nil {
		return err
	}
	cflags := binary.BigEndian.Uint32(b[:])
	if cflags&^(nbdFlagCFixedNewstyle|nbdFlagCNoZeroes) != 0 {
		return fmt.Errorf("%w %#x", errNBDClientFlags, cflags)
	}
	h.noZeroes = cflags&nbdFlagCNoZeroes != 0
	return nil
}

// readOption reads the next option. An option whose data is too long for
// any option we know is skipped rather than buffered, and refused: then ok
// is false.
func (h *nbdHandshake) readOption() (opt uint32, data []byte, ok bool, err error) {
	var b [nbdOptHeaderSize]byte
	if _, err := io.ReadFull(h.c.br, b[:]); err != nil {
		return 0, nil, false, err
	}
	if m := binary.BigEndian.Uint64(b[:]); m != nbdOptMagic {
		return 0, nil, false, fmt.Errorf("%w %#x", errNBDBadOptionMagic, m)
	}
	opt = binary.BigEndian.Uint32(b[8:])
	n := binary.BigEndian.Uint32(b[12:])
	if n > nbdMaxOptionData {
		if _, err := io.CopyN(io.Discard, h.c.br, int64(n)); err != nil {
			return opt, nil, false, err
		}
		typ := nbdRepErrUnsup
		switch opt {
		case nbdOptInfo, nbdOptGo, nbdOptList, nbdOptExportName, nbdOptAbort, nbdOptStructuredReply, nbdOptStartTLS:
			typ = nbdRepErrInvalid
		case nbdOptListMetaContext, nbdOptSetMetaContext:
			typ = nbdRepErrTooBig
			if opt == nbdOptSetMetaContext {
				h.metaExport = "" // a failed SET still replaces the selection
			}
		}
		if h.c.tlsRequired && !h.c.tlsOn && opt != nbdOptStartTLS && opt != nbdOptAbort {
			typ = nbdRepErrTLSReqd
		}
		return opt, nil, false, h.c.writeOpt(appendOptReply(h.out[:0], opt, typ, []byte("option data too long")))
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(h.c.br, data); err != nil {
		return opt, nil, false, err
	}
	return opt, data, true, nil
}

// option answers one option. done says the negotiation is over: the
// client chose exp, or err ends the connection. An option that does not end
// the negotiation leaves its reply in h.out, and option writes it.
func (h *nbdHandshake) option(opt uint32, data []byte) (exp Export, done bool, err error) {
	h.out = h.out[:0]
	if h.c.tlsRequired && !h.c.tlsOn {
		return h.beforeTLS(opt, data)
	}
	switch opt {
	case nbdOptExportName:
		return h.exportName(data)
	case nbdOptAbort:
		return h.abort()
	case nbdOptList:
		h.list(data)
	case nbdOptInfo, nbdOptGo:
		if exp, ok := h.infoOrGo(opt, data); ok {
			return exp, true, h.c.writeOpt(h.out)
		}
	case nbdOptStartTLS:
		h.startTLS(data)
	case nbdOptStructuredReply:
		h.structuredReply(data)
	case nbdOptListMetaContext, nbdOptSetMetaContext:
		h.metaContext(opt, data)
	default:
		h.out = appendOptReply(h.out, opt, nbdRepErrUnsup, nil)
	}
	return Export{}, false, h.c.writeOpt(h.out)
}

// beforeTLS answers an option on a TLS-only listener before TLS is up
// (the spec's FORCEDTLS mode): STARTTLS and ABORT are served, EXPORT_NAME
// ends the connection, and everything else is refused with
// NBD_REP_ERR_TLS_REQD.
func (h *nbdHandshake) beforeTLS(opt uint32, data []byte) (Export, bool, error) {
	switch opt {
	case nbdOptStartTLS:
		return Export{}, false, h.upgrade(data)
	case nbdOptAbort:
		return h.abort()
	case nbdOptExportName:
		return Export{}, true, fmt.Errorf("%w (NBD_OPT_EXPORT_NAME %q)", errNBDTLSRequired, data)
	}
	h.out = appendOptReply(h.out, opt, nbdRepErrTLSReqd, []byte("this server requires TLS: send NBD_OPT_STARTTLS first"))
	return Export{}, false, h.c.writeOpt(h.out)
}

// upgrade answers NBD_OPT_STARTTLS before TLS is up: an ACK, then the TLS
// handshake as the server, after which the connection's reads and writes
// go through TLS. A failed TLS handshake ends the connection. What was
// negotiated before is forgotten, as the spec asks (before TLS nothing
// can be, on a TLS-only listener, but the rule costs nothing).
func (h *nbdHandshake) upgrade(data []byte) error {
	if len(data) != 0 {
		h.out = appendOptReply(h.out, nbdOptStartTLS, nbdRepErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
		return h.c.writeOpt(h.out)
	}
	if err := h.c.writeOpt(appendOptReply(h.out, nbdOptStartTLS, nbdRepAck, nil)); err != nil {
		return err
	}
	// The client must wait for the ACK before it starts TLS; bytes it
	// sent before would be read as plain text by us and lost to TLS.
	if h.c.br.Buffered() > 0 {
		return errNBDTLSEarlyData
	}
	raw := &bufferedConn{Conn: h.c.nc, r: bufio.NewReaderSize(h.c.nc, nbdTLSReadBuffer)}
	tc := tls.Server(raw, h.c.s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("blockdev: NBD TLS handshake: %w", err)
	}
	st := tc.ConnectionState()
	h.c.mu.Lock()
	h.c.conn = tc
	h.c.mu.Unlock()
	h.c.br.Reset(tc)
	h.c.tlsOn = true
	if len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
		h.c.peer = st.VerifiedChains[0][0]
	}
	h.structured, h.metaExport = false, ""
	h.c.log = h.c.log.With("client", h.c.peerName())
	h.c.log.Debug("NBD TLS established", "version", tls.VersionName(st.Version), "cipher", tls.CipherSuiteName(st.CipherSuite))
	return nil
}

// bufferedConn reads a connection through a buffer. TLS reads one record
// (at most 16 KiB) at a time, which unbuffered would be a system call per
// record.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// access is what this connection may do with the export named name:
// everything on a connection without TLS (the listener's own protection is
// its access control) or without NBDConfig.Authorize.
func (c *nbdConn) access(name string) NBDAccess {
	if !c.tlsOn || c.s.cfg.Authorize == nil {
		return NBDReadWrite
	}
	return c.s.cfg.Authorize(c.peer, name)
}

// visible resolves a name the client sent to the export it may see: the
// default name "" is the only export it may open, when there is exactly
// one. ok is false when it may not open the export; that is decided from
// the name alone, before the catalogue is asked, so that an export the
// client may not open looks the same whether it exists or not.
func (h *nbdHandshake) visible(name string) (resolved string, acc NBDAccess, ok bool) {
	if name == "" && h.c.tlsOn && h.c.s.cfg.Authorize != nil {
		l := h.exports()
		if len(l) != 1 {
			return "", NBDDeny, false
		}
		name = l[0].Name
	}
	acc = h.c.access(name)
	return name, acc, acc != NBDDeny
}

// exports is the catalogue as this connection may see it.
func (h *nbdHandshake) exports() []Export {
	all := h.c.s.list()
	if !h.c.tlsOn || h.c.s.cfg.Authorize == nil {
		return all
	}
	out := all[:0:0]
	for _, e := range all {
		if h.c.access(e.Name) != NBDDeny {
			out = append(out, e)
		}
	}
	return out
}

// restrict applies acc to an export found in the catalogue.
func restrict(exp Export, acc NBDAccess) Export {
	if acc == NBDReadOnly {
		exp.ReadOnly = true
	}
	return exp
}

// notAllowed is the reply to an option naming an export the client may
// not open.
func (h *nbdHandshake) notAllowed(opt uint32, name string) {
	h.out = appendOptReply(h.out, opt, nbdRepErrPolicy, fmt.Appendf(nil, "this client may not open export %q", name))
}

// peerName is the name of the client's certificate, or "" without one.
func (c *nbdConn) peerName() string {
	if c.peer == nil {
		return ""
	}
	if cn := c.peer.Subject.CommonName; cn != "" {
		return cn
	}
	if len(c.peer.DNSNames) > 0 {
		return c.peer.DNSNames[0]
	}
	return ""
}

// exportName answers NBD_OPT_EXPORT_NAME, the old way to pick an export:
// the export's size and flags, or, for an unknown name, a closed
// connection (the option has no error reply).
func (h *nbdHandshake) exportName(data []byte) (Export, bool, error) {
	name, acc, ok := h.visible(string(data))
	if !ok {
		return Export{}, true, fmt.Errorf("%w %q (NBD_OPT_EXPORT_NAME)", errNBDNotAllowed, data)
	}
	exp, ok := h.c.attach(name)
	if !ok {
		return Export{}, true, fmt.Errorf("%w %q (NBD_OPT_EXPORT_NAME)", errNBDUnknownExport, data)
	}
	exp = restrict(exp, acc)
	h.out = binary.BigEndian.AppendUint64(h.out, uint64(exp.Disk.Size()))
	h.out = binary.BigEndian.AppendUint16(h.out, transmissionFlags(exp.ReadOnly, h.structured))
	if !h.noZeroes {
		h.out = append(h.out, make([]byte, 124)...)
	}
	h.enter(exp)
	return exp, true, h.c.writeOpt(h.out)
}

// abort answers NBD_OPT_ABORT.
func (h *nbdHandshake) abort() (Export, bool, error) {
	// The client may already have hung up; the reply is a courtesy.
	h.c.writeOpt(appendOptReply(h.out, nbdOptAbort, nbdRepAck, nil))
	return Export{}, true, errNBDAbort
}

// list answers NBD_OPT_LIST with one NBD_REP_SERVER per export.
func (h *nbdHandshake) list(data []byte) {
	if len(data) != 0 {
		h.out = appendOptReply(h.out, nbdOptList, nbdRepErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		return
	}
	for _, e := range h.exports() {
		d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
		d = append(d, e.Name...)
		d = append(d, e.Description...)
		h.out = appendOptReply(h.out, nbdOptList, nbdRepServer, d)
	}
	h.out = appendOptReply(h.out, nbdOptList, nbdRepAck, nil)
}

// infoOrGo answers NBD_OPT_INFO and NBD_OPT_GO, which ask the same and
// differ in that GO picks the export: ok says it did.
func (h *nbdHandshake) infoOrGo(opt uint32, data []byte) (exp Export, ok bool) {
	req, err := decodeInfoRequest(data)
	if err != nil {
		h.out = appendOptReply(h.out, opt, nbdRepErrInvalid, []byte(err.Error()))
		return Export{}, false
	}
	name, acc, allowed := h.visible(req.name)
	if !allowed {
		h.notAllowed(opt, req.name)
		return Export{}, false
	}
	if opt == nbdOptGo {
		exp, ok = h.c.attach(name)
	} else {
		exp, ok = h.c.s.lookup(name)
	}
	if !ok {
		h.out = appendOptReply(h.out, opt, nbdRepErrUnknown, fmt.Appendf(nil, "no export named %q", req.name))
		return Export{}, false
	}
	exp = restrict(exp, acc)
	h.out = appendInfo(h.out, opt, exp, req.infos, h.c.s.cfg.MaxRequest, h.structured)
	if opt == nbdOptGo {
		h.enter(exp)
	}
	return exp, opt == nbdOptGo
}

// enter hands what was negotiated to the connection entering transmission
// on exp: block status only if the last SET_META_CONTEXT named this export.
func (h *nbdHandshake) enter(exp Export) {
	h.c.structured = h.structured
	h.c.blockStatus = h.structured && h.metaExport != "" && h.metaExport == exp.Name
}

// startTLS answers NBD_OPT_STARTTLS where it does not start TLS: on a
// listener without TLS, or once TLS is up.
func (h *nbdHandshake) startTLS(data []byte) {
	switch {
	case h.c.tlsOn:
		h.out = appendOptReply(h.out, nbdOptStartTLS, nbdRepErrInvalid, []byte("TLS is already on"))
	case len(data) != 0:
		h.out = appendOptReply(h.out, nbdOptStartTLS, nbdRepErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
	default:
		h.out = appendOptReply(h.out, nbdOptStartTLS, nbdRepErrPolicy, []byte("TLS is not offered on this socket"))
	}
}

// structuredReply answers NBD_OPT_STRUCTURED_REPLY: from now on READ,
// BLOCK_STATUS and errors are answered in chunks. Asking again is harmless.
func (h *nbdHandshake) structuredReply(data []byte) {
	if len(data) != 0 {
		h.out = appendOptReply(h.out, nbdOptStructuredReply, nbdRepErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
		return
	}
	h.structured = true
	h.out = appendOptReply(h.out, nbdOptStructuredReply, nbdRepAck, nil)
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
// The only context is base:allocation. Both need structured replies first
// (block status is a structured reply). LIST with no query, or with the
// wildcard "base:", names it; SET selects it when asked for by its full
// name. Queries of other namespaces, and unknown leaves of base, are
// ignored; a query without a namespace is refused. SET replaces the
// selection even when it fails.
func (h *nbdHandshake) metaContext(opt uint32, data []byte) {
	set := opt == nbdOptSetMetaContext
	if set {
		h.metaExport = ""
	}
	if !h.structured {
		h.out = appendOptReply(h.out, opt, nbdRepErrInvalid, []byte("negotiate structured replies first"))
		return
	}
	req, err := decodeMetaRequest(data)
	if err != nil {
		h.out = appendOptReply(h.out, opt, nbdRepErrInvalid, []byte(err.Error()))
		return
	}
	name, _, allowed := h.visible(req.name)
	if !allowed {
		h.notAllowed(opt, req.name)
		return
	}
	exp, ok := h.c.s.lookup(name)
	if !ok {
		h.out = appendOptReply(h.out, opt, nbdRepErrUnknown, fmt.Appendf(nil, "no export named %q", req.name))
		return
	}
	match := !set && len(req.queries) == 0
	for _, q := range req.queries {
		ns, leaf, ok := strings.Cut(q, ":")
		if !ok || ns == "" {
			h.out = appendOptReply(h.out, opt, nbdRepErrInvalid, fmt.Appendf(nil, "query %q has no namespace", q))
			return
		}
		if ns == "base" && (leaf == "allocation" || (!set && leaf == "")) {
			match = true
		}
	}
	if !match {
		h.out = appendOptReply(h.out, opt, nbdRepAck, nil)
		return
	}
	var id uint32 // LIST reports no ids
	if set {
		id = nbdContextAllocationID
		h.metaExport = exp.Name
	}
	d := binary.BigEndian.AppendUint32(nil, id)
	h.out = appendOptReply(h.out, opt, nbdRepMetaContext, append(d, nbdContextAllocation...))
	h.out = appendOptReply(h.out, opt, nbdRepAck, nil)
}

// appendInfo appends the NBD_REP_INFO replies and the final ACK for an export.
func appendInfo(out []byte, opt uint32, exp Export, infos []uint16, maxRequest uint32, structured bool) []byte {
	size := exp.Disk.Size()
	d := binary.BigEndian.AppendUint16(nil, nbdInfoExport)
	d = binary.BigEndian.AppendUint64(d, uint64(size))
	d = binary.BigEndian.AppendUint16(d, transmissionFlags(exp.ReadOnly, structured))
	out = appendOptReply(out, opt, nbdRepInfo, d)
	var name, desc bool
	for _, t := range infos {
		name = name || t == nbdInfoName
		desc = desc || t == nbdInfoDescription
	}
	if name {
		d = binary.BigEndian.AppendUint16(d[:0], nbdInfoName)
		out = appendOptReply(out, opt, nbdRepInfo, append(d, exp.Name...))
	}
	if desc && exp.Description != "" {
		d = binary.BigEndian.AppendUint16(d[:0], nbdInfoDescription)
		out = appendOptReply(out, opt, nbdRepInfo, append(d, exp.Description...))
	}
	// Block sizes are sent whether asked for or not (the spec allows it);
	// they are hints, since requests need not be aligned.
	d = binary.BigEndian.AppendUint16(d[:0], nbdInfoBlockSize)
	d = binary.BigEndian.AppendUint32(d, minBlockSize(size))
	d = binary.BigEndian.AppendUint32(d, nbdPreferredBlock)
	d = binary.BigEndian.AppendUint32(d, maxRequest)
	out = appendOptReply(out, opt, nbdRepInfo, d)
	return appendOptReply(out, opt, nbdRepAck, nil)
}

func (c *nbdConn) writeOpt(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	_, err := c.conn.Write(b)
	return err
}
