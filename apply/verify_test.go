package apply

import (
	"bytes"
	"math/rand/v2"
	"net/http"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// sumsCycle asks for the sums of the first block of disk 0 and returns the
// SumsCycleHeader of the answer.
func sumsCycle(t *testing.T, c *client) string {
	t.Helper()
	req, err := http.NewRequest("POST", c.base+vmPath("vm1")+"/sums",
		bytes.NewReader(mustJSON(t, wire.SumsRequest{Disk: 0, Offset: 0, Length: 4096, BlockSize: 4096})))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("sums: HTTP %d", resp.StatusCode)
	}
	return resp.Header.Get(wire.SumsCycleHeader)
}

// The answer to /sums names the applied cycle the images were hashed at,
// and nothing while they are not at one (an initial copy under way).
func TestSumsNameTheAppliedCycle(t *testing.T) {
	_, a, _ := setup(t, nil)
	r := rand.New(rand.NewPCG(3, 4))
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), randomOps(r, testDisks, 5)))
	if got := sumsCycle(t, a); got != "1" {
		t.Fatalf("after cycle 1 applied: %s %q, want \"1\"", wire.SumsCycleHeader, got)
	}
	a.send("vm1", "c2", buildStream(t, cycleHeader("vm1", 2, 1), randomOps(r, testDisks, 5)))
	if got := sumsCycle(t, a); got != "2" {
		t.Fatalf("after cycle 2 applied: %s %q, want \"2\"", wire.SumsCycleHeader, got)
	}
	pieces := wire.PieceCount(testDisks, 1<<20)
	if status, e := a.call("POST", vmPath("vm1")+"/sync", wire.SyncStart{Gen: 7, Kind: wire.KindFull, Base: 3, PieceSize: 1 << 20, Pieces: pieces}, nil); status != 200 {
		t.Fatalf("sync start: %d %+v", status, e)
	}
	if got := sumsCycle(t, a); got != "" {
		t.Fatalf("during an initial copy: %s %q, want none", wire.SumsCycleHeader, got)
	}
}
