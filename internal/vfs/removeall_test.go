package vfs

import (
	"errors"
	"io/fs"
	"testing"
)

func TestRemoveAll(t *testing.T) {
	m := NewMemFS()
	if err := m.MkdirAll("/a/b/c", 0o700); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/a/f", "/a/b/g", "/a/b/c/h"} {
		if err := WriteFileAtomic(m, p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := RemoveAll(m, "/a"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Stat("/a"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("/a after RemoveAll: %v", err)
	}
	if err := RemoveAll(m, "/a"); err != nil {
		t.Fatalf("RemoveAll of a missing name: %v", err)
	}
	e := NewErrorFS(NewMemFS())
	e.MkdirAll("/x", 0o700)
	boom := errors.New("boom")
	e.InjectAlways(OpRemove, boom)
	if err := RemoveAll(e, "/x"); !errors.Is(err, boom) {
		t.Fatalf("RemoveAll with failing Remove: %v", err)
	}
}
