package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/journal"
)

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

// Replication fetches replication status (vm "" = all).
func (c *Client) Replication(ctx context.Context, vm string) (Replication, error) {
	var out Replication
	p := "/v1/replication"
	if vm != "" {
		p += "?vm=" + url.QueryEscape(vm)
	}
	err := c.do(ctx, http.MethodGet, p, nil, &out)
	return out, err
}

// EnableReplication enables replication of a VM; with check the daemon
// first asks the replica whether it takes this primary for the VM.
func (c *Client) EnableReplication(ctx context.Context, vm string, s ReplicationSpec, check bool) (ReplicationSpec, error) {
	var out ReplicationSpec
	p := "/v1/vms/" + url.PathEscape(vm) + "/replication"
	if !check {
		p += "?check=0"
	}
	err := c.do(ctx, http.MethodPost, p, s, &out)
	return out, err
}

// SetReplication changes a running replication of a VM.
func (c *Client) SetReplication(ctx context.Context, vm string, ch ReplicationChange) (ReplicationChanged, error) {
	var out ReplicationChanged
	err := c.do(ctx, http.MethodPatch, "/v1/vms/"+url.PathEscape(vm)+"/replication", ch, &out)
	return out, err
}

// Unfence makes a fenced VM writable again; force says the admin accepts
// the risk.
func (c *Client) Unfence(ctx context.Context, vm string, force bool) error {
	p := "/v1/vms/" + url.PathEscape(vm) + "/unfence"
	if force {
		p += "?force=1"
	}
	return c.do(ctx, http.MethodPost, p, nil, nil)
}

// DisableReplication disables replication of a VM.
func (c *Client) DisableReplication(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/replication", nil, nil)
}

// SyncReplication closes a cycle now (app: with the guest quiesced) and
// waits until the replica applied it. A timeout > 0 bounds the wait in the
// daemon, whose answer then says what it was waiting for; the request
// itself is given syncGrace more, so that answer arrives.
func (c *Client) SyncReplication(ctx context.Context, vm string, app bool, timeout time.Duration) (uint64, error) {
	var out SyncResult
	q := url.Values{}
	if app {
		q.Set("app", "1")
	}
	if timeout > 0 {
		q.Set("timeout", timeout.String())
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout+syncGrace)
		defer cancel()
	}
	p := "/v1/vms/" + url.PathEscape(vm) + "/replication/sync"
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	err := c.do(ctx, http.MethodPost, p, nil, &out)
	return out.Cycle, err
}

// syncGrace is how much longer than its timeout a sync request may take:
// the daemon's answer after its own deadline.
const syncGrace = 5 * time.Second

// ReplicationControl pauses, resumes or resyncs.
func (c *Client) ReplicationControl(ctx context.Context, vm, op string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/"+url.PathEscape(op), nil, nil)
}

// AllowList lists the replica role's allow-list.
func (c *Client) AllowList(ctx context.Context) ([]apply.AllowEntry, error) {
	var out []apply.AllowEntry
	err := c.do(ctx, http.MethodGet, "/v1/replica/allow", nil, &out)
	return out, err
}

// Allow adds an allow-list entry.
func (c *Client) Allow(ctx context.Context, e apply.AllowEntry) error {
	return c.do(ctx, http.MethodPost, "/v1/replica/allow", e, nil)
}

// Disallow removes an allow-list entry.
func (c *Client) Disallow(ctx context.Context, pattern string) error {
	return c.do(ctx, http.MethodDelete, "/v1/replica/allow?primary="+url.QueryEscape(pattern), nil, nil)
}

// RemoveReplica removes a replica VM on the replica host; with
// deleteImages its images are deleted too.
func (c *Client) RemoveReplica(ctx context.Context, vm string, deleteImages bool) (ReplicaRemoved, error) {
	var out ReplicaRemoved
	p := "/v1/replica/vms/" + url.PathEscape(vm)
	if deleteImages {
		p += "?delete_images=1"
	}
	err := c.do(ctx, http.MethodDelete, p, nil, &out)
	return out, err
}

// ImportInitial loads an offline initial copy on the replica.
func (c *Client) ImportInitial(ctx context.Context, vm, dir string) error {
	return c.do(ctx, http.MethodPost, "/v1/replica/import", ImportRequest{VM: vm, Dir: dir}, nil)
}

// Points lists a replica VM's recovery points.
func (c *Client) Points(ctx context.Context, vm string) (PointsInfo, error) {
	var out PointsInfo
	err := c.do(ctx, http.MethodGet, "/v1/points/"+url.PathEscape(vm), nil, &out)
	return out, err
}

// VerifyPoint reads recovery point id of a replica VM back and compares it
// with the block-tree roots recorded when it was taken.
func (c *Client) VerifyPoint(ctx context.Context, vm, id string) (apply.PointCheck, error) {
	var out apply.PointCheck
	err := c.do(ctx, http.MethodPost, "/v1/points/"+url.PathEscape(vm)+"/"+url.PathEscape(id)+"/verify", nil, &out)
	return out, err
}

// Failover runs a failover operation: test, unplanned (both with a point,
// "" = the latest state), stop-test, complete, cancel.
func (c *Client) Failover(ctx context.Context, vm, op, point string) (FailoverResult, error) {
	var out FailoverResult
	p := "/v1/failover/" + url.PathEscape(vm) + "/" + url.PathEscape(op)
	if point != "" {
		p += "?point=" + url.QueryEscape(point)
	}
	err := c.do(ctx, http.MethodPost, p, nil, &out)
	return out, err
}

// FailoverPlanned hands a VM over to its replica and waits until it
// replicates back.
func (c *Client) FailoverPlanned(ctx context.Context, vm string, force bool, reverseTo string) (PlannedResult, error) {
	var out PlannedResult
	q := url.Values{}
	if force {
		q.Set("force", "1")
	}
	if reverseTo != "" {
		q.Set("reverse_to", reverseTo)
	}
	err := c.do(ctx, http.MethodPost, "/v1/failover/"+url.PathEscape(vm)+"/planned?"+q.Encode(), nil, &out)
	return out, err
}

// Reverse replicates a failed-over VM back to its old primary.
func (c *Client) Reverse(ctx context.Context, vm string, s ReplicationSpec) (ReplicationSpec, error) {
	var out ReplicationSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/reverse", s, &out)
	return out, err
}

// Extend passes a replica VM on to a third host.
func (c *Client) Extend(ctx context.Context, vm string, s ExtendSpec) (ExtendSpec, error) {
	var out ExtendSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/extend", s, &out)
	return out, err
}

// StopExtend ends the extension of a replica VM.
func (c *Client) StopExtend(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/replication/extend", nil, nil)
}

// Doctor fetches the daemon's DoctorInfo, with the proxies for replicas.
func (c *Client) Doctor(ctx context.Context, replicas ...string) (DoctorInfo, error) {
	q := url.Values{"replica": replicas}
	var out DoctorInfo
	err := c.do(ctx, http.MethodGet, "/v1/doctor?"+q.Encode(), nil, &out)
	return out, err
}
