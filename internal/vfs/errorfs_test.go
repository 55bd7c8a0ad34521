package vfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
)

// callOp makes one call of op through e on name, which exists and is a
// directory for directory ops and a file otherwise. Setup it needs (opening a
// file, closing it after, recreating a removed file) bypasses e, so only the
// call itself is counted.
func callOp(t *testing.T, e *ErrorFS, op Op, name string) error {
	t.Helper()
	switch op {
	case OpOpen:
		f, err := e.OpenFile(name, os.O_RDWR, 0)
		if err == nil {
			f.(*errorFile).inner.Close()
		}
		return err
	case OpSyncDir:
		return e.SyncDir(name)
	case OpRename:
		return e.Rename(name, name)
	case OpRemove:
		err := e.Remove(name)
		if err == nil {
			create(t, e.inner, name, "x", false)
		}
		return err
	case OpMkdir:
		return e.MkdirAll(name, 0o755)
	case OpReadDir:
		_, err := e.ReadDir(name)
		return err
	case OpStat:
		_, err := e.Stat(name)
		return err
	}
	inner, err := e.inner.OpenFile(name, os.O_RDWR, 0)
	must(t, err)
	f := &errorFile{fs: e, inner: inner}
	if op == OpClose {
		return f.Close()
	}
	defer inner.Close()
	switch op {
	case OpWrite:
		_, err = f.WriteAt([]byte("x"), 0)
	case OpRead:
		_, err = f.ReadAt(make([]byte, 1), 0)
	case OpSync:
		err = f.Sync()
	case OpTruncate:
		err = f.Truncate(1)
	case OpPunch:
		err = f.PunchHole(0, 1)
	default:
		t.Fatalf("no call for %v", op)
	}
	return err
}

func newErrorFS(t *testing.T) *ErrorFS {
	m := NewMemFS()
	must(t, m.MkdirAll("dir", 0o755))
	create(t, m, "file", "x", false)
	create(t, m, "other", "x", false)
	return NewErrorFS(m)
}

// target is a name of the right kind for op.
func target(op Op) string {
	switch op {
	case OpSyncDir, OpMkdir, OpReadDir:
		return "dir"
	}
	return "file"
}

func TestErrorFSInjectAfter(t *testing.T) {
	for op := range numOps {
		for _, n := range []int{0, 1, 3} {
			t.Run(fmt.Sprintf("%v/n=%d", op, n), func(t *testing.T) {
				e := newErrorFS(t)
				e.InjectAfter(op, n, ErrInjected)
				for i := range n + 3 {
					err := callOp(t, e, op, target(op))
					if (i == n) != errors.Is(err, ErrInjected) {
						t.Fatalf("call %d: %v; want failure only at call %d", i, err, n)
					}
					if i != n && err != nil {
						t.Fatalf("call %d: %v", i, err)
					}
				}
				if got := e.Count(op); got != int64(n+3) {
					t.Fatalf("Count = %d, want %d", got, n+3)
				}
			})
		}
	}
}

func TestErrorFSInjectAlwaysAndReset(t *testing.T) {
	e := newErrorFS(t)
	e.InjectAlways(OpSync, ErrInjected)
	f, err := e.OpenFile("file", os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	for range 3 {
		wantErr(t, f.Sync(), ErrInjected)
	}
	if _, err := f.WriteAt([]byte("y"), 0); err != nil {
		t.Fatalf("other op failed: %v", err)
	}
	e.Reset()
	must(t, f.Sync())
	if e.Count(OpSync) != 4 || e.Count(OpWrite) != 1 || e.Count(OpOpen) != 1 {
		t.Fatalf("counts sync %d write %d open %d", e.Count(OpSync), e.Count(OpWrite), e.Count(OpOpen))
	}
}

func TestErrorFSPathFilter(t *testing.T) {
	e := newErrorFS(t)
	e.InjectAfterPath(OpWrite, "oth", 1, ErrInjected)
	f, err := e.OpenFile("file", os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	g, err := e.OpenFile("other", os.O_RDWR, 0)
	must(t, err)
	defer g.Close()
	steps := []struct {
		f    File
		fail bool
	}{
		{f, false}, {g, false}, {f, false}, {f, false}, {g, true}, {g, false}, {f, false},
	}
	for i, s := range steps {
		_, err := s.f.WriteAt([]byte("y"), 0)
		if s.fail != (err != nil) || (err != nil && !errors.Is(err, ErrInjected)) {
			t.Fatalf("step %d (%s): %v, want failure %v", i, s.f.Name(), err, s.fail)
		}
	}
	if got := e.Count(OpWrite); got != int64(len(steps)) {
		t.Fatalf("Count = %d; counts ignore the filter", got)
	}

	// Rename matches either name.
	e.InjectAfterPath(OpRename, "new", 0, ErrInjected)
	must(t, e.Rename("file", "file2"))
	wantErr(t, e.Rename("file2", "new"), ErrInjected)
	must(t, e.Rename("file2", "new"))
}

func TestErrorFSFailedCallsDoNotHappen(t *testing.T) {
	e := newErrorFS(t)
	m := e.inner
	e.InjectAfter(OpRename, 0, ErrInjected)
	e.InjectAfter(OpRemove, 0, ErrInjected)
	e.InjectAfter(OpOpen, 0, ErrInjected)
	e.InjectAfter(OpMkdir, 0, ErrInjected)
	wantErr(t, e.Rename("file", "moved"), ErrInjected)
	wantErr(t, e.Remove("other"), ErrInjected)
	_, err := e.OpenFile("new", os.O_RDWR|os.O_CREATE, 0o600)
	wantErr(t, err, ErrInjected)
	wantErr(t, e.MkdirAll("newdir", 0o755), ErrInjected)
	names, err := m.ReadDir(".")
	must(t, err)
	if len(names) != 3 || names[0] != "dir" || names[1] != "file" || names[2] != "other" {
		t.Fatalf("names %q", names)
	}

	f, err := e.OpenFile("file", os.O_RDWR, 0)
	must(t, err)
	e.InjectAfter(OpWrite, 0, ErrInjected)
	e.InjectAfter(OpTruncate, 0, ErrInjected)
	e.InjectAfter(OpClose, 0, ErrInjected)
	_, err = f.WriteAt([]byte("NEW"), 0)
	wantErr(t, err, ErrInjected)
	wantErr(t, f.Truncate(0), ErrInjected)
	if got := readString(t, m, "file"); got != "x" {
		t.Fatalf("file = %q", got)
	}
	// A failed Close still closes, as close(2) does.
	wantErr(t, f.Close(), ErrInjected)
	_, err = f.ReadAt(make([]byte, 1), 0)
	wantErr(t, err, os.ErrClosed)
}

func TestErrorFSTwoInjections(t *testing.T) {
	e := newErrorFS(t)
	e.InjectAfter(OpStat, 2, ErrInjected)
	other := errors.New("other")
	e.InjectAfter(OpStat, 0, other)
	var got []error
	for range 4 {
		_, err := e.Stat("file")
		got = append(got, err)
	}
	if got[0] != other || got[1] != nil || got[2] != ErrInjected || got[3] != nil {
		t.Fatalf("errors %v", got)
	}
}

func TestErrorFSShortWrite(t *testing.T) {
	e := newErrorFS(t)
	f, err := e.OpenFile("file", os.O_RDWR|os.O_TRUNC, 0)
	must(t, err)
	defer f.Close()
	e.InjectShortWrite(1)
	for i, want := range []struct {
		n   int
		err error
	}{{6, nil}, {3, io.ErrShortWrite}, {6, nil}} {
		n, err := f.WriteAt([]byte("abcdef"), int64(10*i))
		if n != want.n || err != want.err {
			t.Fatalf("write %d = %d, %v; want %d, %v", i, n, err, want.n, want.err)
		}
	}
	if got := readString(t, e, "file"); got != "abcdef\x00\x00\x00\x00abc\x00\x00\x00\x00\x00\x00\x00abcdef" {
		t.Fatalf("content %q", got)
	}
}

func TestOpString(t *testing.T) {
	for op := range numOps {
		if s := op.String(); s == "" || s[0] == 'O' {
			t.Errorf("Op %d has no name: %q", op, s)
		}
	}
	if s := Op(99).String(); s != "Op(99)" {
		t.Errorf("Op(99) = %q", s)
	}
}

func TestErrorFSConcurrent(t *testing.T) {
	e := newErrorFS(t)
	e.InjectAfter(OpStat, 50, ErrInjected)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for range 8 {
		wg.Go(func() {
			for range 25 {
				if _, err := e.Stat("file"); err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if failed != 1 || e.Count(OpStat) != 200 {
		t.Fatalf("%d failures in %d calls; want 1 in 200", failed, e.Count(OpStat))
	}
}
