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
func (d *Daemon) failoverRoutes(mux *http.ServeMux) {
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
