package control

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/ship"
)

func (f *fakeHost) Verify(_ context.Context, vm string, req VerifyRequest, progress func(ship.VerifyProgress)) (ship.VerifyResult, error) {
	f.record("verify %s rate=%s dry=%v", vm, req.Rate, req.DryRun)
	if vm != "web1" {
		return ship.VerifyResult{}, fmt.Errorf("%w: %s", ErrUnknownVM, vm)
	}
	progress(ship.VerifyProgress{Done: 1, Total: 2})
	if req.Rate == "fail" {
		return ship.VerifyResult{}, fmt.Errorf("replica went away")
	}
	return ship.VerifyResult{VM: vm, CheckedBytes: 2, MismatchBlocks: 1, DryRun: req.DryRun}, nil
}

// A verify streams its progress and ends with the result; an error before
// any progress is a plain error, one after it ends the stream.
func TestVerifyStreamsProgressThenResult(t *testing.T) {
	h := newFakeHost()
	c := serve(t, h)
	var seen []ship.VerifyProgress
	res, err := c.Verify(context.Background(), "web1", VerifyRequest{Rate: "10MB/s", DryRun: true}, func(p ship.VerifyProgress) { seen = append(seen, p) })
	if err != nil || res.VM != "web1" || res.MismatchBlocks != 1 || !res.DryRun {
		t.Fatalf("verify: %+v, %v", res, err)
	}
	if len(seen) != 1 || seen[0].Done != 1 || seen[0].Total != 2 {
		t.Fatalf("progress: %+v", seen)
	}
	if got := h.lastCall(); got != "verify web1 rate=10MB/s dry=true" {
		t.Fatalf("call %q", got)
	}
	if _, err := c.Verify(context.Background(), "nope", VerifyRequest{}, nil); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("unknown VM: %v", err)
	}
	if _, err := c.Verify(context.Background(), "web1", VerifyRequest{Rate: "fail"}, nil); err == nil || !strings.Contains(err.Error(), "replica went away") {
		t.Fatalf("failed verify: %v", err)
	}
}
