package doctor

import (
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/control"
)

// TestFences: a fenced VM is a problem whose fix names both ways out, on
// its own (doctor without a VM) and among the VM's findings.
func TestFences(t *testing.T) {
	fenced := control.VMInfo{VMSpec: control.VMSpec{Name: "web1", Fenced: &control.Fence{
		Replica: "r:8443", ReplicaName: "r.test", Kind: "unplanned", FailedOverAt: time.Date(2026, 12, 1, 2, 3, 4, 0, time.UTC)}}}
	other := control.VMInfo{VMSpec: control.VMSpec{Name: "db1"}}
	fs := Fences([]control.VMInfo{other, fenced})
	if len(fs) != 1 {
		t.Fatalf("findings %+v", fs)
	}
	f := fs[0]
	if f.Check != CheckFence || f.Severity != Problem || f.Subject != "web1" ||
		!strings.Contains(f.Cause, "FENCED: failed over on r.test (r:8443) at 2026-12-01T02:03:04Z; this copy is stale") ||
		!strings.Contains(f.Fix, "`vdrepl replication reverse web1 --replica THIS_HOST:PORT`") || !strings.Contains(f.Fix, "`vdrepl vm unfence web1 --force`") {
		t.Fatalf("finding %+v", f)
	}
	vmFs := VMReplication("web1", []control.VMInfo{fenced}, control.Replication{}, time.Now())
	if len(vmFs) == 0 || vmFs[0].Check != CheckFence {
		t.Fatalf("doctor web1 findings %+v", vmFs)
	}
}
