package ship

import (
	"context"
	"crypto/rand"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// env is one primary and one fake replica on loopback with real TLS
// certificates from internal/pki, the primary going through a proxy that
// can cut or damage the connection.
type env struct {
	t       *testing.T
	dir     string
	pkiDir  string
	j       *fakeJournal
	rep     *fakeReplica
	srv     *httptest.Server
	px      *proxy
	primary *pki.Identity
	cfg     Config
	chunk   int64
	// rootsWait, if set, replaces the shipper's wait for a cycle's roots.
	rootsWait time.Duration
	// log holds what the shipper logged.
	log *logBuffer
}

// logBuffer keeps log lines for a test to look at.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newEnv(t *testing.T, sizes ...int64) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, dir: dir, pkiDir: filepath.Join(dir, "pki"), chunk: 64 << 10, log: &logBuffer{}}
	if _, err := pki.Init(e.pkiDir, pki.InitOptions{Name: "test"}); err != nil {
		t.Fatal(err)
	}
	rid := e.identity("replica", "127.0.0.1")
	e.primary = e.identity("primary")
	e.rep = newFakeReplica("primary")
	e.rep.t = t
	e.srv = httptest.NewUnstartedServer(e.rep.handler())
	e.srv.TLS = rid.ServerConfig()
	e.srv.Config.ErrorLog = log.New(tWriter{t}, "replica: ", 0)
	e.srv.StartTLS()
	t.Cleanup(e.srv.Close)
	e.px = newProxy(t, e.srv.Listener.Addr().String())
	e.j = newFakeJournal(sizes...)
	var disks []wire.Disk
	for i, n := range sizes {
		disks = append(disks, wire.Disk{Name: "disk" + string(rune('0'+i)), Size: n})
	}
	e.cfg = Config{
		VM: "vm1", Disks: disks, Journal: e.j,
		Replica: e.px.addr(), TLS: e.primary.ClientConfig("127.0.0.1"), BypassProxy: true,
		Compress: true, Frequency: time.Hour, StateFile: filepath.Join(dir, "state", "vm1.json"),
		RetryScale: 0.0005, PieceSize: 256 << 10, ResyncWindow: "00:00-00:00",
		Logger: slog.New(slog.NewTextHandler(io.MultiWriter(tWriter{t}, e.log), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	return e
}

func (e *env) identity(name string, sans ...string) *pki.Identity {
	e.t.Helper()
	f, err := pki.Issue(e.pkiDir, name, pki.IssueOptions{SANs: sans})
	if err != nil {
		e.t.Fatal(err)
	}
	id, err := pki.Load(f.Cert, f.Key, f.CA)
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

// tWriter sends log lines to t.Log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// run is a Shipper running in the background.
type run struct {
	s      *Shipper
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

func (r *run) stop() {
	r.once.Do(func() {
		r.cancel()
		<-r.done
		r.s.Close()
	})
}

// start runs a Shipper with cfg until the test ends (or stop).
func (e *env) start(cfg Config) *run {
	e.t.Helper()
	s, err := New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	s.chunk = e.chunk
	if e.rootsWait != 0 {
		s.rootsWait = e.rootsWait
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &run{s: s, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		if err := s.Run(ctx); err != nil {
			e.t.Errorf("Run: %v", err)
		}
	}()
	e.t.Cleanup(r.stop)
	return r
}

// waitFor waits until cond holds, waking at every change of s and every
// few milliseconds (for conditions on the fake replica), for at most 30s.
func waitFor(t *testing.T, s *Shipper, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		ch := s.changed
		s.mu.Unlock()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-tick.C:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; status %+v", what, s.Status())
		}
	}
}

func waitState(t *testing.T, s *Shipper, state string) {
	t.Helper()
	waitFor(t, s, "state "+state, func() bool { return s.Status().State == state })
}

// waitReplicating waits for the initial copy to end.
func waitReplicating(t *testing.T, s *Shipper) {
	t.Helper()
	waitFor(t, s, "replicating", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.st.InitialDone && s.st.Sync == nil
	})
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func syncCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// checkImages compares the replica's disks with the journal's at barrier c.
func (e *env) checkImages(c uint64) {
	e.t.Helper()
	for d := range e.cfg.Disks {
		got, want := e.rep.image(e.cfg.VM, d), e.j.barrier(c, d)
		if want == nil {
			e.t.Fatalf("no barrier %d", c)
		}
		if string(got) != string(want) {
			e.t.Fatalf("disk %d of the replica differs from the primary at cycle %d (first difference at %d)", d, c, firstDiff(got, want))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
