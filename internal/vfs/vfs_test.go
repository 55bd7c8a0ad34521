package vfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"testing"
)

// TestOSZeroKeepsSize checks PunchHole and ZeroRange past EOF keep the size, on
// the test's temp dir and on tmpfs (/dev/shm), which lacks FALLOC_FL_ZERO_RANGE
// and so takes the writeZeroes fallback.
func TestOSZeroKeepsSize(t *testing.T) {
	dirs := map[string]string{"tempdir": t.TempDir()}
	if d, err := os.MkdirTemp("/dev/shm", "vfstest"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		dirs["tmpfs"] = d
	} else {
		t.Logf("no tmpfs, fallback untested: %v", err)
	}
	for label, dir := range dirs {
		for _, zero := range []struct {
			name string
			fn   func(File, int64, int64) error
		}{
			{"PunchHole", File.PunchHole},
			{"ZeroRange", File.ZeroRange},
		} {
			t.Run(label+"/"+zero.name, func(t *testing.T) {
				f, err := Default.OpenFile(dir+"/f"+zero.name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 10000), 0); err != nil {
					t.Fatal(err)
				}
				if err := zero.fn(f, 5000, 20000); err != nil {
					t.Fatal(err)
				}
				if err := zero.fn(f, 50000, 100); err != nil {
					t.Fatal(err)
				}
				if size, err := f.Size(); err != nil || size != 10000 {
					t.Fatalf("size %d, %v; want 10000", size, err)
				}
				got := make([]byte, 10000)
				if _, err := f.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				want := append(bytes.Repeat([]byte{1}, 5000), make([]byte, 5000)...)
				if !bytes.Equal(got, want) {
					t.Fatal("content differs")
				}
			})
		}
	}
}

// TestWriteFileAtomicCrash fails each step of WriteFileAtomic in turn, then
// crashes: the file must hold its old content or the new, never a mix, and
// must not vanish when it existed. A retry after the failure must work.
func TestWriteFileAtomicCrash(t *testing.T) {
	const oldData, newData = "old content", "new content, longer than the old"
	const absent = "<absent>"
	inject := func(op Op) func(e *ErrorFS) {
		return func(e *ErrorFS) { e.InjectAfter(op, 0, ErrInjected) }
	}
	steps := []struct {
		name    string
		op      Op // the step that fails, for checking it was reached
		inject  func(e *ErrorFS)
		err     error
		renamed bool // whether the rename happened before the failure
	}{
		{"open", OpOpen, inject(OpOpen), ErrInjected, false},
		{"write", OpWrite, inject(OpWrite), ErrInjected, false},
		{"short write", OpWrite, func(e *ErrorFS) { e.InjectShortWrite(0) }, io.ErrShortWrite, false},
		{"sync", OpSync, inject(OpSync), ErrInjected, false},
		{"close", OpClose, inject(OpClose), ErrInjected, false},
		{"rename", OpRename, inject(OpRename), ErrInjected, false},
		{"syncdir", OpSyncDir, inject(OpSyncDir), ErrInjected, true},
		{"none", OpSyncDir, func(e *ErrorFS) {}, nil, true},
	}
	for _, name := range []string{"state", "d/state"} {
		for _, hadOld := range []bool{true, false} {
			for _, step := range steps {
				t.Run(fmt.Sprintf("%s/old=%v/%s", name, hadOld, step.name), func(t *testing.T) {
					m := NewMemFS()
					must(t, m.MkdirAll("d", 0o755))
					must(t, m.SyncDir("."))
					before := absent
					if hadOld {
						must(t, WriteFileAtomic(m, name, []byte(oldData), 0o600))
						before = oldData
					}
					content := func(fsys FS) string {
						t.Helper()
						got, err := ReadFile(fsys, name)
						if errors.Is(err, fs.ErrNotExist) {
							return absent
						}
						must(t, err)
						return string(got)
					}

					e := NewErrorFS(m)
					step.inject(e)
					err := WriteFileAtomic(e, name, []byte(newData), 0o600)
					if !errors.Is(err, step.err) || (step.err == nil) != (err == nil) {
						t.Fatalf("WriteFileAtomic: %v, want %v", err, step.err)
					}
					if e.Count(step.op) == 0 {
						t.Fatalf("step %v never reached", step.op)
					}
					live, crashed := before, before
					if step.renamed {
						live = newData
					}
					if err == nil {
						crashed = newData
					}
					if got := content(m); got != live {
						t.Fatalf("before crash %q, want %q", got, live)
					}
					if got := content(m.CrashClone()); got != crashed {
						t.Fatalf("after crash %q, want %q", got, crashed)
					}
					// Unsynced changes surviving in part may bring in the
					// new file, whole; never part of it.
					for seed := range uint64(40) {
						got := content(m.CrashCloneRandom(rand.New(rand.NewPCG(seed, 4))))
						if got != before && got != newData {
							t.Fatalf("seed %d: after crash %q, want %q or %q", seed, got, before, newData)
						}
					}
					e.Reset()
					must(t, WriteFileAtomic(e, name, []byte(newData), 0o600))
					if got := content(m.CrashClone()); got != newData {
						t.Fatalf("after retry and crash %q", got)
					}
				})
			}
		}
	}
}

// TestOSDirectAfterRename: WriteDirectAt and ReadDirectAt work on a file
// renamed since it was opened (a journal segment is created under a
// temporary name), and see the plain writes and reads of the same file.
func TestOSDirectAfterRename(t *testing.T) {
	dir := t.TempDir()
	f, err := Default.OpenFile(dir+"/a.tmp", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Default.Rename(dir+"/a.tmp", dir+"/a"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("plain"), 0); err != nil {
		t.Fatal(err)
	}
	buf := AlignedBuffer(2 * DirectAlign)
	for i := range buf {
		buf[i] = byte(i)
	}
	if _, err := f.(DirectWriter).WriteDirectAt(buf, DirectAlign); err != nil {
		t.Fatalf("WriteDirectAt after rename: %v", err)
	}
	got := AlignedBuffer(3 * DirectAlign)
	if _, err := f.(DirectReader).ReadDirectAt(got, 0); err != nil {
		t.Fatalf("ReadDirectAt after rename: %v", err)
	}
	if string(got[:5]) != "plain" || !bytes.Equal(got[DirectAlign:], buf) {
		t.Fatal("direct read does not see what was written")
	}
	if _, err := Default.Stat(dir + "/a.tmp"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("old name: %v, want it gone (nothing recreated it)", err)
	}
}

// TestMemDirectAlignment: MemFS refuses misaligned direct requests as the
// kernel would, and ErrorFS passes direct calls through with its faults.
func TestMemDirectAlignment(t *testing.T) {
	mem := NewMemFS()
	efs := NewErrorFS(mem)
	for name, fsys := range map[string]FS{"mem": mem, "errorfs": efs} {
		f, err := fsys.OpenFile("/f-"+name, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		buf := AlignedBuffer(2 * DirectAlign)
		dw, dr := f.(DirectWriter), f.(DirectReader)
		for _, bad := range []struct {
			p   []byte
			off int64
		}{{buf, 512}, {buf[:100], 0}, {buf[1 : DirectAlign+1], 0}} {
			if _, err := dw.WriteDirectAt(bad.p, bad.off); err == nil {
				t.Errorf("%s: misaligned WriteDirectAt (%d bytes at %d) succeeded", name, len(bad.p), bad.off)
			}
			if _, err := dr.ReadDirectAt(bad.p, bad.off); err == nil {
				t.Errorf("%s: misaligned ReadDirectAt (%d bytes at %d) succeeded", name, len(bad.p), bad.off)
			}
		}
		buf[0] = 7
		if _, err := dw.WriteDirectAt(buf, DirectAlign); err != nil {
			t.Fatal(err)
		}
		got := AlignedBuffer(DirectAlign)
		if _, err := dr.ReadDirectAt(got, DirectAlign); err != nil || got[0] != 7 {
			t.Fatalf("%s: read back %d, %v", name, got[0], err)
		}
	}
	efs.InjectShortWrite(0)
	f, _ := efs.OpenFile("/f-errorfs", os.O_RDWR, 0)
	n, err := f.(DirectWriter).WriteDirectAt(AlignedBuffer(3*DirectAlign), 0)
	if !errors.Is(err, io.ErrShortWrite) || n != DirectAlign {
		t.Fatalf("short direct write: %d, %v; want %d bytes (whole blocks) and ErrShortWrite", n, err, DirectAlign)
	}
}
