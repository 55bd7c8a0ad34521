package apply

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// TestDeleteReplica: the images go with the VM and so does its directory
// once empty, a file that is not the VM's stays; an adopted VM's images,
// outside its directory, are refused and the VM stays registered.
func TestDeleteReplica(t *testing.T) {
	h := newHarness(t, vfs.Default)
	s := h.server()
	h.allow("*.example.com", h.storage, "")
	h.client("a.example.com").enable("vm1", testDisks)
	h.client("a.example.com").enable("vm2", testDisks)
	h.client("a.example.com").enable("vm3", testDisks)

	if err := s.DeleteReplica("vm1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.storage, "vm1")); !os.IsNotExist(err) {
		t.Fatalf("vm1's directory after DeleteReplica: %v", err)
	}

	other := filepath.Join(h.storage, "vm2", "notes.txt")
	if err := os.WriteFile(other, []byte("the admin's"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteReplica("vm2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.storage, "vm2", "d0.img")); !os.IsNotExist(err) {
		t.Fatalf("vm2's image after DeleteReplica: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("a file not vm2's was deleted: %v", err)
	}

	v, err := s.lookup("vm3")
	if err != nil {
		t.Fatal(err)
	}
	elsewhere := filepath.Join(t.TempDir(), "vm3-d0.img")
	v.images = []string{elsewhere, elsewhere + "1"}
	if err := s.DeleteReplica("vm3"); !errors.Is(err, ErrForbidden) {
		t.Fatalf("DeleteReplica of an adopted VM: %v, want ErrForbidden", err)
	}
	if _, ok := s.Replica("vm3"); !ok {
		t.Fatal("an adopted VM refused by DeleteReplica left the registry")
	}
}
