package relay

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// fakeReplica is a replica role with one replica VM over one image.
type fakeReplica struct {
	image      string
	consistent bool
	relay      apply.Relay
}

func (f *fakeReplica) Replica(vm string) (wire.Replica, bool) {
	if vm != "v" {
		return wire.Replica{}, false
	}
	return wire.Replica{VM: vm, State: "replicating", Consistent: f.consistent, Disks: []wire.Disk{{Name: "d0", Size: 1 << 20}}}, true
}

func (f *fakeReplica) Images(vm string) []string { return []string{f.image} }

func (f *fakeReplica) SetRelay(vm string, r apply.Relay) error { f.relay = r; return nil }

func newImage(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "d0.img")
	if err := os.WriteFile(p, bytes.Repeat([]byte{7}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSinkFS: the relay reads the images and never writes them.
func TestSinkFS(t *testing.T) {
	m := vfs.NewMemFS()
	if err := vfs.WriteFileAtomic(m, "/img", []byte("applied"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := sinkFS{FS: m, images: map[string]bool{"/img": true}}
	f, err := s.OpenFile("/img", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := f.WriteAt([]byte("RELAYED"), 0); n != 7 || err != nil {
		t.Fatalf("WriteAt: %d, %v", n, err)
	}
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, _ := vfs.ReadFile(m, "/img"); string(b) != "applied" {
		t.Fatalf("image after relay writes: %q", b)
	}
	if err := vfs.WriteFileAtomic(s, "/other", []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, _ := vfs.ReadFile(m, "/other"); string(b) != "kept" {
		t.Fatalf("a file other than an image: %q", b)
	}
}

// TestRelayCycles: what apply relays lands in the relay journal, never in
// the image, and a cycle is cut only while the replica VM is consistent.
func TestRelayCycles(t *testing.T) {
	rep := &fakeReplica{image: newImage(t)}
	rs := New(Config{StateDir: t.TempDir(), Replica: rep})
	j, err := rs.openJournal("v", must(rep.Replica("v")))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	r := &relay{j: j, replica: rep, vm: "v"}
	rj := relayJournal{r: r}
	r.Begin()
	if err := r.WriteAt(0, bytes.Repeat([]byte{9}, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	if err := r.Zero(0, 0, 4096, wire.FrameTrim); err != nil {
		t.Fatal(err)
	}
	if err := r.End(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := rj.Seal(0); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("Seal while the replica is not consistent: %v", err)
	}
	rep.consistent = true
	c, err := rj.Seal(0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Bytes == 0 {
		t.Fatalf("sealed cycle %+v holds nothing of what was relayed", c)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	img, _ := os.ReadFile(rep.image)
	if !bytes.Equal(img, bytes.Repeat([]byte{7}, 1<<20)) {
		t.Fatal("the relay wrote the replica image")
	}
	// End reports the apply's error and the relay's first.
	j2, err := journal.Open(journal.Config{Dir: t.TempDir(), IndexDir: t.TempDir(), Disks: []journal.DiskSpec{{Name: "d0", Path: rep.image, Size: 1 << 20}}, FS: sinkFS{FS: vfs.Default, images: map[string]bool{rep.image: true}}})
	if err != nil {
		t.Fatal(err)
	}
	defer j2.Close()
	r2 := &relay{j: j2, replica: rep, vm: "v"}
	r2.Begin()
	boom := errors.New("apply failed")
	if err := r2.End(boom); !errors.Is(err, boom) {
		t.Fatalf("End(apply error): %v", err)
	}
}

func must(r wire.Replica, ok bool) wire.Replica { return r }

// TestStateCompatible: extend.json as the daemon wrote it before this
// package is read, and written again byte for byte.
func TestStateCompatible(t *testing.T) {
	golden, err := os.ReadFile("testdata/extend-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, stateFile), golden, 0o600); err != nil {
		t.Fatal(err)
	}
	rs := New(Config{StateDir: dir})
	m, err := rs.load()
	if err != nil {
		t.Fatal(err)
	}
	want := Spec{Replica: "third.example:8443", Frequency: 5 * time.Minute, Compression: true, Enabled: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	if len(m) != 2 || m["db1"] != want || !m["web"].BypassProxy || m["web"].Frequency != 15*time.Minute {
		t.Fatalf("loaded %+v", m)
	}
	// Save writes what is running: put the loaded specs in place of
	// running extensions to compare the bytes.
	for name, s := range m {
		rs.running[name] = &extension{vm: name, spec: s}
	}
	if err := rs.Save(); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, stateFile))
	if !bytes.Equal(got, golden) {
		t.Fatalf("extend.json written as\n%s\nwant\n%s", got, golden)
	}
}

// TestRestartWithoutIdentity: extensions recorded but no TLS identity:
// nothing starts, the record stays.
func TestRestartWithoutIdentity(t *testing.T) {
	dir := t.TempDir()
	golden, _ := os.ReadFile("testdata/extend-v1.json")
	os.WriteFile(filepath.Join(dir, stateFile), golden, 0o600)
	rs := New(Config{StateDir: dir, Replica: &fakeReplica{}, NoTLS: errors.New("no identity")})
	rs.Restart(context.Background())
	if len(rs.List("")) != 0 {
		t.Fatal("an extension started without a TLS identity")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, stateFile)); !bytes.Equal(b, golden) {
		t.Fatal("extend.json changed")
	}
}
