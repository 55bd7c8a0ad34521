package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/vdrepl/vdrepl/ship"
)

// VerifyRequest asks for a verify of a VM this host replicates
// (POST /v1/vms/{name}/verify).
type VerifyRequest struct {
	// Rate bounds the reads of the primary's images (ship.ParseBandwidth);
	// "" is ship.DefaultVerifyRate.
	Rate string `json:"rate,omitempty"`
	// DryRun only reports; otherwise mismatches start a resync now.
	DryRun bool `json:"dry_run,omitempty"`
}

// VerifyEvent is one line of a verify's answer: progress while it runs (at
// most one a second), then the result or the error that ended it.
type VerifyEvent struct {
	Progress *ship.VerifyProgress `json:"progress,omitempty"`
	Result   *ship.VerifyResult   `json:"result,omitempty"`
	Error    string               `json:"error,omitempty"`
}

// VerifyHost scrubs replicated VMs against their replica.
type VerifyHost interface {
	// Verify runs a verify of vm until it ends or ctx is done, calling
	// progress as it goes.
	Verify(ctx context.Context, vm string, req VerifyRequest, progress func(ship.VerifyProgress)) (ship.VerifyResult, error)
}

// progressEvery is how often a verify's answer carries progress.
const progressEvery = time.Second

func verifyRoutes(mux *http.ServeMux, h VerifyHost) {
	mux.HandleFunc("POST /v1/vms/{name}/verify", func(w http.ResponseWriter, r *http.Request) {
		var req VerifyRequest
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		enc := json.NewEncoder(w)
		streaming := false
		start := func() {
			if !streaming {
				w.Header().Set("Content-Type", "application/x-ndjson")
				streaming = true
			}
		}
		var last time.Time
		res, err := h.Verify(r.Context(), r.PathValue("name"), req, func(p ship.VerifyProgress) {
			if time.Since(last) < progressEvery {
				return
			}
			last = time.Now()
			start()
			enc.Encode(VerifyEvent{Progress: &p})
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
		})
		if err != nil && !streaming {
			reply(w, nil, err)
			return
		}
		start()
		if err != nil {
			enc.Encode(VerifyEvent{Error: err.Error()})
			return
		}
		enc.Encode(VerifyEvent{Result: &res})
	})
}

// Verify runs a verify of vm on the daemon, calling progress (if not nil)
// with the progress lines it sends, and returns its result.
func (c *Client) Verify(ctx context.Context, vm string, req VerifyRequest, progress func(ship.VerifyProgress)) (ship.VerifyResult, error) {
	resp, err := c.send(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/verify", req)
	if err != nil {
		return ship.VerifyResult{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return ship.VerifyResult{}, readReply(resp, nil)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		var ev VerifyEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return ship.VerifyResult{}, fmt.Errorf("verify answer: %w", err)
		}
		switch {
		case ev.Error != "":
			return ship.VerifyResult{}, errors.New(ev.Error)
		case ev.Result != nil:
			return *ev.Result, nil
		case ev.Progress != nil && progress != nil:
			progress(*ev.Progress)
		}
	}
	if err := sc.Err(); err != nil {
		return ship.VerifyResult{}, fmt.Errorf("verify answer: %w", err)
	}
	return ship.VerifyResult{}, errors.New("the daemon ended the verify without a result (did it stop?)")
}
