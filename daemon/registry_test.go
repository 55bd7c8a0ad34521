package daemon

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// TestRegistryMigrate: a version 1 vms.json (plain JSON, as vdrepl wrote
// it before the envelope) is read as it was and rewritten in the envelope,
// which then reads back the same.
func TestRegistryMigrate(t *testing.T) {
	old, err := os.ReadFile("testdata/vms-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	m := vfs.NewMemFS()
	if err := vfs.WriteFileAtomic(m, "/vms.json", old, 0o600); err != nil {
		t.Fatal(err)
	}
	r := registry{fs: m, path: "/vms.json"}
	specs, err := r.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 2 {
		t.Fatalf("%d VMs, want 2", len(specs))
	}
	db, web := specs[0], specs[1]
	if db.Name != "db1" || len(db.Disks) != 2 || db.Disks[1].Size != 53687091200 ||
		db.Replication == nil || time.Duration(db.Replication.Frequency) != 5*time.Minute || db.Replication.RecoveryPoints != 24 ||
		db.HandedOver == nil || db.HandedOver.Cycle != 4711 || !db.Created.Equal(time.Date(2026, 11, 2, 9, 15, 0, 0, time.UTC)) {
		t.Fatalf("db1 read as %+v", db)
	}
	if web.Name != "web1" || !web.FailedOver || web.PromotedFrom != "old-primary.example" || len(web.Lacks) != 1 || web.Replication != nil {
		t.Fatalf("web1 read as %+v", web)
	}
	now, err := vfs.ReadFile(m, "/vms.json")
	if err != nil {
		t.Fatal(err)
	}
	var body registryFile
	if err := statefile.Decode(registryFormat, registryVersion, now, &body); err != nil {
		t.Fatalf("vms.json not rewritten in the envelope: %v\n%s", err, now)
	}
	again, err := r.load()
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := statefile.Encode("x", 1, specs)
	b2, _ := statefile.Encode("x", 1, again)
	if !bytes.Equal(b1, b2) {
		t.Fatalf("the migrated registry reads back as\n%s\nwant\n%s", b2, b1)
	}
}

// TestRegistryRejects: a flipped byte is caught by the checksum; an
// unknown plain version and a failed migration write are errors, and the
// old file stays.
func TestRegistryRejects(t *testing.T) {
	m := vfs.NewMemFS()
	r := registry{fs: m, path: "/vms.json"}
	if err := r.save([]control.VMSpec{{Name: "a", Disks: []control.DiskSpec{{Name: "d", Path: "/a.img", Size: 4096}}}}); err != nil {
		t.Fatal(err)
	}
	b, _ := vfs.ReadFile(m, "/vms.json")
	b[bytes.Index(b, []byte("a.img"))] ^= 1
	vfs.WriteFileAtomic(m, "/vms.json", b, 0o600)
	if _, err := r.load(); !errors.Is(err, statefile.ErrInvalid) {
		t.Fatalf("load of a damaged registry: %v", err)
	}
	vfs.WriteFileAtomic(m, "/vms.json", []byte(`{"version":7,"vms":[]}`), 0o600)
	if _, err := r.load(); !errors.Is(err, errRegistry) {
		t.Fatalf("load of plain version 7: %v", err)
	}
	old, _ := os.ReadFile("testdata/vms-v1.json")
	e := vfs.NewErrorFS(m)
	vfs.WriteFileAtomic(m, "/vms.json", old, 0o600)
	boom := errors.New("disk full")
	e.InjectAlways(vfs.OpRename, boom)
	if _, err := (registry{fs: e, path: "/vms.json"}).load(); !errors.Is(err, boom) {
		t.Fatalf("migration with a failing write: %v", err)
	}
	if now, _ := vfs.ReadFile(m, "/vms.json"); !bytes.Equal(now, old) {
		t.Fatal("a failed migration changed vms.json")
	}
}
