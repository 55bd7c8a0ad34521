package apply

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

const replicaHost = "replica.test"

// testPKI is a CA in a temporary directory and the identities it issued.
type testPKI struct {
	t   *testing.T
	dir string
	ids map[string]*pki.Identity
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{t: t, dir: t.TempDir(), ids: map[string]*pki.Identity{}}
	if _, err := pki.Init(p.dir, pki.InitOptions{Name: "test"}); err != nil {
		t.Fatal(err)
	}
	return p
}

// identity issues (once) and loads a certificate for name.
func (p *testPKI) identity(name string) *pki.Identity {
	p.t.Helper()
	if id := p.ids[name]; id != nil {
		return id
	}
	files, err := pki.Issue(p.dir, name, pki.IssueOptions{SANs: []string{"127.0.0.1"}})
	if err != nil {
		p.t.Fatal(err)
	}
	id, err := pki.Load(files.Cert, files.Key, files.CA)
	if err != nil {
		p.t.Fatal(err)
	}
	p.ids[name] = id
	return id
}

// tlogWriter sends log lines to t.Log.
type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// events records the callbacks a Server makes.
type events struct {
	mu        sync.Mutex
	applied   []string
	rejected  []string
	corrupt   []string
	recovered []string
	synced    []uint64
	verified  []string
	diverged  []string
}

func (e *events) hooks() Events {
	return Events{
		CycleApplied: func(vm string, c uint64) { e.add(&e.applied, fmt.Sprintf("%s/%d", vm, c)) },
		Rejected:     func(vm, peer, reason string) { e.add(&e.rejected, vm+"/"+peer) },
		Corrupt:      func(vm, id string, err error) { e.add(&e.corrupt, vm+"/"+id) },
		Recovered:    func(vm, what string) { e.add(&e.recovered, vm+"/"+what) },
		SyncFinished: func(vm string, gen uint64) { e.mu.Lock(); e.synced = append(e.synced, gen); e.mu.Unlock() },
		Verified:     func(vm string, c uint64) { e.add(&e.verified, fmt.Sprintf("%s/%d", vm, c)) },
		Diverged:     func(vm string, c uint64, disks []string) { e.add(&e.diverged, fmt.Sprintf("%s/%d/%v", vm, c, disks)) },
	}
}

func (e *events) add(list *[]string, s string) {
	e.mu.Lock()
	*list = append(*list, s)
	e.mu.Unlock()
}

func (e *events) get(list *[]string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), *list...)
}

// harness is a replica Server behind a real TLS listener.
type harness struct {
	t        *testing.T
	pki      *testPKI
	stateDir string
	storage  string
	fs       vfs.FS
	ev       *events
	ts       *httptest.Server

	mu  sync.Mutex
	srv *Server
	// clock, when set before a restart, is the Server's clock from then
	// on; else it is fixed.
	clock func() time.Time
}

func newHarness(t *testing.T, fsys vfs.FS) *harness {
	t.Helper()
	h := &harness{
		t:        t,
		pki:      newPKI(t),
		stateDir: filepath.Join(t.TempDir(), "state"),
		storage:  filepath.Join(t.TempDir(), "storage"),
		fs:       fsys,
		ev:       &events{},
	}
	h.srv = h.newServer(fsys)
	h.ts = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.server().Handler().ServeHTTP(w, r)
	}))
	h.ts.TLS = h.pki.identity(replicaHost).ServerConfig()
	h.ts.Config.ErrorLog = nil
	h.ts.StartTLS()
	t.Cleanup(func() {
		h.ts.Close()
		h.server().Close()
	})
	return h
}

func (h *harness) newServer(fsys vfs.FS) *Server {
	h.t.Helper()
	now := h.clock
	if now == nil {
		now = func() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) }
	}
	s, err := New(Config{StateDir: h.stateDir, FS: fsys, Logger: testLogger(h.t), Events: h.ev.hooks(), Now: now})
	if err != nil {
		h.t.Fatalf("New: %v", err)
	}
	return s
}

func (h *harness) server() *Server {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.srv
}

// restart closes the server and opens a new one on the same state, as a
// daemon restart does.
func (h *harness) restart(fsys vfs.FS) *Server {
	h.t.Helper()
	h.server().Close()
	s := h.newServer(fsys)
	h.mu.Lock()
	h.srv = s
	h.mu.Unlock()
	return s
}

func (h *harness) allow(pattern, storage, group string) {
	h.t.Helper()
	if err := h.server().Allow(AllowEntry{Primary: pattern, Storage: storage, TrustGroup: group}); err != nil {
		h.t.Fatalf("Allow: %v", err)
	}
}

// client is a primary talking to the harness with its certificate.
type client struct {
	t    *testing.T
	name string
	hc   *http.Client
	base string
}

func (h *harness) client(name string) *client {
	tr := &http.Transport{TLSClientConfig: h.pki.identity(name).ClientConfig(replicaHost)}
	h.t.Cleanup(tr.CloseIdleConnections)
	return &client{t: h.t, name: name, hc: &http.Client{Transport: tr}, base: h.ts.URL}
}

// do sends a request and returns the status and body.
func (c *client) do(method, path string, body []byte, hdr map[string]string) (int, []byte) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.StatusCode, b
}

// call sends a JSON request; a 2xx answer is decoded into out, any other
// into the returned wire.Error (which must be one).
func (c *client) call(method, path string, in, out any) (int, wire.Error) {
	c.t.Helper()
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			c.t.Fatal(err)
		}
	}
	status, b := c.do(method, path, body, nil)
	return c.decode(status, b, out)
}

func (c *client) decode(status int, b []byte, out any) (int, wire.Error) {
	c.t.Helper()
	var e wire.Error
	if status/100 != 2 {
		if err := json.Unmarshal(b, &e); err != nil || e.Code == "" {
			c.t.Fatalf("status %d with a body that is no wire.Error: %q", status, b)
		}
		return status, e
	}
	if out != nil && status != http.StatusNoContent {
		if err := json.Unmarshal(b, out); err != nil {
			c.t.Fatalf("decode %q: %v", b, err)
		}
	}
	return status, e
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func vmPath(vm string) string { return "/v1/replicas/" + vm }

func (c *client) enable(vm string, disks []wire.Disk) wire.Replica {
	c.t.Helper()
	var r wire.Replica
	if status, e := c.call("PUT", vmPath(vm), wire.Enable{Disks: disks}, &r); status != 200 {
		c.t.Fatalf("enable %s: %d %+v", vm, status, e)
	}
	return r
}

func (c *client) chunk(vm, id string, off int64, p []byte) (int, wire.Upload, wire.Error) {
	return c.chunkCRC(vm, id, off, p, wire.CRC(p))
}

func (c *client) chunkCRC(vm, id string, off int64, p []byte, crc uint32) (int, wire.Upload, wire.Error) {
	c.t.Helper()
	status, b := c.do("PUT", fmt.Sprintf("%s/uploads/%s?offset=%d", vmPath(vm), id, off), p,
		map[string]string{wire.ChunkCRCHeader: fmt.Sprintf("%08x", crc)})
	var u wire.Upload
	status, e := c.decode(status, b, &u)
	return status, u, e
}

// upload sends a stream in chunks of chunkSize, from what is staged.
func (c *client) upload(vm, id string, stream []byte) {
	c.t.Helper()
	var u wire.Upload
	if status, e := c.call("GET", vmPath(vm)+"/uploads/"+id, nil, &u); status != 200 {
		c.t.Fatalf("upload state %s: %d %+v", id, status, e)
	}
	for off := u.Offset; off < int64(len(stream)); {
		n := min(int64(chunkSize), int64(len(stream))-off)
		status, up, e := c.chunk(vm, id, off, stream[off:off+n])
		if status != 200 {
			c.t.Fatalf("chunk %s@%d: %d %+v", id, off, status, e)
		}
		off = up.Offset
	}
}

const chunkSize = 48 << 10

func (c *client) commit(vm, id string) (int, wire.Replica, wire.Error) {
	c.t.Helper()
	var r wire.Replica
	status, e := c.call("POST", vmPath(vm)+"/uploads/"+id+"/commit", nil, &r)
	return status, r, e
}

// send uploads and commits a stream, which must succeed.
func (c *client) send(vm, id string, stream []byte) wire.Replica {
	c.t.Helper()
	c.upload(vm, id, stream)
	status, r, e := c.commit(vm, id)
	if status != 200 {
		c.t.Fatalf("commit %s/%s: %d %+v", vm, id, status, e)
	}
	return r
}

// op is one frame of a test stream.
type op struct {
	t    wire.FrameType
	disk int
	off  int64
	n    int64  // for ranges
	data []byte // for data
}

func buildStream(t testing.TB, h wire.Header, ops []op) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := wire.NewWriter(&buf, h, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range ops {
		if o.t == wire.FrameData {
			err = w.Data(o.disk, o.off, o.data)
		} else {
			err = w.Range(o.t, o.disk, o.off, o.n)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// model is the expected content of a VM's disks.
type model [][]byte

func newModel(disks []wire.Disk) model {
	m := make(model, len(disks))
	for i, d := range disks {
		m[i] = make([]byte, d.Size)
	}
	return m
}

func (m model) clone() model {
	c := make(model, len(m))
	for i := range m {
		c[i] = bytes.Clone(m[i])
	}
	return c
}

func (m model) apply(ops []op) {
	for _, o := range ops {
		if o.t == wire.FrameData {
			copy(m[o.disk][o.off:], o.data)
		} else {
			clear(m[o.disk][o.off : o.off+o.n])
		}
	}
}

var testDisks = []wire.Disk{{Name: "d0", Size: 1 << 20}, {Name: "d1", Size: 768 << 10}}

var sealed = time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC)

func cycleHeader(vm string, cycle, prev uint64) wire.Header {
	return wire.Header{VM: vm, Kind: wire.KindCycle, Disks: testDisks, Cycle: cycle, Prev: prev,
		Sealed: sealed.Add(time.Duration(cycle) * time.Minute)}
}

// randomOps makes a cycle's frames: some ranges, then data.
func randomOps(r *rand.Rand, disks []wire.Disk, n int) []op {
	var ops []op
	for range n / 4 {
		d := r.IntN(len(disks))
		off := r.Int64N(disks[d].Size/4096) * 4096
		ln := min(disks[d].Size-off, (1+r.Int64N(16))*4096)
		t := []wire.FrameType{wire.FrameTrim, wire.FrameZero, wire.FrameZeroAlloc}[r.IntN(3)]
		ops = append(ops, op{t: t, disk: d, off: off, n: ln})
	}
	for range n {
		d := r.IntN(len(disks))
		off := r.Int64N(disks[d].Size - 1)
		ln := min(disks[d].Size-off, 1+r.Int64N(64<<10))
		data := make([]byte, ln)
		for i := range data {
			data[i] = byte(r.Uint32())
		}
		// Some compressible data too.
		if r.IntN(2) == 0 {
			for i := range data {
				data[i] = byte(i / 512)
			}
		}
		ops = append(ops, op{t: wire.FrameData, disk: d, off: off, data: data})
	}
	return ops
}

// randBytes is n incompressible bytes.
func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// readImages reads the VM's images through fsys.
func readImages(t *testing.T, fsys vfs.FS, dir string, disks []wire.Disk) model {
	t.Helper()
	m := make(model, len(disks))
	for i, d := range disks {
		b, err := vfs.ReadFile(fsys, filepath.Join(dir, d.Name+".img"))
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(b)) != d.Size {
			t.Fatalf("image %s has %d bytes, want %d", d.Name, len(b), d.Size)
		}
		m[i] = b
	}
	return m
}

func checkImages(t *testing.T, fsys vfs.FS, dir string, disks []wire.Disk, want model) {
	t.Helper()
	got := readImages(t, fsys, dir, disks)
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			first := 0
			for first < len(want[i]) && got[i][first] == want[i][first] {
				first++
			}
			t.Fatalf("image %s differs from the expected content, first at byte %d", disks[i].Name, first)
		}
	}
}

// readFile reads a file through the real filesystem, "" if it is missing.
func fileBytes(t *testing.T, fsys vfs.FS, name string) string {
	t.Helper()
	b, err := vfs.ReadFile(fsys, name)
	if err != nil {
		return ""
	}
	return string(b)
}
