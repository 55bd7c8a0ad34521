package apply

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// logBuffer keeps what a Server logs and passes it on to t.Log.
type logBuffer struct {
	t  *testing.T
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.b.Write(p)
	l.mu.Unlock()
	l.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// answer is what the handler wrote for one request.
type answer struct {
	status int
	body   bytes.Buffer
}

type recorder struct {
	http.ResponseWriter
	a *answer
}

func (r recorder) WriteHeader(status int) {
	r.a.status = status
	r.ResponseWriter.WriteHeader(status)
}

func (r recorder) Write(p []byte) (int, error) {
	if r.a.status == 0 {
		r.a.status = http.StatusOK
	}
	r.a.body.Write(p)
	return r.ResponseWriter.Write(p)
}

// TestCutChunkIsNotCorrupt sends chunks through the real HTTP handler over
// TLS from a client that gives up mid-body, closing the connection or
// resetting it, and one whose complete body fails its checksum (issue 15,
// item 14). A cut is logged and answered as a cut connection: code
// "offset" with the staged offset, from which the primary resumes, no
// Corrupt event, and neither "corrupt" nor "checksum" anywhere; nothing is
// staged and the chunk sent again is taken. A damaged chunk stays corrupt.
func TestCutChunkIsNotCorrupt(t *testing.T) {
	p := newPKI(t)
	logs := &logBuffer{t: t}
	ev := &events{}
	srv, err := New(Config{StateDir: filepath.Join(t.TempDir(), "state"), Events: ev.hooks(),
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	answers := make(chan *answer, 1)
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a := &answer{}
		srv.Handler().ServeHTTP(recorder{w, a}, r)
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/uploads/") {
			answers <- a
		}
	}))
	ts.TLS = p.identity(replicaHost).ServerConfig()
	ts.StartTLS()
	t.Cleanup(func() {
		ts.Close()
		srv.Close()
	})
	if err := srv.Allow(AllowEntry{Primary: "a.example.com", Storage: filepath.Join(t.TempDir(), "storage")}); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: p.identity("a.example.com").ClientConfig(replicaHost)}
	t.Cleanup(tr.CloseIdleConnections)
	c := &client{t: t, name: "a.example.com", hc: &http.Client{Transport: tr}, base: ts.URL}
	c.enable("vm1", testDisks)

	chunk := randBytes(14, 64<<10)
	const sent = 20000
	// put sends a chunk at offset 0 of c1 on a connection of its own:
	// declared as the whole chunk, with its CRC32C (crc), of which body is
	// written; then the connection is closed (reset: with an RST, without
	// TLS's close_notify) unless wait, which reads the answer.
	put := func(body []byte, crc uint32, how string) {
		t.Helper()
		raw, err := net.Dial("tcp", ts.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		conn := tls.Client(raw, p.identity("a.example.com").ClientConfig(replicaHost))
		fmt.Fprintf(conn, "PUT /v1/replicas/vm1/uploads/c1?offset=0 HTTP/1.1\r\nHost: %s\r\n%s: %08x\r\nContent-Length: %d\r\n\r\n",
			replicaHost, wire.ChunkCRCHeader, crc, len(chunk))
		if _, err := conn.Write(body); err != nil {
			t.Fatal(err)
		}
		switch how {
		case "close":
			conn.Close()
		case "reset":
			raw.(*net.TCPConn).SetLinger(0)
			raw.Close()
		case "wait":
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	offset := func() int64 {
		t.Helper()
		var u wire.Upload
		if status, e := c.call("GET", vmPath("vm1")+"/uploads/c1", nil, &u); status != 200 {
			t.Fatalf("upload offset: %d %+v", status, e)
		}
		return u.Offset
	}

	for _, tc := range []struct {
		name, how string
		body      []byte
		crc       uint32
		status    int
		code      string
		says      []string // in the answer's message and the log
		never     []string // in neither
	}{
		{name: "closed mid-body", how: "close", body: chunk[:sent], crc: wire.CRC(chunk),
			status: http.StatusConflict, code: wire.CodeOffset,
			says:  []string{fmt.Sprintf("upload of c1 cut after %d bytes of the chunk at offset 0: connection closed", sent)},
			never: []string{"corrupt", "checksum"}},
		{name: "reset mid-body", how: "reset", body: chunk[:sent], crc: wire.CRC(chunk),
			status: http.StatusConflict, code: wire.CodeOffset,
			says:  []string{"upload of c1 cut after", "connection closed"},
			never: []string{"corrupt", "checksum"}},
		{name: "whole but damaged", how: "wait", body: chunk, crc: wire.CRC(chunk) ^ 1,
			status: http.StatusBadRequest, code: wire.CodeCorrupt,
			says: []string{"chunk checksum mismatch"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(logs.String())
			put(tc.body, tc.crc, tc.how)
			var a *answer
			select {
			case a = <-answers:
			case <-time.After(30 * time.Second):
				t.Fatal("the handler did not return")
			}
			var e wire.Error
			if err := json.Unmarshal(a.body.Bytes(), &e); err != nil {
				t.Fatalf("answer %d %q: %v", a.status, a.body.String(), err)
			}
			logged := logs.String()[before:]
			if a.status != tc.status || e.Code != tc.code || e.Offset != 0 {
				t.Errorf("answer %d %+v, want %d code %q offset 0", a.status, e, tc.status, tc.code)
			}
			if !strings.Contains(logged, "code="+tc.code) {
				t.Errorf("code %q not logged:\n%s", tc.code, logged)
			}
			for _, s := range tc.says {
				if !strings.Contains(e.Message, s) || !strings.Contains(logged, s) {
					t.Errorf("%q is not in both the answer %q and the log:\n%s", s, e.Message, logged)
				}
			}
			for _, s := range tc.never {
				if strings.Contains(strings.ToLower(e.Message), s) || strings.Contains(strings.ToLower(logged), s) {
					t.Errorf("%q in the answer %q or the log:\n%s", s, e.Message, logged)
				}
			}
			if got := ev.get(&ev.corrupt); tc.code == wire.CodeOffset && len(got) != 0 {
				t.Errorf("Corrupt events %q for a cut connection", got)
			}
			if off := offset(); off != 0 {
				t.Errorf("%d bytes staged after a chunk that was not taken", off)
			}
		})
	}
	// The primary resumes at the offset it was given: the chunk is taken.
	if status, up, e := c.chunk("vm1", "c1", 0, chunk); status != 200 || up.Offset != int64(len(chunk)) {
		t.Fatalf("chunk sent again: %d %+v %+v", status, up, e)
	}
}
