package apply

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// writeOffline writes an initial copy of m to a directory, as the primary's
// export to external media does.
func writeOffline(t *testing.T, vm, primary string, m model, gen, base uint64, pieceSize int64) (string, wire.OfflineManifest) {
	t.Helper()
	dir := t.TempDir()
	man := wire.OfflineManifest{Version: 1, VM: vm, Primary: primary, Disks: testDisks, Gen: gen, Base: base,
		PieceSize: pieceSize, Pieces: wire.PieceCount(testDisks, pieceSize), Created: time.Now().UTC()}
	for p := range man.Pieces {
		d, off, n, _ := wire.PieceRange(testDisks, pieceSize, p)
		h := wire.Header{VM: vm, Kind: wire.KindFull, Disks: testDisks, Gen: gen, Piece: p}
		stream := buildStream(t, h, []op{{t: wire.FrameData, disk: d, off: off, data: m[d][off : off+n]}})
		if err := os.WriteFile(filepath.Join(dir, wire.SyncUploadID(gen, p)+".vdws"), stream, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := json.Marshal(man)
	if err := os.WriteFile(filepath.Join(dir, wire.OfflineManifestFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, man
}

func primaryModel() model {
	m := newModel(testDisks)
	for i := range m {
		copy(m[i], randBytes(uint64(40+i), len(m[i])/2))
	}
	return m
}

func TestImportInitial(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("*.example.com", h.storage, "")
	m := primaryModel()
	dir, _ := writeOffline(t, "vm1", "a.example.com", m, 3, 17, 256<<10)
	s := h.server()
	if err := s.ImportInitial("vm1", dir); err != nil {
		t.Fatal(err)
	}
	rep, ok := s.Replica("vm1")
	if !ok || rep.State != stateReplicating || rep.Applied != 17 || rep.Consistent || rep.Primary != "a.example.com" {
		t.Fatalf("after import: %+v", rep)
	}
	img, _ := s.ImageDir("vm1")
	checkImages(t, vfs.Default, img, testDisks, m)
	// The primary goes on with the cycles after Base.
	a := h.client("a.example.com")
	ops := []op{{t: wire.FrameData, disk: 1, off: 4096, data: []byte("after the import")}}
	if rep := a.send("vm1", "c18", buildStream(t, cycleHeader("vm1", 18, 17), ops)); rep.Applied != 18 || !rep.Consistent {
		t.Fatalf("cycle after import: %+v", rep)
	}
	m.apply(ops)
	checkImages(t, vfs.Default, img, testDisks, m)
	h.restart(nil)
	if rep, _ := h.server().Replica("vm1"); rep.Applied != 18 {
		t.Fatalf("after restart: %+v", rep)
	}
}

func TestImportInitialErrors(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("*.example.com", h.storage, "")
	s := h.server()
	m := primaryModel()
	good, _ := writeOffline(t, "vm1", "a.example.com", m, 3, 17, 256<<10)
	piece := func(dir string, p int64) string { return filepath.Join(dir, wire.SyncUploadID(3, p)+".vdws") }

	corrupt, _ := writeOffline(t, "vm1", "a.example.com", m, 3, 17, 256<<10)
	b, _ := os.ReadFile(piece(corrupt, 2))
	b[len(b)/2] ^= 1
	os.WriteFile(piece(corrupt, 2), b, 0o600)
	missing, _ := writeOffline(t, "vm1", "a.example.com", m, 3, 17, 256<<10)
	os.Remove(piece(missing, 4))
	stranger, _ := writeOffline(t, "vm1", "z.other.org", m, 3, 17, 256<<10)
	badManifest := t.TempDir()
	os.WriteFile(filepath.Join(badManifest, wire.OfflineManifestFile), []byte("{"), 0o600)
	wrongPieces, man := writeOffline(t, "vm1", "a.example.com", m, 3, 17, 256<<10)
	man.Pieces++
	mb, _ := json.Marshal(man)
	os.WriteFile(filepath.Join(wrongPieces, wire.OfflineManifestFile), mb, 0o600)

	for _, tc := range []struct {
		name, vm, dir string
		err           error
	}{
		{"no manifest", "vm1", t.TempDir(), ErrNotFound},
		{"bad manifest", "vm1", badManifest, ErrCorrupt},
		{"piece count", "vm1", wrongPieces, ErrInvalid},
		{"corrupt piece", "vm1", corrupt, ErrCorrupt},
		{"missing piece", "vm1", missing, ErrCorrupt},
		{"primary not allowed", "vm1", stranger, ErrForbidden},
		{"another VM's copy", "vm2", good, ErrMismatch},
	} {
		if err := s.ImportInitial(tc.vm, tc.dir); !errors.Is(err, tc.err) {
			t.Fatalf("%s: %v, want %v", tc.name, err, tc.err)
		}
		if _, ok := s.Replica(tc.vm); ok {
			t.Fatalf("%s: VM registered", tc.name)
		}
		if _, err := os.Stat(filepath.Join(h.storage, tc.vm)); !os.IsNotExist(err) {
			t.Fatalf("%s: VM directory left: %v", tc.name, err)
		}
	}

	// An existing VM of another primary is not overwritten.
	h.allow("b.example.org", h.storage, "")
	h.client("b.example.org").enable("vm1", testDisks)
	if err := s.ImportInitial("vm1", good); !errors.Is(err, ErrForbidden) {
		t.Fatalf("import over b's VM: %v", err)
	}
	if err := s.RemoveReplica("vm1"); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveReplica("vm1"); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("second RemoveReplica: %v", err)
	}
	os.RemoveAll(filepath.Join(h.storage, "vm1"))

	// An I/O error while applying takes everything back.
	efs := vfs.NewErrorFS(vfs.Default)
	s = h.restart(efs)
	efs.InjectAfterPath(vfs.OpWrite, "d1.img", 0, vfs.ErrInjected)
	if err := s.ImportInitial("vm1", good); !errors.Is(err, vfs.ErrInjected) {
		t.Fatalf("import with a failing image: %v", err)
	}
	if _, ok := s.Replica("vm1"); ok {
		t.Fatal("failed import registered the VM")
	}
	if _, err := os.Stat(filepath.Join(h.storage, "vm1")); !os.IsNotExist(err) {
		t.Fatalf("failed import left its directory: %v", err)
	}
	s = h.restart(nil)
	if len(s.Replicas()) != 0 {
		t.Fatalf("after restart: %+v", s.Replicas())
	}
	if err := s.ImportInitial("vm1", good); err != nil {
		t.Fatal(err)
	}
	img, _ := s.ImageDir("vm1")
	checkImages(t, vfs.Default, img, testDisks, m)
}

func TestImportIntoExisting(t *testing.T) {
	h := newHarness(t, nil)
	h.allow("*.example.com", h.storage, "")
	a := h.client("a.example.com")
	a.enable("vm1", testDisks)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), nil))
	m := primaryModel()
	dir, _ := writeOffline(t, "vm1", "a.example.com", m, 2, 30, 512<<10)
	if err := h.server().ImportInitial("vm1", dir); err != nil {
		t.Fatal(err)
	}
	rep, _ := h.server().Replica("vm1")
	if rep.Applied != 30 || rep.State != stateReplicating {
		t.Fatalf("after import: %+v", rep)
	}
	img, _ := h.server().ImageDir("vm1")
	checkImages(t, vfs.Default, img, testDisks, m)
}

// TestMatchName: an offline copy names its primary; the allow-list applies
// pki.Match's rules to that name.
func TestMatchName(t *testing.T) {
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"*", "anything.example.com", true},
		{"*", "", false},
		{"a.example.com", "a.example.com", true},
		{"a.example.com", "A.Example.COM", true},
		{"a.example.com", "b.example.com", false},
		{"*.example.com", "a.example.com", true},
		{"*.example.com", "a.b.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", "evilexample.com", false},
		{"*.example.com", ".example.com", false},
		{"bad pattern", "bad pattern", false},
	} {
		if got := matchName(tc.pattern, tc.name); got != tc.want {
			t.Errorf("matchName(%q, %q) = %v", tc.pattern, tc.name, got)
		}
	}
}
