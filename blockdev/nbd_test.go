package blockdev_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/internal/fakedisk"
)

// Wire values, spelled out here so that the tests check the server against
// the spec rather than against its own constants.
const (
	optExportName = 1
	optAbort      = 2
	optList       = 3
	optStartTLS   = 5
	optInfo       = 6
	optGo         = 7
	optStructured = 8

	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 1<<31 | 1
	repErrPolicy  = 1<<31 | 2
	repErrInvalid = 1<<31 | 3
	repErrUnknown = 1<<31 | 6

	infoExport    = 0
	infoName      = 1
	infoDesc      = 2
	infoBlockSize = 3

	flagHasFlags    = 1 << 0
	flagReadOnly    = 1 << 1
	flagSendFlush   = 1 << 2
	flagSendFUA     = 1 << 3
	flagSendTrim    = 1 << 5
	flagSendZeroes  = 1 << 6
	flagCanMultiCon = 1 << 8

	cmdRead   = 0
	cmdWrite  = 1
	cmdDisc   = 2
	cmdFlush  = 3
	cmdTrim   = 4
	cmdZeroes = 6

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1

	cFixed    = 1 << 0
	cNoZeroes = 1 << 1

	errOK        = 0
	errEPERM     = 1
	errEIO       = 5
	errEINVAL    = 22
	errENOSPC    = 28
	errEOVERFLOW = 75
)

// catalogue is a live Exports for tests.
type catalogue struct {
	mu sync.Mutex
	m  map[string]blockdev.Export
}

func (c *catalogue) Lookup(name string) (blockdev.Export, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[name]
	return e, ok
}

func (c *catalogue) List() []blockdev.Export {
	c.mu.Lock()
	defer c.mu.Unlock()
	var l []blockdev.Export
	for _, e := range c.m {
		l = append(l, e)
	}
	sort.Slice(l, func(i, j int) bool { return l[i].Name < l[j].Name })
	return l
}

func (c *catalogue) set(e blockdev.Export) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]blockdev.Export{}
	}
	c.m[e.Name] = e
}

func (c *catalogue) remove(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, name)
}

type exportSpec struct {
	name string
	size int64
	ro   bool
	desc string
	// wrap, if set, wraps the fakedisk before it is exported.
	wrap func(blockdev.Disk) blockdev.Disk
}

type fixture struct {
	t     *testing.T
	srv   *blockdev.NBDServer
	sock  string
	cat   *catalogue
	disks map[string]*fakedisk.Disk
	paths map[string]string
}

// testLogger sends the server's log to t.Log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// shortDir is a temporary directory whose path is short enough for a unix
// socket.
func shortDir(t *testing.T) string {
	d := t.TempDir()
	if len(d) < 90 {
		return d
	}
	d, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// newFixture serves the given exports, backed by fakedisks, on a unix socket.
// The server is closed (and Serve checked to return nil) at cleanup.
func newFixture(t *testing.T, cfg blockdev.NBDConfig, specs ...exportSpec) *fixture {
	t.Helper()
	dir := shortDir(t)
	f := &fixture{t: t, sock: filepath.Join(dir, "nbd.sock"), cat: &catalogue{},
		disks: map[string]*fakedisk.Disk{}, paths: map[string]string{}}
	for i, s := range specs {
		path := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		d, err := fakedisk.Create(path, s.size)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		var disk blockdev.Disk = d
		if s.wrap != nil {
			disk = s.wrap(d)
		}
		f.disks[s.name], f.paths[s.name] = d, path
		f.cat.set(blockdev.Export{Name: s.name, Disk: disk, ReadOnly: s.ro, Description: s.desc})
	}
	cfg.Exports = f.cat
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	f.srv = blockdev.NewNBDServer(cfg)
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	serve := f.srv.Serve
	if cfg.TLS != nil {
		serve = f.srv.ServeTLS // a TLS config in a test means a TLS-only listener
	}
	go func() { errc <- serve(context.Background(), l) }()
	t.Cleanup(func() {
		if err := f.srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("Serve returned %v after Close", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
	})
	return f
}

// fileBytes reads the backing file of an export.
func (f *fixture) fileBytes(name string, off, n int64) []byte {
	f.t.Helper()
	b := make([]byte, n)
	fh, err := os.Open(f.paths[name])
	if err != nil {
		f.t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.ReadAt(b, off); err != nil {
		f.t.Fatal(err)
	}
	return b
}

// rawClient is a handwritten NBD client, so that tests can send what real
// clients never would.
type rawClient struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
	// ctxID is the base:allocation id SET_META_CONTEXT gave.
	ctxID uint32
}

func dial(t *testing.T, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// hello reads the server greeting and answers with client flags.
func (c *rawClient) hello(cflags uint32) {
	c.t.Helper()
	b := c.read(18)
	if string(b[:8]) != "NBDMAGIC" || string(b[8:16]) != "IHAVEOPT" {
		c.t.Fatalf("greeting % x", b)
	}
	if hs := binary.BigEndian.Uint16(b[16:]); hs != 3 {
		c.t.Fatalf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES", hs)
	}
	c.write(binary.BigEndian.AppendUint32(nil, cflags))
}

func (c *rawClient) opt(opt uint32, data []byte) {
	c.t.Helper()
	b := []byte("IHAVEOPT")
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *rawClient) optReply(wantOpt uint32) (typ uint32, data []byte) {
	c.t.Helper()
	h := c.read(20)
	if m := binary.BigEndian.Uint64(h); m != 0x3e889045565a9 {
		c.t.Fatalf("option reply magic %#x", m)
	}
	if o := binary.BigEndian.Uint32(h[8:]); o != wantOpt {
		c.t.Fatalf("reply to option %d, want %d", o, wantOpt)
	}
	typ = binary.BigEndian.Uint32(h[12:])
	return typ, c.read(int(binary.BigEndian.Uint32(h[16:])))
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

type exportInfo struct {
	size              uint64
	flags             uint16
	name, desc        string
	hasName, hasDesc  bool
	minB, prefB, maxB uint32
}

// info sends INFO or GO and collects the replies up to the ACK; it returns
// the error reply type (0 on success).
func (c *rawClient) info(opt uint32, name string, infos ...uint16) (exportInfo, uint32) {
	c.t.Helper()
	c.opt(opt, infoData(name, infos...))
	var e exportInfo
	for {
		typ, d := c.optReply(opt)
		switch typ {
		case repAck:
			return e, 0
		case repInfo:
			switch binary.BigEndian.Uint16(d) {
			case infoExport:
				if len(d) != 12 {
					c.t.Fatalf("NBD_INFO_EXPORT length %d", len(d))
				}
				e.size, e.flags = binary.BigEndian.Uint64(d[2:]), binary.BigEndian.Uint16(d[10:])
			case infoName:
				e.name, e.hasName = string(d[2:]), true
			case infoDesc:
				e.desc, e.hasDesc = string(d[2:]), true
			case infoBlockSize:
				if len(d) != 14 {
					c.t.Fatalf("NBD_INFO_BLOCK_SIZE length %d", len(d))
				}
				e.minB, e.prefB, e.maxB = binary.BigEndian.Uint32(d[2:]), binary.BigEndian.Uint32(d[6:]), binary.BigEndian.Uint32(d[10:])
			}
		default:
			if typ&(1<<31) == 0 {
				c.t.Fatalf("unexpected reply type %#x", typ)
			}
			return e, typ
		}
	}
}

// open negotiates with GO and enters transmission on export.
func (c *rawClient) open(export string) exportInfo {
	c.t.Helper()
	c.hello(cFixed | cNoZeroes)
	e, errTyp := c.info(optGo, export)
	if errTyp != 0 {
		c.t.Fatalf("GO %q: reply %#x", export, errTyp)
	}
	return e
}

func openExport(t *testing.T, sock, export string) *rawClient {
	t.Helper()
	c := dial(t, sock)
	c.open(export)
	return c
}

func (c *rawClient) send(typ, flags uint16, handle, off uint64, n uint32, payload []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	c.write(append(b, payload...))
}

// reply reads a simple reply header.
func (c *rawClient) reply() (errno uint32, handle uint64) {
	c.t.Helper()
	h := c.read(16)
	if m := binary.BigEndian.Uint32(h); m != 0x67446698 {
		c.t.Fatalf("reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

// do sends a request and waits for its reply (nothing else may be in flight).
func (c *rawClient) do(typ, flags uint16, off uint64, n uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	const h = 0xfeedbeef
	c.send(typ, flags, h, off, n, payload)
	errno, handle := c.reply()
	if handle != h {
		c.t.Fatalf("reply handle %#x, want %#x", handle, h)
	}
	if typ == cmdRead && errno == 0 {
		return 0, c.read(int(n))
	}
	return errno, nil
}

func (c *rawClient) mustDo(typ, flags uint16, off uint64, n uint32, payload []byte) []byte {
	c.t.Helper()
	errno, data := c.do(typ, flags, off, n, payload)
	if errno != 0 {
		c.t.Fatalf("cmd %d [%d,+%d): error %d", typ, off, n, errno)
	}
	return data
}

func (c *rawClient) expectError(what string, want uint32, typ, flags uint16, off uint64, n uint32, payload []byte) {
	c.t.Helper()
	if errno, _ := c.do(typ, flags, off, n, payload); errno != want {
		c.t.Errorf("%s: error %d, want %d", what, errno, want)
	}
}

// expectClosed checks that the server hangs up (after any bytes it still had
// to send).
func (c *rawClient) expectClosed() {
	c.t.Helper()
	b, err := io.ReadAll(c.br)
	if err != nil {
		c.t.Fatalf("expected the server to close the connection: %v (read % x)", err, b)
	}
	if len(b) != 0 {
		c.t.Fatalf("unexpected bytes before close: % x", b)
	}
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestNBDNegotiation(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "vm1/disk0", size: 1 << 20, desc: "first disk"},
		exportSpec{name: "vm1/disk1", size: 2 << 20},
		exportSpec{name: "vm2/ro", size: 512 << 10, ro: true},
		exportSpec{name: "odd", size: 1000},
	)
	rwFlags := uint16(flagHasFlags | flagSendFlush | flagSendFUA | flagSendTrim | flagSendZeroes | flagCanMultiCon)
	roFlags := uint16(flagHasFlags | flagReadOnly | flagCanMultiCon)

	t.Run("list", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optList, nil)
		var got []string
		for {
			typ, d := c.optReply(optList)
			if typ == repAck {
				break
			}
			if typ != repServer {
				t.Fatalf("reply %#x", typ)
			}
			n := binary.BigEndian.Uint32(d)
			name, details := string(d[4:4+n]), string(d[4+n:])
			if name == "vm1/disk0" && details != "first disk" {
				t.Errorf("details for %s: %q", name, details)
			}
			got = append(got, name)
		}
		sort.Strings(got)
		if want := []string{"odd", "vm1/disk0", "vm1/disk1", "vm2/ro"}; !slices.Equal(got, want) {
			t.Fatalf("LIST = %q, want %q", got, want)
		}
		c.opt(optAbort, nil)
		if typ, _ := c.optReply(optAbort); typ != repAck {
			t.Fatalf("ABORT reply %#x", typ)
		}
		c.expectClosed()
	})

	t.Run("info then go", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		e, errTyp := c.info(optInfo, "vm1/disk0", infoName, infoDesc, infoBlockSize)
		want := exportInfo{size: 1 << 20, flags: rwFlags, name: "vm1/disk0", hasName: true, desc: "first disk", hasDesc: true,
			minB: 512, prefB: 4096, maxB: 32 << 20}
		if errTyp != 0 || e != want {
			t.Fatalf("INFO = %+v (error %#x), want %+v", e, errTyp, want)
		}
		e, errTyp = c.info(optGo, "vm2/ro", infoBlockSize)
		want = exportInfo{size: 512 << 10, flags: roFlags, minB: 512, prefB: 4096, maxB: 32 << 20}
		if errTyp != 0 || e != want {
			t.Fatalf("GO = %+v (error %#x), want %+v", e, errTyp, want)
		}
		if d := c.mustDo(cmdRead, 0, 0, 512, nil); !bytes.Equal(d, make([]byte, 512)) {
			t.Fatal("read after GO returned non-zero data")
		}
	})

	t.Run("size not a multiple of 512", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed)
		e, errTyp := c.info(optInfo, "odd")
		if errTyp != 0 || e.size != 1000 || e.minB != 1 {
			t.Fatalf("INFO odd = %+v (error %#x): want size 1000, minimum block 1", e, errTyp)
		}
	})

	t.Run("unknown export", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		if _, errTyp := c.info(optGo, "vm9/disk0"); errTyp != repErrUnknown {
			t.Fatalf("GO unknown: reply %#x, want NBD_REP_ERR_UNKNOWN", errTyp)
		}
		if _, errTyp := c.info(optInfo, "vm9/disk0"); errTyp != repErrUnknown {
			t.Fatalf("INFO unknown: reply %#x, want NBD_REP_ERR_UNKNOWN", errTyp)
		}
		// With several exports there is no default one.
		if _, errTyp := c.info(optGo, ""); errTyp != repErrUnknown {
			t.Fatalf("GO default with 4 exports: reply %#x, want NBD_REP_ERR_UNKNOWN", errTyp)
		}
		// Negotiation goes on.
		if e, errTyp := c.info(optGo, "vm1/disk1"); errTyp != 0 || e.size != 2<<20 || e.flags != rwFlags {
			t.Fatalf("GO after errors = %+v (error %#x)", e, errTyp)
		}
		c.mustDo(cmdWrite, 0, 0, 4, []byte("abcd"))
	})

	t.Run("unsupported and malformed options", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		for _, tt := range []struct {
			name string
			opt  uint32
			data []byte
			want uint32
		}{
			{"structured reply with data", optStructured, []byte{0}, repErrInvalid},
			{"unknown option", 4242, []byte("some data"), repErrUnsup},
			{"huge unknown option", 4243, make([]byte, 1<<20), repErrUnsup},
			{"starttls", optStartTLS, nil, repErrPolicy},
			{"list with data", optList, []byte{1}, repErrInvalid},
			{"go with short data", optGo, []byte{0, 0, 0, 9, 'a'}, repErrInvalid},
			{"info with trailing data", optInfo, append(infoData("vm1/disk0"), 0), repErrInvalid},
			{"info with name length 4G", optInfo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0}, repErrInvalid},
		} {
			c.opt(tt.opt, tt.data)
			if typ, _ := c.optReply(tt.opt); typ != tt.want {
				t.Errorf("%s: reply %#x, want %#x", tt.name, typ, tt.want)
			}
		}
		if e, errTyp := c.info(optGo, "vm1/disk0"); errTyp != 0 || e.size != 1<<20 {
			t.Fatalf("GO after errors = %+v (error %#x)", e, errTyp)
		}
		c.mustDo(cmdRead, 0, 0, 4096, nil)
	})

	t.Run("export name with zeroes", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed)
		c.opt(optExportName, []byte("vm1/disk1"))
		b := c.read(8 + 2 + 124)
		if size, flags := binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:]); size != 2<<20 || flags != rwFlags {
			t.Fatalf("EXPORT_NAME: size %d flags %#x", size, flags)
		}
		if !bytes.Equal(b[10:], make([]byte, 124)) {
			t.Fatal("reserved bytes not zero")
		}
		c.mustDo(cmdRead, 0, 0, 512, nil)
	})

	t.Run("export name without zeroes", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optExportName, []byte("vm2/ro"))
		b := c.read(10)
		if size, flags := binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:]); size != 512<<10 || flags != roFlags {
			t.Fatalf("EXPORT_NAME: size %d flags %#x", size, flags)
		}
		// The next bytes are the reply to the first request, not zeroes.
		c.mustDo(cmdRead, 0, 0, 512, nil)
	})

	t.Run("export name unknown", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.opt(optExportName, []byte("vm9/disk0"))
		c.expectClosed()
	})

	t.Run("bad client flags", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | 1<<5)
		c.expectClosed()
	})

	t.Run("bad option magic", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.write(append([]byte("IHAVEOPX"), 0, 0, 0, 3, 0, 0, 0, 0))
		c.expectClosed()
	})
}

func TestNBDDefaultExport(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 1 << 20})
	c := dial(t, f.sock)
	c.hello(cFixed | cNoZeroes)
	e, errTyp := c.info(optInfo, "", infoName)
	if errTyp != 0 || e.name != "vm1/disk0" || e.size != 1<<20 {
		t.Fatalf("INFO default = %+v (error %#x)", e, errTyp)
	}
	if _, errTyp := c.info(optGo, ""); errTyp != 0 {
		t.Fatalf("GO default: %#x", errTyp)
	}
	c.mustDo(cmdWrite, 0, 512, 3, []byte("xyz"))
	if got := f.fileBytes("vm1/disk0", 512, 3); string(got) != "xyz" {
		t.Fatalf("default export wrote %q to the disk", got)
	}
}

func TestNBDBadRequests(t *testing.T) {
	const size = 1 << 20
	const maxReq = 256 << 10
	f := newFixture(t, blockdev.NBDConfig{MaxRequest: maxReq},
		exportSpec{name: "vm1/disk0", size: size},
		exportSpec{name: "vm1/ro", size: 64 << 10, ro: true},
	)
	c := openExport(t, f.sock, "vm1/disk0")
	junk := bytes.Repeat([]byte{0xee}, 4096)
	// Each bad request gets its error, with its own handle, and changes
	// nothing; the connection keeps serving.
	for i, tt := range []struct {
		name    string
		typ     uint16
		flags   uint16
		off     uint64
		n       uint32
		payload []byte
		want    uint32
	}{
		{"read past end", cmdRead, 0, size - 512, 1024, nil, errEINVAL},
		{"read at end", cmdRead, 0, size, 512, nil, errEINVAL},
		{"write past end, with payload", cmdWrite, 0, size - 2048, 4096, junk, errENOSPC},
		{"read with wrapping offset", cmdRead, 0, ^uint64(0) - 511, 1024, nil, errEINVAL},
		{"write with wrapping offset", cmdWrite, 0, ^uint64(0) - 511, 4096, junk, errENOSPC},
		{"read too long", cmdRead, 0, 0, maxReq + 1, nil, errEOVERFLOW},
		{"unknown command", 0x99, 0, 0, 512, nil, errEINVAL},
		{"block status not negotiated", 7, 0, 0, 512, nil, errEINVAL},
		{"read with NO_HOLE", cmdRead, cmdFlagNoHole, 0, 512, nil, errEINVAL},
		{"write with unknown flag, in range", cmdWrite, 1 << 9, 0, 4096, junk, errEINVAL},
		{"write with NO_HOLE", cmdWrite, cmdFlagNoHole, 8192, 4096, junk, errEINVAL},
		{"zero-length read", cmdRead, 0, 0, 0, nil, errEINVAL},
		{"zero-length write", cmdWrite, 0, 0, 0, nil, errEINVAL},
		{"trim past end", cmdTrim, 0, 4096, size, nil, errEINVAL},
		{"trim with FUA past end", cmdTrim, cmdFlagFUA, size, 1, nil, errEINVAL},
		{"write zeroes past end", cmdZeroes, 0, size - 1, 2, nil, errENOSPC},
		{"flush with offset", cmdFlush, 0, 4096, 0, nil, errEINVAL},
		{"flush with length", cmdFlush, 0, 0, 4096, nil, errEINVAL},
	} {
		h := uint64(1000 + i)
		c.send(tt.typ, tt.flags, h, tt.off, tt.n, tt.payload)
		errno, handle := c.reply()
		if errno != tt.want || handle != h {
			t.Errorf("%s: error %d handle %d, want error %d handle %d", tt.name, errno, handle, tt.want, h)
		}
	}
	if f.disks["vm1/disk0"].Flushes.Load() != 0 || f.disks["vm1/disk0"].Trims.Load() != 0 || f.disks["vm1/disk0"].Zeroes.Load() != 0 {
		t.Error("a rejected request reached the disk")
	}
	if got := f.fileBytes("vm1/disk0", 0, size); !bytes.Equal(got, make([]byte, size)) {
		t.Error("a rejected write changed the disk")
	}
	// Still in step: a valid write and read on the same connection.
	c.mustDo(cmdWrite, cmdFlagFUA, 4096, 4096, pattern(1, 4096))
	if got := c.mustDo(cmdRead, 0, 4096, 4096, nil); !bytes.Equal(got, pattern(1, 4096)) {
		t.Fatal("read after bad requests returned wrong data")
	}

	t.Run("read-only export", func(t *testing.T) {
		c := openExport(t, f.sock, "vm1/ro")
		c.expectError("write", errEPERM, cmdWrite, 0, 0, 4096, junk)
		c.expectError("write FUA", errEPERM, cmdWrite, cmdFlagFUA, 0, 4096, junk)
		c.expectError("trim", errEPERM, cmdTrim, 0, 0, 4096, nil)
		c.expectError("trim FUA", errEPERM, cmdTrim, cmdFlagFUA, 0, 4096, nil)
		c.expectError("write zeroes", errEPERM, cmdZeroes, 0, 0, 4096, nil)
		c.expectError("write zeroes NO_HOLE FUA", errEPERM, cmdZeroes, cmdFlagNoHole|cmdFlagFUA, 0, 4096, nil)
		c.expectError("write past end", errEPERM, cmdWrite, 0, 64<<10, 512, junk[:512])
		// FUA on a read is tolerated, and flush is harmless.
		if got := c.mustDo(cmdRead, cmdFlagFUA, 0, 4096, nil); !bytes.Equal(got, make([]byte, 4096)) {
			t.Fatal("read-only export changed")
		}
		c.mustDo(cmdFlush, 0, 0, 0, nil)
		if got := f.fileBytes("vm1/ro", 0, 64<<10); !bytes.Equal(got, make([]byte, 64<<10)) {
			t.Fatal("write to a read-only export reached the disk")
		}
	})

	t.Run("write payload too large closes", func(t *testing.T) {
		c := openExport(t, f.sock, "vm1/disk0")
		c.send(cmdWrite, 0, 77, 0, 64<<20, nil) // the payload is never sent
		if errno, h := c.reply(); errno != errEOVERFLOW || h != 77 {
			t.Fatalf("oversized write: error %d handle %d", errno, h)
		}
		c.expectClosed()
	})

	t.Run("bad request magic closes after in-flight replies", func(t *testing.T) {
		c := openExport(t, f.sock, "vm1/disk0")
		c.send(cmdRead, 0, 5, 4096, 4096, nil)
		c.write(make([]byte, 28))
		if errno, h := c.reply(); errno != 0 || h != 5 {
			t.Fatalf("read before the bad magic: error %d handle %d", errno, h)
		}
		if got := c.read(4096); !bytes.Equal(got, pattern(1, 4096)) {
			t.Fatal("wrong data")
		}
		c.expectClosed()
	})

	// The server still takes new connections.
	c2 := openExport(t, f.sock, "vm1/disk0")
	if got := c2.mustDo(cmdRead, 0, 4096, 4096, nil); !bytes.Equal(got, pattern(1, 4096)) {
		t.Fatal("new connection read wrong data")
	}
}

func TestNBDBackendErrors(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 1 << 20})
	d := f.disks["vm1/disk0"]
	c := openExport(t, f.sock, "vm1/disk0")
	for _, tt := range []struct {
		name    string
		err     error
		typ     uint16
		flags   uint16
		n       uint32
		payload []byte
		want    uint32
	}{
		{"write ENOSPC", syscall.ENOSPC, cmdWrite, 0, 4096, pattern(2, 4096), errENOSPC},
		{"write wrapped ENOSPC", fmt.Errorf("journal: segment: %w", syscall.ENOSPC), cmdWrite, cmdFlagFUA, 4096, pattern(2, 4096), errENOSPC},
		{"write other error", errors.New("x"), cmdWrite, 0, 4096, pattern(2, 4096), errEIO},
		{"read other error", errors.New("x"), cmdRead, 0, 4096, nil, errEIO},
		{"read out of range", blockdev.ErrOutOfRange, cmdRead, 0, 4096, nil, errEINVAL},
		{"write read-only", blockdev.ErrReadOnly, cmdWrite, 0, 4096, pattern(2, 4096), errEPERM},
		{"flush", syscall.EIO, cmdFlush, 0, 0, nil, errEIO},
		{"trim", syscall.ENOSPC, cmdTrim, 0, 4096, nil, errENOSPC},
		{"write zeroes", errors.New("x"), cmdZeroes, 0, 4096, nil, errEIO},
	} {
		d.FailNext(1, tt.err)
		if errno, _ := c.do(tt.typ, tt.flags, 0, tt.n, tt.payload); errno != tt.want {
			t.Errorf("%s: error %d, want %d", tt.name, errno, tt.want)
		}
	}
	// A failed read sends no payload, so the stream is still in step.
	c.mustDo(cmdWrite, 0, 0, 4096, pattern(3, 4096))
	if got := c.mustDo(cmdRead, 0, 0, 4096, nil); !bytes.Equal(got, pattern(3, 4096)) {
		t.Fatal("read after failures returned wrong data")
	}
}

// gateDisk holds every ReadAt until gate is closed, announcing each one on
// started; it tracks how many reads are inside the Disk at once.
type gateDisk struct {
	blockdev.Disk
	once     sync.Once
	gate     chan struct{}
	started  chan struct{}
	cur, max atomic.Int32
	finished atomic.Int32
}

func newGateDisk(d blockdev.Disk) *gateDisk {
	return &gateDisk{Disk: d, gate: make(chan struct{}), started: make(chan struct{}, 1024)}
}

// open lets reads through; tests also call it at cleanup so that a failing
// test does not leave Close waiting on a held read.
func (g *gateDisk) open() { g.once.Do(func() { close(g.gate) }) }

func (g *gateDisk) ReadAt(p []byte, off int64) (int, error) {
	n := g.cur.Add(1)
	for {
		m := g.max.Load()
		if n <= m || g.max.CompareAndSwap(m, n) {
			break
		}
	}
	g.started <- struct{}{}
	<-g.gate
	g.cur.Add(-1)
	defer g.finished.Add(1)
	return g.Disk.ReadAt(p, off)
}

func waitN(t *testing.T, ch <-chan struct{}, n int, what string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %s (%d of %d)", what, i, n)
		}
	}
}

// waitUntil polls cond until it holds, failing the test after 10 seconds.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestNBDOutOfOrderReplies(t *testing.T) {
	var g *gateDisk
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 4 << 20,
		wrap: func(d blockdev.Disk) blockdev.Disk { g = newGateDisk(d); return g }})
	t.Cleanup(g.open)
	const reads, writes = 32, 8
	// Give every 4 KiB block of the first MiB its own content.
	for i := 0; i < reads; i++ {
		if _, err := f.disks["vm1/disk0"].WriteAt(pattern(byte(i), 4096), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	c := openExport(t, f.sock, "vm1/disk0")
	for i := 0; i < reads; i++ {
		c.send(cmdRead, 0, uint64(100+i), uint64(i)*4096, 4096, nil)
	}
	// All reads are inside the disk at once: they run concurrently.
	waitN(t, g.started, reads, "concurrent reads")
	for i := 0; i < writes; i++ {
		c.send(cmdWrite, 0, uint64(500+i), 2<<20+uint64(i)*8192, 8192, pattern(byte(50+i), 8192))
	}
	// The writes, sent after the reads, are answered while the reads wait.
	seen := map[uint64]bool{}
	for i := 0; i < writes; i++ {
		errno, h := c.reply()
		if errno != 0 || h < 500 || h >= 500+writes || seen[h] {
			t.Fatalf("reply %d: error %d handle %d; want a write reply first", i, errno, h)
		}
		seen[h] = true
	}
	if n := g.finished.Load(); n != 0 {
		t.Fatalf("%d reads finished before the gate opened", n)
	}
	g.open()
	for i := 0; i < reads; i++ {
		errno, h := c.reply()
		if errno != 0 || h < 100 || h >= 100+reads || seen[h] {
			t.Fatalf("read reply: error %d handle %d", errno, h)
		}
		seen[h] = true
		if got := c.read(4096); !bytes.Equal(got, pattern(byte(h-100), 4096)) {
			t.Fatalf("read with handle %d got the data of another request", h)
		}
	}
	for i := 0; i < writes; i++ {
		if got := f.fileBytes("vm1/disk0", 2<<20+int64(i)*8192, 8192); !bytes.Equal(got, pattern(byte(50+i), 8192)) {
			t.Fatalf("write %d not on disk", i)
		}
	}
}

func TestNBDInFlightLimit(t *testing.T) {
	var g *gateDisk
	f := newFixture(t, blockdev.NBDConfig{MaxInFlight: 4}, exportSpec{name: "vm1/disk0", size: 1 << 20,
		wrap: func(d blockdev.Disk) blockdev.Disk { g = newGateDisk(d); return g }})
	t.Cleanup(g.open)
	c := openExport(t, f.sock, "vm1/disk0")
	const n = 24
	for i := 0; i < n; i++ {
		c.send(cmdRead, 0, uint64(i), uint64(i)*512, 512, nil)
	}
	waitN(t, g.started, 4, "reads to start")
	g.open()
	for i := 0; i < n; i++ {
		if errno, _ := c.reply(); errno != 0 {
			t.Fatalf("error %d", errno)
		}
		c.read(512)
	}
	if m := g.max.Load(); m != 4 {
		t.Fatalf("%d reads in the disk at once, want the limit of 4", m)
	}
}

func TestNBDDisconnectFinishesInFlight(t *testing.T) {
	var g *gateDisk
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 1 << 20,
		wrap: func(d blockdev.Disk) blockdev.Disk { g = newGateDisk(d); return g }})
	t.Cleanup(g.open)
	c := openExport(t, f.sock, "vm1/disk0")
	c.send(cmdWrite, 0, 1, 0, 512, pattern(9, 512))
	c.send(cmdRead, 0, 2, 0, 512, nil)
	waitN(t, g.started, 1, "the read")
	c.send(cmdDisc, 0, 3, 0, 0, nil)
	if errno, h := c.reply(); errno != 0 || h != 1 {
		t.Fatalf("write reply: error %d handle %d", errno, h)
	}
	g.open()
	if errno, h := c.reply(); errno != 0 || h != 2 {
		t.Fatalf("read reply after DISC: error %d handle %d", errno, h)
	}
	c.read(512)
	c.expectClosed()
}

// recDisk records the Disk calls that change data or durability.
type recDisk struct {
	blockdev.Disk
	mu  sync.Mutex
	ops []string
}

func (r *recDisk) log(op string) {
	r.mu.Lock()
	r.ops = append(r.ops, op)
	r.mu.Unlock()
}

func (r *recDisk) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ops := r.ops
	r.ops = nil
	return ops
}

func (r *recDisk) WriteAt(p []byte, off int64) (int, error) {
	n, err := r.Disk.WriteAt(p, off)
	r.log(fmt.Sprintf("write %d+%d", off, len(p)))
	return n, err
}

func (r *recDisk) Flush() error {
	err := r.Disk.Flush()
	r.log("flush")
	return err
}

func (r *recDisk) Trim(off, n int64) error {
	err := r.Disk.Trim(off, n)
	r.log(fmt.Sprintf("trim %d+%d", off, n))
	return err
}

func (r *recDisk) Zero(off, n int64, punch bool) error {
	err := r.Disk.Zero(off, n, punch)
	r.log(fmt.Sprintf("zero %d+%d punch=%v", off, n, punch))
	return err
}

func TestNBDWriteCacheCommands(t *testing.T) {
	var rec *recDisk
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 64 << 20,
		wrap: func(d blockdev.Disk) blockdev.Disk { rec = &recDisk{Disk: d}; return rec }})
	c := openExport(t, f.sock, "vm1/disk0")
	c.mustDo(cmdWrite, 0, 0, 1<<20, pattern(4, 1<<20))
	for _, tt := range []struct {
		name  string
		typ   uint16
		flags uint16
		off   uint64
		n     uint32
		want  []string
	}{
		{"write", cmdWrite, 0, 4096, 512, []string{"write 4096+512"}},
		{"write FUA", cmdWrite, cmdFlagFUA, 8192, 512, []string{"write 8192+512", "flush"}},
		{"flush", cmdFlush, 0, 0, 0, []string{"flush"}},
		{"trim", cmdTrim, 0, 0, 65536, []string{"trim 0+65536"}},
		{"trim FUA", cmdTrim, cmdFlagFUA, 65536, 65536, []string{"trim 65536+65536", "flush"}},
		{"write zeroes", cmdZeroes, 0, 131072, 4096, []string{"zero 131072+4096 punch=true"}},
		{"write zeroes NO_HOLE", cmdZeroes, cmdFlagNoHole, 135168, 4096, []string{"zero 135168+4096 punch=false"}},
		{"write zeroes NO_HOLE FUA", cmdZeroes, cmdFlagNoHole | cmdFlagFUA, 139264, 4096, []string{"zero 139264+4096 punch=false", "flush"}},
		{"trim longer than the maximum request", cmdTrim, 0, 1 << 20, 48 << 20, []string{"trim 1048576+50331648"}},
	} {
		rec.take()
		var payload []byte
		if tt.typ == cmdWrite {
			payload = pattern(5, int(tt.n))
		}
		c.mustDo(tt.typ, tt.flags, tt.off, tt.n, payload)
		if got := rec.take(); !slices.Equal(got, tt.want) {
			t.Errorf("%s: disk saw %q before the reply, want %q", tt.name, got, tt.want)
		}
	}
	// Everything up to 140 KiB was trimmed or zeroed; the rest of the
	// first write is intact.
	got := c.mustDo(cmdRead, 0, 0, 147456, nil)
	if !bytes.Equal(got[:143360], make([]byte, 143360)) || !bytes.Equal(got[143360:], pattern(4, 1<<20)[143360:147456]) {
		t.Error("data after write/trim/zero is wrong")
	}
}

func TestNBDManyClients(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "vm1/disk0", size: 8 << 20},
		exportSpec{name: "vm2/disk0", size: 8 << 20},
	)
	const clients = 8
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		export := []string{"vm1/disk0", "vm2/disk0"}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("unix", f.sock)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			if err := clientRoundTrip(c, export, i); err != nil {
				t.Errorf("client %d on %s: %v", i, export, err)
			}
		}()
	}
	wg.Wait()
	for i := 0; i < clients; i++ {
		export := []string{"vm1/disk0", "vm2/disk0"}[i%2]
		if got := f.fileBytes(export, int64(i)*(1<<20), 1<<20); !bytes.Equal(got, pattern(byte(i), 1<<20)) {
			t.Errorf("client %d's data is not on %s", i, export)
		}
	}
}

// clientRoundTrip is a minimal pipelining client for use off the test
// goroutine: it writes a 1 MiB region in 64 KiB pieces, flushes and reads it
// back, all requests in flight at once.
func clientRoundTrip(c net.Conn, export string, i int) error {
	br := bufio.NewReader(c)
	if _, err := io.ReadFull(br, make([]byte, 18)); err != nil {
		return err
	}
	b := binary.BigEndian.AppendUint32(nil, cFixed|cNoZeroes)
	b = append(b, "IHAVEOPT"...)
	b = binary.BigEndian.AppendUint32(b, optGo)
	d := infoData(export)
	b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
	if _, err := c.Write(append(b, d...)); err != nil {
		return err
	}
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(br, h); err != nil {
			return err
		}
		if _, err := io.CopyN(io.Discard, br, int64(binary.BigEndian.Uint32(h[16:]))); err != nil {
			return err
		}
		if typ := binary.BigEndian.Uint32(h[12:]); typ == repAck {
			break
		} else if typ != repInfo {
			return fmt.Errorf("GO reply %#x", typ)
		}
	}
	base := uint64(i) << 20
	data := pattern(byte(i), 1<<20)
	req := func(typ uint16, h, off uint64, n uint32) []byte {
		b := binary.BigEndian.AppendUint32(nil, 0x25609513)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, h)
		b = binary.BigEndian.AppendUint64(b, off)
		return binary.BigEndian.AppendUint32(b, n)
	}
	var out []byte
	for k := uint64(0); k < 16; k++ {
		out = append(req(cmdWrite, k, base+k<<16, 1<<16), data[k<<16:(k+1)<<16]...)
		if _, err := c.Write(out); err != nil {
			return err
		}
	}
	for k := 0; k < 16; k++ {
		h := make([]byte, 16)
		if _, err := io.ReadFull(br, h); err != nil {
			return err
		}
		if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
			return fmt.Errorf("write error %d", e)
		}
	}
	if _, err := c.Write(req(cmdFlush, 99, 0, 0)); err != nil {
		return err
	}
	for k := uint64(0); k < 16; k++ {
		if _, err := c.Write(req(cmdRead, 100+k, base+k<<16, 1<<16)); err != nil {
			return err
		}
	}
	got := make([]byte, 1<<20)
	for k := 0; k < 17; k++ {
		h := make([]byte, 16)
		if _, err := io.ReadFull(br, h); err != nil {
			return err
		}
		if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
			return fmt.Errorf("error %d", e)
		}
		handle := binary.BigEndian.Uint64(h[8:])
		if handle == 99 {
			continue
		}
		k := handle - 100
		if _, err := io.ReadFull(br, got[k<<16:(k+1)<<16]); err != nil {
			return err
		}
	}
	if !bytes.Equal(got, data) {
		return errors.New("read back different data")
	}
	_, err := c.Write(req(cmdDisc, 200, 0, 0))
	return err
}

func TestNBDLifecycle(t *testing.T) {
	type event struct {
		connect  bool
		export   string
		writable bool
	}
	events := make(chan event, 16)
	cfg := blockdev.NBDConfig{
		OnConnect:    func(e string, w bool) { events <- event{true, e, w} },
		OnDisconnect: func(e string, w bool) { events <- event{false, e, w} },
	}
	var g *gateDisk
	f := newFixture(t, cfg,
		exportSpec{name: "vm1/disk0", size: 1 << 20},
		exportSpec{name: "vm1/ro", size: 1 << 20, ro: true},
		exportSpec{name: "vm2/disk0", size: 1 << 20, wrap: func(d blockdev.Disk) blockdev.Disk { g = newGateDisk(d); return g }},
	)
	t.Cleanup(g.open)
	next := func(want event) {
		t.Helper()
		select {
		case got := <-events:
			if got != want {
				t.Fatalf("event %+v, want %+v", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no event, want %+v", want)
		}
	}

	rw := openExport(t, f.sock, "vm1/disk0")
	next(event{true, "vm1/disk0", true})
	ro := openExport(t, f.sock, "vm1/ro")
	next(event{true, "vm1/ro", false})
	clients := f.srv.Clients()
	sort.Slice(clients, func(i, j int) bool { return clients[i].Export < clients[j].Export })
	if len(clients) != 2 || clients[0].Export != "vm1/disk0" || !clients[0].Writable || clients[1].Export != "vm1/ro" || clients[1].Writable {
		t.Fatalf("Clients() = %+v", clients)
	}

	// Withdrawing an export ends its connections, and only those.
	f.cat.remove("vm1/disk0")
	if n := f.srv.CloseExport("vm1/disk0"); n != 1 {
		t.Fatalf("CloseExport closed %d connections, want 1", n)
	}
	next(event{false, "vm1/disk0", true})
	rw.expectClosed()
	ro.mustDo(cmdRead, 0, 0, 512, nil)
	c := dial(t, f.sock)
	c.hello(cFixed | cNoZeroes)
	if _, errTyp := c.info(optGo, "vm1/disk0"); errTyp != repErrUnknown {
		t.Fatalf("GO on a withdrawn export: %#x", errTyp)
	}

	// A second listener with its own context: cancelling it ends its
	// connections but not the others.
	ctx, cancel := context.WithCancel(context.Background())
	sock2 := filepath.Join(filepath.Dir(f.sock), "second.sock")
	l2, err := net.Listen("unix", sock2)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.srv.Serve(ctx, l2) }()
	c2 := openExport(t, sock2, "vm1/ro")
	next(event{true, "vm1/ro", false})
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context was cancelled")
	}
	next(event{false, "vm1/ro", false})
	c2.expectClosed()
	ro.mustDo(cmdRead, 0, 0, 512, nil)

	// Close waits for in-flight requests and replies to them first.
	slow := openExport(t, f.sock, "vm2/disk0")
	next(event{true, "vm2/disk0", true})
	slow.send(cmdRead, 0, 42, 0, 512, nil)
	waitN(t, g.started, 1, "the read")
	closed := make(chan bool, 1)
	go func() {
		f.srv.Close()
		closed <- g.finished.Load() == 1
	}()
	// Let the read finish only once Close is under way (it closes the
	// listeners first).
	waitUntil(t, "Close to close the listener", func() bool {
		c, err := net.Dial("unix", f.sock)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case <-closed:
		t.Fatal("Close returned while a request was in flight")
	default:
	}
	g.open()
	select {
	case finished := <-closed:
		if !finished {
			t.Fatal("Close returned before the in-flight read finished")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if errno, h := slow.reply(); errno != 0 || h != 42 {
		t.Fatalf("in-flight read at Close: error %d handle %d", errno, h)
	}
	slow.read(512)
	slow.expectClosed()
	ro.expectClosed()
	got := map[event]int{}
	for len(events) > 0 {
		got[<-events]++
	}
	if got[event{false, "vm1/ro", false}] != 1 || got[event{false, "vm2/disk0", true}] != 1 || len(got) != 2 {
		t.Fatalf("events at Close: %v", got)
	}
	if err := f.srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	l3, err := net.Listen("unix", filepath.Join(filepath.Dir(f.sock), "third.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.srv.Serve(context.Background(), l3); err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
	if _, err := l3.Accept(); err == nil {
		t.Fatal("Serve after Close left the listener open")
	}
}

// benchPipeline drives n requests of one kind at queue depth qd over one
// connection and reports throughput; allocations per op include the client's,
// which reuses its buffers.
func benchPipeline(b *testing.B, typ uint16, bs int, qd int) {
	benchPipelineOn(b, typ, bs, qd, nil)
}

// benchPipelineOn is benchPipeline, over TLS (STARTTLS, then tlsPair's
// configurations) when tlsPair is set.
func benchPipelineOn(b *testing.B, typ uint16, bs int, qd int, tlsPair *[2]*tls.Config) {
	f := &fixture{sock: filepath.Join(b.TempDir(), "nbd.sock"), cat: &catalogue{}}
	d, err := fakedisk.Create(filepath.Join(b.TempDir(), "disk.img"), 256<<20)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	f.cat.set(blockdev.Export{Name: "vm1/disk0", Disk: d})
	cfg := blockdev.NBDConfig{Exports: f.cat}
	if tlsPair != nil {
		cfg.TLS = tlsPair[0]
	}
	srv := blockdev.NewNBDServer(cfg)
	defer srv.Close()
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		b.Fatal(err)
	}
	if tlsPair != nil {
		go srv.ServeTLS(context.Background(), l)
	} else {
		go srv.Serve(context.Background(), l)
	}
	var conn net.Conn
	conn, err = net.Dial("unix", f.sock)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReaderSize(conn, 256<<10)
	if _, err := io.ReadFull(br, make([]byte, 18)); err != nil {
		b.Fatal(err)
	}
	hs := binary.BigEndian.AppendUint32(nil, cFixed|cNoZeroes)
	if tlsPair != nil {
		hs = append(hs, "IHAVEOPT"...)
		hs = binary.BigEndian.AppendUint32(hs, optStartTLS)
		hs = binary.BigEndian.AppendUint32(hs, 0)
		conn.Write(hs)
		if _, err := io.ReadFull(br, make([]byte, 20)); err != nil {
			b.Fatal(err)
		}
		tc := tls.Client(conn, tlsPair[1])
		if err := tc.Handshake(); err != nil {
			b.Fatal(err)
		}
		conn, br, hs = tc, bufio.NewReaderSize(tc, 256<<10), nil
	}
	hs = append(hs, "IHAVEOPT"...)
	hs = binary.BigEndian.AppendUint32(hs, optGo)
	data := infoData("vm1/disk0")
	hs = binary.BigEndian.AppendUint32(hs, uint32(len(data)))
	conn.Write(append(hs, data...))
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(br, h); err != nil {
			b.Fatal(err)
		}
		io.CopyN(io.Discard, br, int64(binary.BigEndian.Uint32(h[16:])))
		if binary.BigEndian.Uint32(h[12:]) == repAck {
			break
		}
	}
	tokens := make(chan struct{}, qd)
	for i := 0; i < qd; i++ {
		tokens <- struct{}{}
	}
	blocks := (256 << 20) / bs
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	done := make(chan error, 1)
	go func() {
		h := make([]byte, 16)
		payload := make([]byte, bs)
		for i := 0; i < b.N; i++ {
			if _, err := io.ReadFull(br, h); err != nil {
				done <- err
				return
			}
			if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
				done <- fmt.Errorf("error %d", e)
				return
			}
			if typ == cmdRead {
				if _, err := io.ReadFull(br, payload); err != nil {
					done <- err
					return
				}
			}
			tokens <- struct{}{}
		}
		done <- nil
	}()
	bw := bufio.NewWriterSize(conn, 256<<10)
	req := make([]byte, 28)
	payload := pattern(1, bs)
	rnd := uint64(1)
	for i := 0; i < b.N; i++ {
		<-tokens
		off := uint64(i % blocks)
		if bs < 1<<20 { // random offsets for small blocks
			rnd = rnd*6364136223846793005 + 1442695040888963407
			off = (rnd >> 33) % uint64(blocks)
		}
		binary.BigEndian.PutUint32(req, 0x25609513)
		binary.BigEndian.PutUint16(req[4:], 0)
		binary.BigEndian.PutUint16(req[6:], typ)
		binary.BigEndian.PutUint64(req[8:], uint64(i))
		binary.BigEndian.PutUint64(req[16:], off*uint64(bs))
		binary.BigEndian.PutUint32(req[24:], uint32(bs))
		bw.Write(req)
		if typ == cmdWrite {
			bw.Write(payload)
		}
		if len(tokens) == 0 {
			bw.Flush()
		}
	}
	bw.Flush()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkNBDRandWrite4KQD16(b *testing.B) { benchPipeline(b, cmdWrite, 4096, 16) }
func BenchmarkNBDRandRead4KQD16(b *testing.B)  { benchPipeline(b, cmdRead, 4096, 16) }
func BenchmarkNBDSeqWrite1MQD4(b *testing.B)   { benchPipeline(b, cmdWrite, 1<<20, 4) }
func BenchmarkNBDSeqRead1MQD4(b *testing.B)    { benchPipeline(b, cmdRead, 1<<20, 4) }

func TestNBDOverTCP(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 1 << 20})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.srv.Serve(context.Background(), l) }()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	defer nc.Close()
	c := &rawClient{t: t, c: nc, br: bufio.NewReader(nc)}
	c.open("vm1/disk0")
	c.mustDo(cmdWrite, cmdFlagFUA, 4096, 8192, pattern(7, 8192))
	if got := c.mustDo(cmdRead, 0, 4096, 8192, nil); !bytes.Equal(got, pattern(7, 8192)) {
		t.Fatal("TCP read back wrong data")
	}
	if cl := f.srv.Clients(); len(cl) != 1 || !strings.HasPrefix(cl[0].Remote, "tcp:127.0.0.1:") {
		t.Fatalf("Clients() = %+v", cl)
	}
	f.srv.Close()
	if err := <-served; err != nil {
		t.Fatalf("Serve on TCP after Close: %v", err)
	}
	c.expectClosed()
}

// rcvDisk is a Disk that receives large write payloads itself
// (blockdev.Receiver), as the journal does; it logs which way each write came.
type rcvDisk struct {
	recDisk
	fail error // returned by the write function of a received write
}

func (r *rcvDisk) ReceiveMin() int { return 64 << 10 }

func (r *rcvDisk) ReceiveWrite(rd io.Reader, n int) (func(off int64) error, error) {
	buf := make([]byte, n)
	if _, err := io.ReadFull(rd, buf); err != nil {
		return nil, err
	}
	return func(off int64) error {
		r.log(fmt.Sprintf("received %d+%d", off, n))
		if r.fail != nil {
			return r.fail
		}
		_, err := r.Disk.WriteAt(buf, off)
		return err
	}, nil
}

// TestNBDReceiver: writes of at least ReceiveMin bytes go to a Receiver disk
// through ReceiveWrite (with FUA, the flush after them), smaller ones through
// WriteAt; the data reads back; a received write that fails is answered with
// its error and the connection goes on.
func TestNBDReceiver(t *testing.T) {
	var rd *rcvDisk
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 64 << 20,
		wrap: func(d blockdev.Disk) blockdev.Disk { rd = &rcvDisk{recDisk: recDisk{Disk: d}}; return rd }})
	c := openExport(t, f.sock, "vm1/disk0")
	for _, tt := range []struct {
		flags uint16
		off   uint64
		n     uint32
		want  []string
	}{
		{0, 0, 1 << 20, []string{"received 0+1048576"}},
		{cmdFlagFUA, 1 << 20, 64 << 10, []string{"received 1048576+65536", "flush"}},
		{0, 2 << 20, 64<<10 - 512, []string{"write 2097152+65024"}},
		{0, 3<<20 + 512, 32 << 20, []string{"received 3146240+33554432"}},
	} {
		rd.take()
		p := pattern(byte(tt.off>>16), int(tt.n))
		c.mustDo(cmdWrite, tt.flags, tt.off, tt.n, p)
		if got := rd.take(); !slices.Equal(got, tt.want) {
			t.Errorf("write %d+%d: disk saw %q, want %q", tt.off, tt.n, got, tt.want)
		}
		if got := c.mustDo(cmdRead, 0, tt.off, tt.n, nil); !bytes.Equal(got, p) {
			t.Errorf("write %d+%d: reads back different data", tt.off, tt.n)
		}
	}
	rd.fail = syscall.ENOSPC
	c.expectError("received write failing with ENOSPC", errENOSPC, cmdWrite, 0, 0, 1<<20, pattern(9, 1<<20))
	rd.fail = nil
	if got := c.mustDo(cmdRead, 0, 0, 1<<20, nil); !bytes.Equal(got, pattern(0, 1<<20)) { // the first write
		t.Error("a failed received write changed the disk")
	}
}
