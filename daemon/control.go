package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/journal"
)

// The control API: JSON over HTTP on the daemon's unix socket.
//
//	GET    /v1/status            Status
//	GET    /v1/vms               []VMInfo
//	POST   /v1/vms               VMSpec -> VMSpec
//	DELETE /v1/vms/{name}
//	POST   /v1/vms/{name}/seal   -> journal.CycleInfo
//	POST   /v1/mount             {"mountpoint": P}; streams one JSON line when
//	                             mounted and one when unmounted; the mount
//	                             lives as long as the request.
//	POST   /v1/unmount           {"mountpoint": P}
//
// Errors: a non-2xx status and {"error": "one line"}.

type apiError struct {
	Error string `json:"error"`
}

// Status is the daemon's overall state.
type Status struct {
	StateDir     string   `json:"state_dir"`
	LastShutdown string   `json:"last_shutdown"`
	NBD          []string `json:"nbd"`
	Mounts       []string `json:"mounts"`
	VMs          []VMInfo `json:"vms"`
	// Identity is this host's certificate name; ReplicaListen where the
	// replica role listens ("" = off).
	Identity      string   `json:"identity,omitempty"`
	ReplicaListen string   `json:"replica_listen,omitempty"`
	MetricsListen string   `json:"metrics_listen,omitempty"`
	Warnings      []string `json:"warnings,omitempty"`
	// Tests are the test failovers running on this host.
	Tests []TestFailoverInfo `json:"test_failovers,omitempty"`
}

// Status reports the daemon's state.
func (d *Daemon) Status() Status {
	vms := d.VMs()
	tests := d.TestFailovers()
	d.mu.Lock()
	defer d.mu.Unlock()
	s := Status{StateDir: d.cfg.StateDir, LastShutdown: d.lastShutdown, NBD: append([]string(nil), d.listeners...), VMs: vms,
		ReplicaListen: d.replicaAddr, MetricsListen: d.metricsAddr, Tests: tests}
	if d.identity != nil {
		s.Identity = d.identity.Name()
		s.Warnings = d.identity.Warnings(time.Now())
	}
	if d.identityErr != nil {
		s.Warnings = append(s.Warnings, d.identityErr.Error())
	}
	for p := range d.mounts {
		s.Mounts = append(s.Mounts, p)
	}
	return s
}

func (d *Daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, d.Status(), nil)
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		reply(w, d.VMs(), nil)
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var s VMSpec
		if err := decode(r, &s); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := d.AddVM(s)
		reply(w, out, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, d.RemoveVM(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/vms/{name}/seal", func(w http.ResponseWriter, r *http.Request) {
		info, err := d.Seal(r.PathValue("name"), 0)
		reply(w, info, err)
	})
	d.replicationRoutes(mux)
	d.failoverRoutes(mux)
	d.doctorRoutes(mux)
	mux.HandleFunc("POST /v1/mount", d.handleMount)
	mux.HandleFunc("POST /v1/unmount", func(w http.ResponseWriter, r *http.Request) {
		var req MountEvent
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		d.mu.Lock()
		m, ok := d.mounts[filepath.Clean(req.Mountpoint)]
		d.mu.Unlock()
		if !ok {
			reply(w, nil, fmt.Errorf("%w: %s is not a vdrepl mount", ErrInvalid, req.Mountpoint))
			return
		}
		reply(w, struct{}{}, d.unmount(m))
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrUnknownVM):
			code = http.StatusNotFound
		case errors.Is(err, ErrExists), errors.Is(err, ErrInUse):
			code = http.StatusConflict
		case errors.Is(err, ErrInvalid):
			code = http.StatusBadRequest
		}
		w.WriteHeader(code)
		v = apiError{Error: err.Error()}
	}
	json.NewEncoder(w).Encode(v)
}

// MountEvent is one line of the mount stream.
type MountEvent struct {
	Mounted    string `json:"mounted,omitempty"`
	Unmounted  string `json:"unmounted,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
}

func (d *Daemon) handleMount(w http.ResponseWriter, r *http.Request) {
	var req MountEvent
	if err := decode(r, &req); err != nil {
		reply(w, nil, err)
		return
	}
	m, err := d.mount(req.Mountpoint)
	if err != nil {
		reply(w, nil, err)
		return
	}
	req.Mountpoint = filepath.Clean(req.Mountpoint)
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	enc.Encode(MountEvent{Mounted: req.Mountpoint})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	select {
	case <-r.Context().Done(): // the CLI went away (SIGINT, SIGTERM, killed)
		d.unmount(m)
	case <-m.Done(): // fusermount3 -u, or the daemon is stopping
	}
	d.mu.Lock()
	delete(d.mounts, req.Mountpoint)
	d.mu.Unlock()
	d.log.Info("unmounted", "mountpoint", req.Mountpoint)
	enc.Encode(MountEvent{Unmounted: req.Mountpoint})
}

// unmount ends a mount. When a file is still open (a loop device, say) the
// mount point is detached lazily: it disappears from the namespace now and
// the filesystem goes away when the last file closes.
func (d *Daemon) unmount(m *blockdev.FUSEMount) error {
	err := m.Unmount()
	if err == nil {
		return nil
	}
	if derr := unix.Unmount(m.Mountpoint(), unix.MNT_DETACH); derr != nil {
		return err
	}
	d.log.Warn("mount busy; detached lazily, it ends when the last file closes", "mountpoint", m.Mountpoint(), "err", err)
	return nil
}

func (d *Daemon) mount(mp string) (*blockdev.FUSEMount, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !filepath.IsAbs(mp) {
		return nil, fmt.Errorf("%w: mount point %q must be absolute", ErrInvalid, mp)
	}
	mp = filepath.Clean(mp)
	st, err := os.Stat(mp)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: mount point %s does not exist", ErrInvalid, mp)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: mount point %s: %v", ErrInvalid, mp, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%w: mount point %s is not a directory", ErrInvalid, mp)
	}
	d.mu.Lock()
	_, busy := d.mounts[mp]
	closed := d.closed
	d.mu.Unlock()
	if busy {
		return nil, fmt.Errorf("%w: %s is already a vdrepl mount", ErrInUse, mp)
	}
	if closed {
		return nil, errors.New("daemon is stopping")
	}
	m, err := blockdev.MountFUSE(mp, blockdev.FUSEConfig{
		Exports: (*exports)(d),
		Logger:  d.log,
		OnOpen: func(export string, _ bool) {
			d.mu.Lock()
			d.fuseOpen[export]++
			d.mu.Unlock()
		},
		OnRelease: func(export string, _ bool) {
			d.mu.Lock()
			if d.fuseOpen[export]--; d.fuseOpen[export] <= 0 {
				delete(d.fuseOpen, export)
			}
			d.mu.Unlock()
		},
	})
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.mounts[mp] = m
	d.mu.Unlock()
	d.log.Info("mounted", "mountpoint", mp)
	return m, nil
}

// Client talks to a daemon's control socket.
type Client struct {
	hc *http.Client
}

// NewClient returns a client for the control socket at path.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			c, err := dl.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, fmt.Errorf("cannot reach the vdrepl daemon at %s (is `vdrepl serve` running? --control or VDREPL_CONTROL name another socket): %w", socket, err)
			}
			return c, nil
		},
	}
	return &Client{hc: &http.Client{Transport: tr}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return readReply(resp, out)
}

// send makes one request with a JSON body (nil: none) and returns the
// response whatever its status; transport errors lose their URL wrapping,
// which would only name the placeholder host.
func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vdrepl"+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, err
	}
	return resp, nil
}

func readReply(resp *http.Response, out any) error {
	if resp.StatusCode/100 != 2 {
		var e apiError
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || e.Error == "" {
			return fmt.Errorf("daemon answered %s", resp.Status)
		}
		return errors.New(e.Error)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status fetches the daemon's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// VMs lists the registered VMs.
func (c *Client) VMs(ctx context.Context) ([]VMInfo, error) {
	var v []VMInfo
	err := c.do(ctx, http.MethodGet, "/v1/vms", nil, &v)
	return v, err
}

// AddVM registers a VM.
func (c *Client) AddVM(ctx context.Context, s VMSpec) (VMSpec, error) {
	var out VMSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms", s, &out)
	return out, err
}

// RemoveVM unregisters a VM.
func (c *Client) RemoveVM(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(name), nil, nil)
}

// Seal closes a VM's open cycle now.
func (c *Client) Seal(ctx context.Context, name string) (journal.CycleInfo, error) {
	var info journal.CycleInfo
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/seal", nil, &info)
	return info, err
}

// Mount asks the daemon to mount its disks at mountpoint, calls mounted once
// they are there, and returns when the mount ends: once ctx is cancelled it
// asks the daemon to unmount and waits until it has; it also returns when
// something else (fusermount3 -u) unmounted it. If this process dies, the
// daemon unmounts on its own when the connection drops.
func (c *Client) Mount(ctx context.Context, mountpoint string, mounted func()) error {
	streamCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		uctx, ucancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer ucancel()
		if err := c.do(uctx, http.MethodPost, "/v1/unmount", MountEvent{Mountpoint: mountpoint}, nil); err != nil {
			cancel() // the daemon unmounts when the stream drops
		}
	})
	defer stop()
	resp, err := c.send(streamCtx, http.MethodPost, "/v1/mount", MountEvent{Mountpoint: mountpoint})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return readReply(resp, nil)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev MountEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("mount stream: %w", err)
		}
		if ev.Mounted != "" && mounted != nil {
			mounted()
		}
		if ev.Unmounted != "" {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("mount stream: %w", err)
	}
	return errors.New("the daemon ended the mount without saying why (did it stop?)")
}
