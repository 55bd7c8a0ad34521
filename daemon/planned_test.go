package daemon

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/control"
)

// TestPlannedRefusedByDaemon: the daemon's side of the planned failover's
// checks (failover.PrimaryRole) keeps its errors: an unknown VM, a host
// without a certificate, and a reverse with another initial copy.
func TestPlannedRefusedByDaemon(t *testing.T) {
	d := newTestDaemon(t)
	addTestVM(t, d, "a")
	if _, err := d.FailoverPlanned(context.Background(), "nope", false, ""); !errors.Is(err, control.ErrUnknownVM) {
		t.Fatalf("unknown VM: %v", err)
	}
	_, err := d.FailoverPlanned(context.Background(), "a", false, "")
	if !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), errNoIdentity.Error()) {
		t.Fatalf("no identity: %v", err)
	}
	if _, err := d.Reverse("a", control.ReplicationSpec{Initial: "full"}); !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), "--initial does not apply") {
		t.Fatalf("reverse --initial full: %v", err)
	}
	if s := servedNow(d, "a"); s.j == nil || s.busy || s.spec.HandedOver != nil {
		t.Fatalf("a refusal changed the VM: %+v", s)
	}
}
