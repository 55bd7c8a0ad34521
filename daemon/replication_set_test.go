package daemon

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/wire"
)

func TestApplyChange(t *testing.T) {
	base := control.ReplicationSpec{Replica: "r:8443", Frequency: control.Duration(time.Minute), Compression: true, RecoveryPoints: 2, PointInterval: control.Duration(time.Hour)}
	str := func(s string) *string { return &s }
	dur := func(d time.Duration) *control.Duration { x := control.Duration(d); return &x }
	num := func(n int) *int { return &n }
	no := false
	for _, tc := range []struct {
		name    string
		change  control.ReplicationChange
		changed []string
		check   func(control.ReplicationSpec) bool
	}{
		{"nothing", control.ReplicationChange{}, []string{}, func(s control.ReplicationSpec) bool { return reflect.DeepEqual(s, base) }},
		{"same values", control.ReplicationChange{Replica: str("r:8443"), Frequency: dur(time.Minute), RecoveryPoints: num(2)}, []string{},
			func(s control.ReplicationSpec) bool { return reflect.DeepEqual(s, base) }},
		{"frequency and points", control.ReplicationChange{Frequency: dur(30 * time.Second), RecoveryPoints: num(4), PointInterval: dur(time.Second)},
			[]string{"frequency", "recovery-points", "recovery-point-interval"},
			func(s control.ReplicationSpec) bool {
				return s.Frequency == control.Duration(30*time.Second) && s.RecoveryPoints == 4 && s.PointInterval == control.Duration(time.Second) && s.Replica == "r:8443"
			}},
		{"limits cleared and set", control.ReplicationChange{BandwidthLimit: str("10MB/s"), SyncBandwidthLimit: str(""), Compression: &no},
			[]string{"compression", "bandwidth-limit"},
			func(s control.ReplicationSpec) bool { return s.BandwidthLimit == "10MB/s" && !s.Compression }},
		{"replica", control.ReplicationChange{Replica: str("r2:8443")}, []string{"replica"},
			func(s control.ReplicationSpec) bool { return s.Replica == "r2:8443" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, changed := applyChange(base, tc.change)
			if !slices.Equal(changed, tc.changed) || !tc.check(got) {
				t.Fatalf("changed %q (want %q), spec %+v", changed, tc.changed, got)
			}
		})
	}
}

func TestSameReplica(t *testing.T) {
	disks := []wire.Disk{{Name: "d0", Size: 1 << 20}}
	rep := wire.Replica{VM: "a", Primary: "Primary.test", Disks: disks, Applied: 7}
	for _, tc := range []struct {
		name                string
		edit                func(*wire.Replica)
		applied, committing uint64
		want                bool
	}{
		{"same", nil, 7, 0, true},
		{"commit in flight applied there", nil, 6, 7, true},
		{"behind", nil, 8, 0, false},
		{"another primary", func(r *wire.Replica) { r.Primary = "other.test" }, 7, 0, false},
		{"other disks", func(r *wire.Replica) { r.Disks = []wire.Disk{{Name: "d0", Size: 2 << 20}} }, 7, 0, false},
		{"failed over there", func(r *wire.Replica) { r.FailedOver = &wire.FailedOver{Kind: "unplanned"} }, 7, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rep
			if tc.edit != nil {
				tc.edit(&r)
			}
			if got := sameReplica(r, "primary.test", disks, tc.applied, tc.committing); got != tc.want {
				t.Fatalf("sameReplica = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestSetReplicationRefuses: set changes nothing of a VM that does not
// replicate, is fenced, or gets a bad value.
func TestSetReplicationRefuses(t *testing.T) {
	d := newTestDaemon(t)
	addTestVM(t, d, "a")
	freq := control.Duration(time.Minute)
	if _, err := d.SetReplication(context.Background(), "nope", control.ReplicationChange{Frequency: &freq}); !errors.Is(err, control.ErrUnknownVM) {
		t.Fatalf("unknown VM: %v", err)
	}
	if _, err := d.SetReplication(context.Background(), "a", control.ReplicationChange{Frequency: &freq}); !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), "not enabled") {
		t.Fatalf("not replicated: %v", err)
	}
	// A replication in the registry whose shipper does not run (no
	// identity in this test daemon).
	spec := control.ReplicationSpec{Replica: "r:8443", Frequency: control.Duration(5 * time.Minute), Initial: "network", PointInterval: control.Duration(time.Hour)}
	v := servedNow(d, "a")
	if err := d.setSpec(v, func(s *control.VMSpec) { s.Replication = &spec }); err != nil {
		t.Fatal(err)
	}
	tiny := control.Duration(time.Millisecond)
	if _, err := d.SetReplication(context.Background(), "a", control.ReplicationChange{Frequency: &tiny}); !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), "--frequency") {
		t.Fatalf("bad frequency: %v", err)
	}
	points := 99
	if _, err := d.SetReplication(context.Background(), "a", control.ReplicationChange{RecoveryPoints: &points}); !errors.Is(err, control.ErrInvalid) {
		t.Fatalf("bad points: %v", err)
	}
	out, err := d.SetReplication(context.Background(), "a", control.ReplicationChange{Frequency: (*control.Duration)(&spec.Frequency)})
	if err != nil || len(out.Changed) != 0 {
		t.Fatalf("an unchanged value: %+v %v", out, err)
	}
	if err := d.fenceVM("a", control.Fence{Replica: "r:8443", Kind: "unplanned", FailedOverAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.SetReplication(context.Background(), "a", control.ReplicationChange{Frequency: &freq}); !errors.Is(err, control.ErrInUse) || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("fenced: %v", err)
	}
	if got := servedNow(d, "a").spec.Replication; !reflect.DeepEqual(*got, spec) {
		t.Fatalf("a refused set changed the spec: %+v", got)
	}
}
