package vfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"path"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// create writes data to a new or truncated file, syncing it if sync is set.
func create(t *testing.T, fsys FS, name, data string, sync bool) {
	t.Helper()
	f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(data), 0); err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// open opens an existing file for reading and writing.
func open(t *testing.T, fsys FS, name string) File {
	t.Helper()
	f, err := fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want %v", err, target)
	}
}

func readString(t *testing.T, fsys FS, name string) string {
	t.Helper()
	b, err := ReadFile(fsys, name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// dirMark stands for a directory in a tree.
const dirMark = "<dir>"

// tree lists everything in fsys below the root: each directory as dirMark,
// each file as its content.
func tree(t *testing.T, fsys FS) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(dir string)
	walk = func(dir string) {
		names, err := fsys.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			p := path.Join(dir, n)
			fi, err := fsys.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.IsDir() {
				out[p] = dirMark
				walk(p)
			} else {
				out[p] = readString(t, fsys, p)
			}
		}
	}
	walk(".")
	return out
}

// eachFS runs fn on the real filesystem and on a MemFS, each with an empty
// directory, so MemFS is held to what os does.
func eachFS(t *testing.T, fn func(t *testing.T, fsys FS, dir string)) {
	t.Run("os", func(t *testing.T) { fn(t, Default, t.TempDir()) })
	t.Run("mem", func(t *testing.T) {
		m := NewMemFS()
		must(t, m.MkdirAll("/tmp/test", 0o755))
		fn(t, m, "/tmp/test")
	})
}

func TestMemFSLikeOS(t *testing.T) {
	tests := []struct {
		name string
		fn   func(t *testing.T, fsys FS, dir string)
	}{
		{"open missing", func(t *testing.T, fsys FS, dir string) {
			_, err := fsys.OpenFile(dir+"/x", os.O_RDONLY, 0)
			wantErr(t, err, fs.ErrNotExist)
			var pe *fs.PathError
			if !errors.As(err, &pe) {
				t.Fatalf("%T is not *fs.PathError", err)
			}
		}},
		{"create exclusive", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", "a", false)
			_, err := fsys.OpenFile(dir+"/x", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			wantErr(t, err, fs.ErrExist)
		}},
		{"parent is a file", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/f", "a", false)
			_, err := fsys.OpenFile(dir+"/f/x", os.O_RDWR|os.O_CREATE, 0o600)
			wantErr(t, err, unix.ENOTDIR)
			wantErr(t, fsys.MkdirAll(dir+"/f", 0o755), unix.ENOTDIR)
			wantErr(t, fsys.MkdirAll(dir+"/f/x", 0o755), unix.ENOTDIR)
		}},
		{"directory opened for writing", func(t *testing.T, fsys FS, dir string) {
			_, err := fsys.OpenFile(dir, os.O_RDWR, 0)
			wantErr(t, err, unix.EISDIR)
		}},
		{"read past EOF", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", "hello", false)
			f := open(t, fsys, dir+"/x")
			buf := make([]byte, 8)
			n, err := f.ReadAt(buf, 0)
			if n != 5 || err != io.EOF || string(buf[:n]) != "hello" {
				t.Fatalf("ReadAt = %d, %v, %q", n, err, buf[:n])
			}
			if n, err := f.ReadAt(buf, 10); n != 0 || err != io.EOF {
				t.Fatalf("ReadAt past end = %d, %v", n, err)
			}
			if n, err := f.ReadAt(buf[:0], 10); n != 0 || err != nil {
				t.Fatalf("empty ReadAt = %d, %v", n, err)
			}
			if _, err := f.ReadAt(buf, -1); err == nil {
				t.Fatal("negative offset read")
			}
		}},
		{"write past EOF fills zeroes", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", "hello", false)
			f := open(t, fsys, dir+"/x")
			if n, err := f.WriteAt([]byte("x"), 10); n != 1 || err != nil {
				t.Fatalf("WriteAt = %d, %v", n, err)
			}
			if got := readString(t, fsys, dir+"/x"); got != "hello\x00\x00\x00\x00\x00x" {
				t.Fatalf("content %q", got)
			}
			if n, err := f.WriteAt(nil, 100); n != 0 || err != nil {
				t.Fatalf("empty WriteAt = %d, %v", n, err)
			}
			if size, _ := f.Size(); size != 11 {
				t.Fatalf("empty write changed size to %d", size)
			}
		}},
		{"truncate", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", "hello", false)
			f := open(t, fsys, dir+"/x")
			must(t, f.Truncate(2))
			must(t, f.Truncate(6))
			if got := readString(t, fsys, dir+"/x"); got != "he\x00\x00\x00\x00" {
				t.Fatalf("content %q", got)
			}
			if f.Truncate(-1) == nil {
				t.Fatal("negative truncate")
			}
		}},
		{"O_TRUNC", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", "hello", false)
			f, err := fsys.OpenFile(dir+"/x", os.O_WRONLY|os.O_TRUNC, 0)
			must(t, err)
			defer f.Close()
			if size, err := f.Size(); size != 0 || err != nil {
				t.Fatalf("size %d, %v", size, err)
			}
		}},
		{"punch and zero keep size", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/x", string(bytes.Repeat([]byte{1}, 10000)), false)
			f := open(t, fsys, dir+"/x")
			must(t, f.PunchHole(100, 5000))
			must(t, f.ZeroRange(8000, 50000))
			must(t, f.PunchHole(20000, 10))
			want := bytes.Repeat([]byte{1}, 10000)
			clear(want[100:5100])
			clear(want[8000:])
			if got := readString(t, fsys, dir+"/x"); got != string(want) {
				t.Fatalf("content differs (len %d)", len(got))
			}
			wantErr(t, f.PunchHole(0, 0), unix.EINVAL)
			wantErr(t, f.ZeroRange(-1, 10), unix.EINVAL)
		}},
		{"rename replaces", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/a", "A", false)
			create(t, fsys, dir+"/b", "B", false)
			must(t, fsys.Rename(dir+"/a", dir+"/b"))
			if got := readString(t, fsys, dir+"/b"); got != "A" {
				t.Fatalf("b = %q", got)
			}
			names, err := fsys.ReadDir(dir)
			must(t, err)
			if !slices.Equal(names, []string{"b"}) {
				t.Fatalf("ReadDir = %q", names)
			}
			must(t, fsys.Rename(dir+"/b", dir+"/b"))
		}},
		{"rename errors", func(t *testing.T, fsys FS, dir string) {
			err := fsys.Rename(dir+"/missing", dir+"/x")
			wantErr(t, err, fs.ErrNotExist)
			var le *os.LinkError
			if !errors.As(err, &le) {
				t.Fatalf("%T is not *os.LinkError", err)
			}
			must(t, fsys.MkdirAll(dir+"/d/sub", 0o755))
			must(t, fsys.MkdirAll(dir+"/e", 0o755))
			create(t, fsys, dir+"/f", "F", false)
			wantErr(t, fsys.Rename(dir+"/d", dir+"/d/sub/d"), unix.EINVAL)
			// os.Rename refuses to replace any directory, even an empty one.
			wantErr(t, fsys.Rename(dir+"/e", dir+"/d"), fs.ErrExist)
			wantErr(t, fsys.Rename(dir+"/d/sub", dir+"/e"), fs.ErrExist)
			wantErr(t, fsys.Rename(dir+"/f", dir+"/e"), fs.ErrExist)
			wantErr(t, fsys.Rename(dir+"/e", dir+"/f"), unix.ENOTDIR)
			wantErr(t, fsys.Rename(dir+"/f", dir+"/nodir/f"), fs.ErrNotExist)
			must(t, fsys.Rename(dir+"/e", dir+"/d/e"))
		}},
		{"remove", func(t *testing.T, fsys FS, dir string) {
			wantErr(t, fsys.Remove(dir+"/missing"), fs.ErrNotExist)
			must(t, fsys.MkdirAll(dir+"/d", 0o755))
			create(t, fsys, dir+"/d/f", "F", false)
			wantErr(t, fsys.Remove(dir+"/d"), unix.ENOTEMPTY)
			must(t, fsys.Remove(dir+"/d/f"))
			must(t, fsys.Remove(dir+"/d"))
			if _, err := fsys.Stat(dir + "/d"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Stat removed dir: %v", err)
			}
		}},
		{"stat", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/f", "hello", false)
			fi, err := fsys.Stat(dir + "//f")
			must(t, err)
			if fi.Name() != "f" || fi.Size() != 5 || fi.IsDir() || fi.Mode() != 0o600 {
				t.Fatalf("Stat = %s %d %v %v", fi.Name(), fi.Size(), fi.IsDir(), fi.Mode())
			}
			must(t, fsys.MkdirAll(dir+"/d", 0o700))
			fi, err = fsys.Stat(dir + "/d/")
			must(t, err)
			if fi.Name() != "d" || !fi.IsDir() || fi.Mode() != fs.ModeDir|0o700 {
				t.Fatalf("Stat = %s %v %v", fi.Name(), fi.IsDir(), fi.Mode())
			}
			_, err = fsys.Stat(dir + "/missing")
			wantErr(t, err, fs.ErrNotExist)
		}},
		{"readdir and mkdirall", func(t *testing.T, fsys FS, dir string) {
			must(t, fsys.MkdirAll(dir+"/a/b/c", 0o755))
			must(t, fsys.MkdirAll(dir+"/a/b/c", 0o755))
			for _, n := range []string{"z", "a2", "m"} {
				create(t, fsys, dir+"/a/"+n, "", false)
			}
			names, err := fsys.ReadDir(dir + "/a")
			must(t, err)
			if !slices.Equal(names, []string{"a2", "b", "m", "z"}) {
				t.Fatalf("ReadDir = %q", names)
			}
			_, err = fsys.ReadDir(dir + "/missing")
			wantErr(t, err, fs.ErrNotExist)
			_, err = fsys.ReadDir(dir + "/a/z")
			wantErr(t, err, unix.ENOTDIR)
			wantErr(t, fsys.SyncDir(dir+"/missing"), fs.ErrNotExist)
			must(t, fsys.SyncDir(dir+"/a/b"))
		}},
		{"closed file", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/f", "hello", false)
			f, err := fsys.OpenFile(dir+"/f", os.O_RDWR, 0)
			must(t, err)
			must(t, f.Close())
			_, err = f.WriteAt([]byte("x"), 0)
			wantErr(t, err, fs.ErrClosed)
			_, err = f.ReadAt(make([]byte, 1), 0)
			wantErr(t, err, fs.ErrClosed)
			_, err = f.Size()
			wantErr(t, err, fs.ErrClosed)
			wantErr(t, f.Close(), fs.ErrClosed)
		}},
		{"read only", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/f", "hello", false)
			f, err := fsys.OpenFile(dir+"/f", os.O_RDONLY, 0)
			must(t, err)
			defer f.Close()
			_, err = f.WriteAt([]byte("x"), 0)
			wantErr(t, err, unix.EBADF)
			if f.Truncate(0) == nil {
				t.Fatal("truncate of a read-only file")
			}
			if got := readString(t, fsys, dir+"/f"); got != "hello" {
				t.Fatalf("content %q", got)
			}
		}},
		{"handle outlives its name", func(t *testing.T, fsys FS, dir string) {
			create(t, fsys, dir+"/a", "hello", false)
			f := open(t, fsys, dir+"/a")
			must(t, fsys.Rename(dir+"/a", dir+"/b"))
			_, err := f.WriteAt([]byte("J"), 0)
			must(t, err)
			if got := readString(t, fsys, dir+"/b"); got != "Jello" {
				t.Fatalf("b = %q", got)
			}
			must(t, fsys.Remove(dir+"/b"))
			buf := make([]byte, 5)
			_, err = f.ReadAt(buf, 0)
			must(t, err)
			if string(buf) != "Jello" {
				t.Fatalf("read %q after remove", buf)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { eachFS(t, tc.fn) })
	}
}

func TestMemFSPaths(t *testing.T) {
	m := NewMemFS()
	create(t, m, "/a", "A", false)
	for _, name := range []string{"a", "./a", "/a", "//a", "b/../a"} {
		if got := readString(t, m, name); got != "A" {
			t.Fatalf("%s = %q", name, got)
		}
	}
	for _, root := range []string{"/", ".", ""} {
		fi, err := m.Stat(root)
		if err != nil || !fi.IsDir() {
			t.Fatalf("Stat(%q) = %v, %v", root, fi, err)
		}
		must(t, m.SyncDir(root))
	}
	wantErr(t, m.Remove("/"), unix.EBUSY)
	_, err := m.OpenFile("../x", os.O_RDWR|os.O_CREATE, 0o600)
	wantErr(t, err, unix.EINVAL)
	_, err = m.OpenFile("x", os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	wantErr(t, err, ErrUnsupported)
}

// TestMemFSCrashClone checks the durability contract: after each history the
// crash clone holds exactly the tree given. Every case starts with a durable,
// empty directory d.
func TestMemFSCrashClone(t *testing.T) {
	durable := func(t *testing.T, m *MemFS, name, data string) {
		create(t, m, name, data, true)
		must(t, m.SyncDir(path.Dir(name)))
	}
	tests := []struct {
		name string
		run  func(t *testing.T, m *MemFS)
		want map[string]string
	}{
		{"synced data survives, later writes do not", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "old")
			f := open(t, m, "d/f")
			_, err := f.WriteAt([]byte("NEW"), 0)
			must(t, err)
			_, err = f.WriteAt([]byte("tail"), 3)
			must(t, err)
		}, map[string]string{"d": dirMark, "d/f": "old"}},
		{"sync makes later writes durable", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "old")
			f := open(t, m, "d/f")
			_, err := f.WriteAt([]byte("NEW"), 2)
			must(t, err)
			must(t, f.Sync())
		}, map[string]string{"d": dirMark, "d/f": "olNEW"}},
		{"sync through another handle", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "old")
			f, g := open(t, m, "d/f"), open(t, m, "d/f")
			_, err := f.WriteAt([]byte("N"), 0)
			must(t, err)
			must(t, g.Sync())
		}, map[string]string{"d": dirMark, "d/f": "Nld"}},
		{"new file without SyncDir disappears", func(t *testing.T, m *MemFS) {
			create(t, m, "d/f", "data", true)
		}, map[string]string{"d": dirMark}},
		{"new file with SyncDir but no Sync is empty", func(t *testing.T, m *MemFS) {
			create(t, m, "d/f", "data", false)
			must(t, m.SyncDir("d"))
		}, map[string]string{"d": dirMark, "d/f": ""}},
		{"rename without SyncDir reverts", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/a", "A")
			durable(t, m, "d/b", "B")
			must(t, m.Rename("d/a", "d/b"))
		}, map[string]string{"d": dirMark, "d/a": "A", "d/b": "B"}},
		{"rename and SyncDir survive", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/a", "A")
			durable(t, m, "d/b", "B")
			must(t, m.Rename("d/a", "d/b"))
			must(t, m.SyncDir("d"))
		}, map[string]string{"d": dirMark, "d/b": "A"}},
		{"rename across directories syncing only the target", func(t *testing.T, m *MemFS) {
			// Each directory's entries are durable on their own: the file
			// keeps its old name too until d is synced.
			durable(t, m, "d/a", "A")
			must(t, m.MkdirAll("e", 0o755))
			must(t, m.SyncDir("."))
			must(t, m.Rename("d/a", "e/a"))
			must(t, m.SyncDir("e"))
		}, map[string]string{"d": dirMark, "d/a": "A", "e": dirMark, "e/a": "A"}},
		{"remove without SyncDir reverts", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/a", "A")
			must(t, m.Remove("d/a"))
		}, map[string]string{"d": dirMark, "d/a": "A"}},
		{"remove and SyncDir", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/a", "A")
			must(t, m.Remove("d/a"))
			must(t, m.SyncDir("d"))
		}, map[string]string{"d": dirMark}},
		{"unsynced truncate reverts", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "abcdef")
			must(t, open(t, m, "d/f").Truncate(2))
		}, map[string]string{"d": dirMark, "d/f": "abcdef"}},
		{"synced shrink", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "abcdef")
			f := open(t, m, "d/f")
			must(t, f.Truncate(2))
			must(t, f.Sync())
		}, map[string]string{"d": dirMark, "d/f": "ab"}},
		{"synced shrink, grow and write", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "abcdef")
			f := open(t, m, "d/f")
			must(t, f.Truncate(1))
			_, err := f.WriteAt([]byte("Z"), 3)
			must(t, err)
			must(t, f.Truncate(5))
			must(t, f.Sync())
		}, map[string]string{"d": dirMark, "d/f": "a\x00\x00Z\x00"}},
		{"unsynced O_TRUNC keeps old content", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "old")
			create(t, m, "d/f", "x", false)
		}, map[string]string{"d": dirMark, "d/f": "old"}},
		{"unsynced punch reverts, synced zero stays", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/f", "abcdef")
			durable(t, m, "d/g", "abcdef")
			must(t, open(t, m, "d/f").PunchHole(1, 2))
			g := open(t, m, "d/g")
			must(t, g.ZeroRange(1, 2))
			must(t, g.Sync())
		}, map[string]string{"d": dirMark, "d/f": "abcdef", "d/g": "a\x00\x00def"}},
		{"new directory without SyncDir of its parent disappears", func(t *testing.T, m *MemFS) {
			must(t, m.MkdirAll("d/sub", 0o755))
			durable(t, m, "d/sub/f", "F")
		}, map[string]string{"d": dirMark}},
		{"new directory with SyncDir of its parent", func(t *testing.T, m *MemFS) {
			must(t, m.MkdirAll("d/sub/sub2", 0o755))
			must(t, m.SyncDir("d"))
			durable(t, m, "d/sub/f", "F") // syncs d/sub, so sub2 too
		}, map[string]string{"d": dirMark, "d/sub": dirMark, "d/sub/f": "F", "d/sub/sub2": dirMark}},
		{"unsynced removal of a directory reverts", func(t *testing.T, m *MemFS) {
			must(t, m.MkdirAll("d/sub", 0o755))
			must(t, m.SyncDir("d"))
			durable(t, m, "d/sub/f", "F")
			must(t, m.Remove("d/sub/f"))
			must(t, m.SyncDir("d/sub"))
			must(t, m.Remove("d/sub"))
		}, map[string]string{"d": dirMark, "d/sub": dirMark}},
		{"writes through a handle follow the file's new name", func(t *testing.T, m *MemFS) {
			durable(t, m, "d/a", "hello")
			f := open(t, m, "d/a")
			must(t, m.Rename("d/a", "d/b"))
			must(t, m.SyncDir("d"))
			_, err := f.WriteAt([]byte("J"), 0)
			must(t, err)
			must(t, f.Sync())
		}, map[string]string{"d": dirMark, "d/b": "Jello"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := NewMemFS()
			must(t, m.MkdirAll("d", 0o755))
			must(t, m.SyncDir("."))
			tc.run(t, m)
			before := tree(t, m)
			c := m.CrashClone()
			if got := tree(t, c); !maps.Equal(got, tc.want) {
				t.Fatalf("after crash:\n got %q\nwant %q", got, tc.want)
			}
			if got := tree(t, c.CrashClone()); !maps.Equal(got, tc.want) {
				t.Fatalf("clone is not all durable: crashing it again gives %q", got)
			}
			if got := tree(t, m); !maps.Equal(got, before) {
				t.Fatalf("CrashClone changed the original:\n got %q\nwant %q", got, before)
			}
		})
	}
}

func TestMemFSCloneIndependent(t *testing.T) {
	m := NewMemFS()
	create(t, m, "f", "old", true)
	must(t, m.SyncDir("/"))
	c := m.CrashClone()
	create(t, c, "f", "clone", true)
	create(t, c, "g", "new", true)
	must(t, c.SyncDir("/"))
	if got := tree(t, m); !maps.Equal(got, map[string]string{"f": "old"}) {
		t.Fatalf("original = %q", got)
	}
	create(t, m, "f", "orig", true)
	if got := readString(t, c, "f"); got != "clone" {
		t.Fatalf("clone f = %q", got)
	}
}

// dense is the obvious model of a file's content, to check MemFS's sparse one.
type dense []byte

func (d dense) write(b []byte, off int64) dense {
	if end := off + int64(len(b)); end > int64(len(d)) {
		d = append(d, make([]byte, end-int64(len(d)))...)
	}
	copy(d[off:], b)
	return d
}

func (d dense) truncate(n int64) dense {
	if n <= int64(len(d)) {
		return slices.Clone(d[:n])
	}
	return append(d, make([]byte, n-int64(len(d)))...)
}

func (d dense) zero(off, n int64) dense {
	if off < int64(len(d)) {
		clear(d[off:min(off+n, int64(len(d)))])
	}
	return d
}

func TestMemFSCrashCloneRandomFile(t *testing.T) {
	base := "aaaaaaaaaaaaaaaaaaaa"
	type op struct {
		apply func(f File) error
		model func(d dense) dense
	}
	write := func(s string, off int64) op {
		return op{
			func(f File) error { _, err := f.WriteAt([]byte(s), off); return err },
			func(d dense) dense { return d.write([]byte(s), off) },
		}
	}
	ops := []op{
		write("bbbb", 2),
		{func(f File) error { return f.Truncate(10) }, func(d dense) dense { return d.truncate(10) }},
		write("cc", 15),
		{func(f File) error { return f.PunchHole(0, 3) }, func(d dense) dense { return d.zero(0, 3) }},
		write("dddd", 8),
		{func(f File) error { return f.ZeroRange(16, 2) }, func(d dense) dense { return d.zero(16, 2) }},
	}
	// Every outcome the contract allows: a subset of the unsynced changes,
	// applied in order on the synced content.
	allowed := map[string]bool{}
	for mask := range 1 << len(ops) {
		d := dense(base)
		for i, op := range ops {
			if mask&(1<<i) != 0 {
				d = op.model(slices.Clone(d))
			}
		}
		allowed[string(d)] = true
	}
	m := NewMemFS()
	create(t, m, "f", base, true)
	must(t, m.SyncDir("."))
	f := open(t, m, "f")
	for _, op := range ops {
		must(t, op.apply(f))
	}
	all := string(func() dense {
		d := dense(base)
		for _, op := range ops {
			d = op.model(d)
		}
		return d
	}())
	if got := readString(t, m, "f"); got != all {
		t.Fatalf("current content %q, want %q", got, all)
	}

	seen := map[string]bool{}
	for seed := range uint64(300) {
		got := readString(t, m.CrashCloneRandom(rand.New(rand.NewPCG(seed, 1))), "f")
		if !allowed[got] {
			t.Fatalf("seed %d: %q is not the synced content plus some unsynced changes", seed, got)
		}
		if again := readString(t, m.CrashCloneRandom(rand.New(rand.NewPCG(seed, 1))), "f"); again != got {
			t.Fatalf("seed %d: not deterministic: %q then %q", seed, got, again)
		}
		seen[got] = true
	}
	if !seen[base] || !seen[all] || len(seen) < len(allowed)/2 {
		t.Fatalf("300 random crashes gave %d of %d outcomes (none kept: %v, all kept: %v)",
			len(seen), len(allowed), seen[base], seen[all])
	}
	if got := readString(t, m.CrashClone(), "f"); got != base {
		t.Fatalf("CrashClone = %q", got)
	}
}

func TestMemFSCrashCloneRandomDir(t *testing.T) {
	m := NewMemFS()
	must(t, m.MkdirAll("d", 0o755))
	must(t, m.SyncDir("."))
	create(t, m, "d/old", "OLD", true)
	must(t, m.SyncDir("d"))
	must(t, m.Remove("d/old"))
	names := []string{"old"}
	for i := range 6 {
		n := fmt.Sprintf("f%d", i)
		create(t, m, "d/"+n, n, true)
		names = append(names, n)
	}
	create(t, m, "d/never", "x", true)
	must(t, m.Remove("d/never")) // created and removed: must never appear

	present := map[string]int{}
	const runs = 200
	for seed := range uint64(runs) {
		c := m.CrashCloneRandom(rand.New(rand.NewPCG(seed, 2)))
		got := tree(t, c)
		for p, content := range got {
			n := path.Base(p)
			switch {
			case p == "d":
			case n == "old" && content == "OLD", n != "old" && content == n && slices.Contains(names, n):
				present[n]++
			default:
				t.Fatalf("seed %d: unexpected %s = %q", seed, p, content)
			}
		}
	}
	for _, n := range names {
		if present[n] == 0 || present[n] == runs {
			t.Errorf("%s present in %d of %d crashes; want some but not all", n, present[n], runs)
		}
	}
}

// TestMemFSSparse checks disk-sized files cost only what is written.
func TestMemFSSparse(t *testing.T) {
	m := NewMemFS()
	create(t, m, "disk", "", true)
	must(t, m.SyncDir("."))
	f := open(t, m, "disk")
	const size = 1 << 40
	must(t, f.Truncate(size))
	_, err := f.WriteAt([]byte("xyz"), size/2-1)
	must(t, err)
	must(t, f.Sync())
	buf := make([]byte, 5)
	c := m.CrashClone()
	cf := open(t, c, "disk")
	_, err = cf.ReadAt(buf, size/2-2)
	must(t, err)
	if string(buf) != "\x00xyz\x00" {
		t.Fatalf("read %q", buf)
	}
	if n, _ := cf.Size(); n != size {
		t.Fatalf("size %d", n)
	}
	must(t, f.PunchHole(0, size))
	must(t, f.Truncate(0))
	must(t, f.Truncate(size))
	_, err = f.ReadAt(buf, size/2-2)
	must(t, err)
	if string(buf) != "\x00\x00\x00\x00\x00" {
		t.Fatalf("read %q after punch", buf)
	}
}

// FuzzMemFSFile runs a program of file operations on MemFS and on the dense
// model, comparing content after every step and after crashes.
func FuzzMemFSFile(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6})
	f.Add([]byte{0, 0x10, 0x00, 4, 0x0f, 0xf0, 5, 2, 0x0f, 0xff, 0x20, 6, 1, 0x03, 0x00, 6})
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		prog := make([]byte, 200)
		for i := range prog {
			prog[i] = byte(rng.Uint32())
		}
		f.Add(prog)
	}
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) > 1000 {
			t.Skip("long programs only repeat short ones, slowly") // each step compares the whole file
		}
		m := NewMemFS()
		create(t, m, "f", "", true)
		must(t, m.SyncDir("."))
		file := open(t, m, "f")
		var cur, synced dense
		next := func() int64 {
			if len(prog) == 0 {
				return 0
			}
			b := prog[0]
			prog = prog[1:]
			return int64(b)
		}
		// Offsets up to 16 KiB cross several 4 KiB chunks.
		offset := func() int64 { return (next()<<8 | next()) % (4 * chunkSize) }
		for len(prog) > 0 {
			switch next() % 7 {
			case 0:
				off, n := offset(), next()*37+1
				b := bytes.Repeat([]byte{byte(n) | 1}, int(n))
				_, err := file.WriteAt(b, off)
				must(t, err)
				cur = cur.write(b, off)
			case 1:
				n := offset()
				must(t, file.Truncate(n))
				cur = cur.truncate(n)
			case 2, 3:
				off, n := offset(), offset()+1
				must(t, file.PunchHole(off, n))
				cur = cur.zero(off, n)
			case 4:
				must(t, file.Sync())
				synced = slices.Clone(cur)
			case 5:
				if got := readString(t, m.CrashClone(), "f"); got != string(synced) {
					t.Fatalf("crash: got %d bytes, want %d", len(got), len(synced))
				}
			case 6:
				off := offset()
				buf := make([]byte, next()*67+1)
				n, err := file.ReadAt(buf, off)
				want := []byte{}
				if off < int64(len(cur)) {
					want = cur[off:min(int64(len(cur)), off+int64(len(buf)))]
				}
				if n != len(want) || (err == io.EOF) != (n < len(buf)) || (err != nil && err != io.EOF) {
					t.Fatalf("ReadAt(%d bytes, %d) = %d, %v; want %d", len(buf), off, n, err, len(want))
				}
				if !bytes.Equal(buf[:n], want) {
					t.Fatalf("ReadAt(%d bytes, %d) content differs", len(buf), off)
				}
			}
			if got := readString(t, m, "f"); got != string(cur) {
				t.Fatalf("content: got %d bytes, want %d", len(got), len(cur))
			}
		}
	})
}

// TestMemFSConcurrent runs writers at distinct offsets of one file alongside
// syncs, crash clones and namespace changes; run it with -race.
func TestMemFSConcurrent(t *testing.T) {
	m := NewMemFS()
	must(t, m.MkdirAll("d", 0o755))
	create(t, m, "d/f", "", false)
	must(t, m.SyncDir("d"))
	must(t, m.SyncDir("."))
	f := open(t, m, "d/f")
	const writers, blocks, bs = 8, 50, 1000
	var wg sync.WaitGroup
	done := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			for i := range blocks {
				off := int64((w*blocks + i) * bs)
				if _, err := f.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, bs), off); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	var bg sync.WaitGroup
	bg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			if err := f.Sync(); err != nil {
				t.Error(err)
			}
			m.CrashCloneRandom(rand.New(rand.NewPCG(uint64(i), 3)))
			if _, err := m.Stat("d/f"); err != nil {
				t.Error(err)
			}
		}
	})
	bg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			name := fmt.Sprintf("d/tmp%d", i%3)
			g, err := m.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Error(err)
				return
			}
			g.WriteAt([]byte("x"), int64(i))
			g.Close()
			m.Rename(name, "d/tmp")
			m.SyncDir("d")
			m.ReadDir("d")
		}
	})
	wg.Wait()
	close(done)
	bg.Wait()
	must(t, f.Sync())
	want := make([]byte, 0, writers*blocks*bs)
	for w := range writers {
		want = append(want, bytes.Repeat([]byte{byte(w + 1)}, blocks*bs)...)
	}
	if got := readString(t, m.CrashClone(), "d/f"); got != string(want) {
		t.Fatal("content after concurrent writes differs")
	}
}
