package daemon

import (
	"context"
	"net/http"
	"net/url"
)

// The recovery point and failover part of the control API.
//
//	GET  /v1/points/{vm}                       PointsInfo
//	POST /v1/failover/{vm}/test[?point=ID]     FailoverResult
//	POST /v1/failover/{vm}/stop-test
//	POST /v1/failover/{vm}/unplanned[?point=ID] FailoverResult
//	POST /v1/failover/{vm}/complete
//	POST /v1/failover/{vm}/cancel
//	POST /v1/failover/{vm}/planned[?force=1][&reverse_to=HOST:PORT]  PlannedResult
//	POST /v1/vms/{vm}/replication/reverse   ReplicationSpec -> ReplicationSpec
//	POST   /v1/vms/{vm}/replication/extend  ExtendSpec -> ExtendSpec
//	DELETE /v1/vms/{vm}/replication/extend
func (d *Daemon) failoverRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/vms/{vm}/replication/extend", func(w http.ResponseWriter, r *http.Request) {
		var spec ExtendSpec
		if err := decode(r, &spec); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := d.ExtendReplication(r.PathValue("vm"), spec)
		reply(w, out, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{vm}/replication/extend", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, d.StopExtend(r.PathValue("vm")))
	})
	mux.HandleFunc("POST /v1/vms/{vm}/replication/reverse", func(w http.ResponseWriter, r *http.Request) {
		var spec ReplicationSpec
		if err := decode(r, &spec); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := d.Reverse(r.PathValue("vm"), spec)
		reply(w, out, err)
	})
	mux.HandleFunc("GET /v1/points/{vm}", func(w http.ResponseWriter, r *http.Request) {
		out, err := d.Points(r.PathValue("vm"))
		reply(w, out, err)
	})
	mux.HandleFunc("POST /v1/failover/{vm}/{op}", func(w http.ResponseWriter, r *http.Request) {
		vm, point := r.PathValue("vm"), r.URL.Query().Get("point")
		var out any = struct{}{}
		var err error
		switch op := r.PathValue("op"); op {
		case "test":
			out, err = d.FailoverTest(vm, point)
		case "stop-test":
			err = d.StopTest(vm)
		case "unplanned":
			out, err = d.FailoverUnplanned(vm, point)
		case "planned":
			out, err = d.FailoverPlanned(r.Context(), vm, r.URL.Query().Get("force") == "1", r.URL.Query().Get("reverse_to"))
		case "complete":
			err = d.CompleteFailover(vm)
		case "cancel":
			err = d.CancelFailover(vm)
		default:
			http.NotFound(w, r)
			return
		}
		reply(w, out, err)
	})
}

// Points lists a replica VM's recovery points.
func (c *Client) Points(ctx context.Context, vm string) (PointsInfo, error) {
	var out PointsInfo
	err := c.do(ctx, http.MethodGet, "/v1/points/"+url.PathEscape(vm), nil, &out)
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

// Extend passes a replica VM on to a third host; StopExtend ends it.
func (c *Client) Extend(ctx context.Context, vm string, s ExtendSpec) (ExtendSpec, error) {
	var out ExtendSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/extend", s, &out)
	return out, err
}

func (c *Client) StopExtend(ctx context.Context, vm string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/replication/extend", nil, nil)
}

// Reverse replicates a failed-over VM back to its old primary.
func (c *Client) Reverse(ctx context.Context, vm string, s ReplicationSpec) (ReplicationSpec, error) {
	var out ReplicationSpec
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/replication/reverse", s, &out)
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
