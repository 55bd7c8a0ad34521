package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/journal"
)

// fakeHost answers the routes the tests use and records each call; any
// other method is the nil embedded Host's and panics.
type fakeHost struct {
	Host

	mu        sync.Mutex
	calls     []string
	vms       map[string]VMSpec
	unmounted chan struct{}
}

func newFakeHost() *fakeHost {
	return &fakeHost{vms: map[string]VMSpec{"web1": {Name: "web1"}}, unmounted: make(chan struct{})}
}

func (f *fakeHost) record(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeHost) lastCall() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.calls) == 0 {
		return ""
	}
	return f.calls[len(f.calls)-1]
}

func (f *fakeHost) Status() Status {
	return Status{StateDir: "/state", LastShutdown: "clean", Mounts: []string{"/mnt"}}
}

func (f *fakeHost) AddVM(s VMSpec) (VMSpec, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.vms[s.Name]; ok {
		return s, fmt.Errorf("%w: VM %s is already registered", ErrExists, s.Name)
	}
	s.Created = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	f.vms[s.Name] = s
	return s, nil
}

func (f *fakeHost) RemoveVM(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.vms[name]; !ok {
		return fmt.Errorf("%w: %s", ErrUnknownVM, name)
	}
	delete(f.vms, name)
	return nil
}

func (f *fakeHost) Seal(name string, flags uint64) (journal.CycleInfo, error) {
	f.record("Seal %s %d", name, flags)
	return journal.CycleInfo{}, errors.New("journal closed")
}

func (f *fakeHost) SyncReplication(_ context.Context, vm string, app bool) (uint64, error) {
	f.record("SyncReplication %s %v", vm, app)
	return 42, nil
}

func (f *fakeHost) EnableReplication(_ context.Context, vm string, s ReplicationSpec, check bool) (ReplicationSpec, error) {
	f.record("EnableReplication %s %s %v", vm, s.Replica, check)
	return s, nil
}

func (f *fakeHost) SetReplication(_ context.Context, vm string, c ReplicationChange) (ReplicationChanged, error) {
	f.record("SetReplication %s %v %v", vm, time.Duration(*c.Frequency), c.Force)
	return ReplicationChanged{VM: vm, Changed: []string{"frequency"}, Spec: ReplicationSpec{Frequency: *c.Frequency}}, nil
}

func (f *fakeHost) Unfence(vm string, force bool) error {
	f.record("Unfence %s %v", vm, force)
	if !force {
		return fmt.Errorf("%w: VM %s is fenced; --force", ErrInvalid, vm)
	}
	return nil
}

func (f *fakeHost) ReplicationControl(vm, op string) error {
	f.record("ReplicationControl %s %s", vm, op)
	return nil
}

func (f *fakeHost) ExtendReplication(vm string, s ExtendSpec) (ExtendSpec, error) {
	f.record("ExtendReplication %s %s", vm, s.Replica)
	return s, nil
}

func (f *fakeHost) FailoverPlanned(_ context.Context, vm string, force bool, reverseTo string) (PlannedResult, error) {
	f.record("FailoverPlanned %s %v %s", vm, force, reverseTo)
	return PlannedResult{VM: vm, To: "r:8443", Cycle: 9, Reversed: true}, nil
}

func (f *fakeHost) FailoverTest(vm, point string) (FailoverResult, error) {
	f.record("FailoverTest %s %s", vm, point)
	return FailoverResult{VM: vm, Point: point, Exports: []string{vm + "-test/disk"}}, nil
}

func (f *fakeHost) DoctorInfo(replicas []string) DoctorInfo {
	f.record("DoctorInfo %s", strings.Join(replicas, ","))
	return DoctorInfo{StateDir: "/state", Proxies: map[string]string{}}
}

func (f *fakeHost) Mount(ctx context.Context, mp string, mounted func()) error {
	if mp == "/busy" {
		return fmt.Errorf("%w: %s is already a vdrepl mount", ErrInUse, mp)
	}
	mounted()
	select {
	case <-ctx.Done():
	case <-f.unmounted:
	}
	f.record("Mount %s ended", mp)
	return nil
}

func (f *fakeHost) Unmount(mp string) error {
	f.record("Unmount %s", mp)
	close(f.unmounted)
	return nil
}

// serve serves NewHandler(h) on a unix socket, as the daemon does, and
// returns a client of it.
func serve(t *testing.T, h Host) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "control.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: NewHandler(h)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return NewClient(sock)
}

// TestRoutes checks the status, content type and body of raw requests, as
// any client of the socket sees them.
func TestRoutes(t *testing.T) {
	f := newFakeHost()
	c := serve(t, f)
	for _, tc := range []struct {
		method, path, body string
		code               int
		ctype, answer      string
		call               string // the Host call the request makes, "" = none recorded
	}{
		{"GET", "/v1/status", "", 200, "application/json",
			`{"state_dir":"/state","last_shutdown":"clean","nbd":null,"mounts":["/mnt"],"vms":null}`, ""},
		{"POST", "/v1/vms", `{"name":"db1","disks":[{"name":"root","path":"/i/root.img","size":4096}]}`, 200, "application/json",
			`{"name":"db1","disks":[{"name":"root","path":"/i/root.img","size":4096}],"created":"2026-01-02T03:04:05Z"}`, ""},
		{"POST", "/v1/vms", `{"name":"web1"}`, 409, "application/json",
			`{"error":"already exists: VM web1 is already registered"}`, ""},
		{"POST", "/v1/vms", `{"name":"x","colour":"red"}`, 400, "application/json",
			`{"error":"invalid request: json: unknown field \"colour\""}`, ""},
		{"DELETE", "/v1/vms/nope", "", 404, "application/json", `{"error":"unknown VM: nope"}`, ""},
		{"DELETE", "/v1/vms/db1", "", 200, "application/json", `{}`, ""},
		{"POST", "/v1/vms/web1/seal", "", 500, "application/json", `{"error":"journal closed"}`, "Seal web1 0"},
		{"POST", "/v1/vms/web1/replication/sync?app=1", "", 200, "application/json", `{"cycle":42}`, "SyncReplication web1 true"},
		{"POST", "/v1/vms/web1/replication/pause", "", 200, "application/json", `{}`, "ReplicationControl web1 pause"},
		{"POST", "/v1/vms/web1/replication", `{"replica":"r:8443","frequency":"30s","compression":true,"initial":"network","enabled":"0001-01-01T00:00:00Z"}`, 200, "application/json",
			`{"replica":"r:8443","frequency":"30s","compression":true,"initial":"network","enabled":"0001-01-01T00:00:00Z"}`, "EnableReplication web1 r:8443 true"},
		{"POST", "/v1/vms/web1/replication?check=0", `{"replica":"r:8443","frequency":"30s","compression":true,"initial":"network","enabled":"0001-01-01T00:00:00Z"}`, 200, "application/json",
			`{"replica":"r:8443","frequency":"30s","compression":true,"initial":"network","enabled":"0001-01-01T00:00:00Z"}`, "EnableReplication web1 r:8443 false"},
		{"PATCH", "/v1/vms/web1/replication", `{"frequency":"1m0s","force":true}`, 200, "application/json",
			`{"vm":"web1","spec":{"replica":"","frequency":"1m0s","compression":false,"initial":"","enabled":"0001-01-01T00:00:00Z"},"changed":["frequency"],"new_replica":false,"same_replica":false}`, "SetReplication web1 1m0s true"},
		{"PATCH", "/v1/vms/web1/replication", `{"frequency":"1m0s","colour":"red"}`, 400, "application/json",
			`{"error":"invalid request: json: unknown field \"colour\""}`, ""},
		{"POST", "/v1/vms/web1/unfence", "", 400, "application/json", `{"error":"invalid request: VM web1 is fenced; --force"}`, "Unfence web1 false"},
		{"POST", "/v1/vms/web1/unfence?force=1", "", 200, "application/json", `{}`, "Unfence web1 true"},
		{"POST", "/v1/vms/web1/replication/extend", `{"replica":"c:8443","frequency":"30s","compression":true,"enabled":"0001-01-01T00:00:00Z"}`, 200, "application/json",
			`{"replica":"c:8443","frequency":"30s","compression":true,"enabled":"0001-01-01T00:00:00Z"}`, "ExtendReplication web1 c:8443"},
		{"POST", "/v1/failover/web1/planned?force=1&reverse_to=p%3A8443", "", 200, "application/json",
			`{"vm":"web1","to":"r:8443","cycle":9,"reversed":true}`, "FailoverPlanned web1 true p:8443"},
		{"POST", "/v1/failover/web1/test?point=h3", "", 200, "application/json",
			`{"vm":"web1","point":"h3","exports":["web1-test/disk"]}`, "FailoverTest web1 h3"},
		{"POST", "/v1/mount", `{"mountpoint":"/busy"}`, 409, "application/json",
			`{"error":"in use: /busy is already a vdrepl mount"}`, ""},
		{"POST", "/v1/failover/web1/bogus", "", 404, "text/plain; charset=utf-8", "404 page not found", ""},
		{"GET", "/v1/failover/web1/test", "", 405, "text/plain; charset=utf-8", "Method Not Allowed", ""},
		{"GET", "/v1/doctor?replica=a%3A1&replica=b%3A2", "", 200, "application/json",
			`{"state_dir":"/state","nbd":null,"journal_cap":0,"proxies":{}}`, "DoctorInfo a:1,b:2"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			before := f.lastCall()
			var in any
			if tc.body != "" {
				in = rawJSON(tc.body)
			}
			resp, err := c.send(t.Context(), tc.method, tc.path, in)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.code {
				t.Errorf("status %d, want %d", resp.StatusCode, tc.code)
			}
			if ct := resp.Header.Get("Content-Type"); ct != tc.ctype {
				t.Errorf("Content-Type %q, want %q", ct, tc.ctype)
			}
			if got := strings.TrimSpace(string(b)); got != tc.answer {
				t.Errorf("answer\n%s\nwant\n%s", got, tc.answer)
			}
			if call := f.lastCall(); tc.call != "" && call != tc.call {
				t.Errorf("host call %q, want %q", call, tc.call)
			} else if tc.call == "" && call != before {
				t.Errorf("unexpected host call %q", call)
			}
		})
	}
}

// rawJSON is a request body sent as it is.
type rawJSON string

func (r rawJSON) MarshalJSON() ([]byte, error) { return []byte(r), nil }

// TestClient goes through the Client's methods: answers decode into the
// API's types and an error answer becomes an error with its message.
func TestClient(t *testing.T) {
	f := newFakeHost()
	c := serve(t, f)
	ctx := t.Context()

	st, err := c.Status(ctx)
	if err != nil || st.StateDir != "/state" || !slices.Equal(st.Mounts, []string{"/mnt"}) {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	spec, err := c.AddVM(ctx, VMSpec{Name: "db1", Disks: []DiskSpec{{Name: "root", Path: "/i/root.img", Size: 4096}}})
	if err != nil || spec.Created.IsZero() || len(spec.Disks) != 1 {
		t.Fatalf("AddVM = %+v, %v", spec, err)
	}
	if err := c.RemoveVM(ctx, "nope"); err == nil || err.Error() != "unknown VM: nope" {
		t.Errorf("RemoveVM of an unknown VM: %v", err)
	}
	if n, err := c.SyncReplication(ctx, "web1", false, 0); err != nil || n != 42 || f.lastCall() != "SyncReplication web1 false" {
		t.Errorf("SyncReplication = %d, %v (host call %q)", n, err, f.lastCall())
	}
	res, err := c.Failover(ctx, "web1", "test", "h3")
	if err != nil || res.Point != "h3" || !slices.Equal(res.Exports, []string{"web1-test/disk"}) {
		t.Errorf("Failover test = %+v, %v", res, err)
	}
	if _, err := c.Failover(ctx, "web1", "bogus", ""); err == nil || err.Error() != "daemon answered 404 Not Found" {
		t.Errorf("Failover bogus: %v", err)
	}
	if _, err := c.Seal(ctx, "web1"); err == nil || err.Error() != "journal closed" {
		t.Errorf("Seal: %v", err)
	}
}

// TestMount runs the mount stream: the client sees the mount, cancels,
// asks the daemon to unmount, and returns once the stream says unmounted.
func TestMount(t *testing.T) {
	f := newFakeHost()
	c := serve(t, f)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var mounted bool
	if err := c.Mount(ctx, "/mnt/./", func() { mounted = true; cancel() }); err != nil {
		t.Fatal(err)
	}
	if !mounted {
		t.Error("mounted was not called")
	}
	f.mu.Lock()
	calls := slices.Clone(f.calls)
	f.mu.Unlock()
	if want := []string{"Unmount /mnt/./", "Mount /mnt/./ ended"}; !slices.Equal(calls, want) {
		t.Errorf("host calls %q, want %q", calls, want)
	}

	err := c.Mount(t.Context(), "/busy", func() { t.Error("mounted called for a failed mount") })
	if err == nil || err.Error() != "in use: /busy is already a vdrepl mount" {
		t.Errorf("Mount of a busy mount point: %v", err)
	}
}
