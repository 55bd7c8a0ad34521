package snapshot

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// flipByte changes one byte of a file and syncs it.
func flipByte(t *testing.T, fsys vfs.FS, name string, off int64) {
	t.Helper()
	f, err := fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	f.Sync()
}

// TestDamageIsReported: damage a crash cannot explain makes Open fail with
// ErrCorrupt, a View read fail, and a Rollback fail without touching the
// images.
func TestDamageIsReported(t *testing.T) {
	b, mem := base(t, 30)
	seg1 := b.dir + "/" + segName(1) // closed segment of point 3
	for _, tc := range []struct {
		name string
		mut  func(fsys vfs.FS)
	}{
		{"closed segment payload", func(fsys vfs.FS) { flipByte(t, fsys, seg1, segHeaderSize+recHeaderSize+5) }},
		{"closed segment header", func(fsys vfs.FS) { flipByte(t, fsys, seg1, 9) }},
		{"manifest", func(fsys vfs.FS) { flipByte(t, fsys, b.dir+"/"+manifestFile, 20) }},
		{"segment missing", func(fsys vfs.FS) { fsys.Remove(seg1) }},
		{"rollback intent", func(fsys vfs.FS) {
			vfs.WriteFileAtomic(fsys, b.dir+"/"+intentFile, []byte("not an intent"), 0o600)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fsys := mem.CrashClone()
			tc.mut(fsys)
			h := b.fork(t, fsys, 1)
			if _, err := Open(h.config()); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("open: %v, want ErrCorrupt", err)
			}
		})
	}

	// Damage after Open: found when the record is read.
	fsys := mem.CrashClone()
	h := b.fork(t, fsys, 1)
	h.open()
	defer h.s.Close()
	h.s.mu.RLock()
	var key uint64
	var loc int64
	h.s.points[0].seg.idx.each(func(k uint64, l int64) error {
		if !isZeroLoc(l) {
			key, loc = k, l
		}
		return nil
	})
	h.s.mu.RUnlock()
	if loc == 0 {
		t.Fatal("no data record in the oldest segment")
	}
	flipByte(t, fsys, seg1, locOffset(loc)+recHeaderSize+100)
	v, err := h.s.View("3")
	if err != nil {
		t.Fatal(err)
	}
	disk, block := splitKey(key)
	if _, err := v.Disk(disk).ReadAt(make([]byte, 10), block*BlockSize); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("view read of a damaged record: %v", err)
	}
	v.Close()
	if err := h.s.Rollback("3"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("rollback over a damaged record: %v", err)
	}
	h.checkImages(h.model)
	if names, _ := fsys.ReadDir(h.dir); slices.Contains(names, intentFile) {
		t.Fatal("a refused rollback left its intent")
	}
	// Nothing else broke: the newer points still read, apply goes on.
	h.checkView("6", h.at[6])
	h.step()
}

// step is one thing the fault workload does; it may be done again after a
// failure.
type faultStep struct {
	name string
	do   func(h *harness) error
	// done tells, after a failure and a reopen, whether the step took
	// effect anyway (a rollback whose intent became durable) and updates
	// the model if so.
	done func(h *harness) bool
}

// faultWorkload: cycles with a point, a prune, a rollback.
func faultWorkload(h *harness) []faultStep {
	var steps []faultStep
	for range 4 {
		c := h.cycle + uint64(len(steps)) + 1
		ops := h.randomOps()
		take := c%h.every == 0
		steps = append(steps, faultStep{
			name: fmt.Sprintf("cycle %d", c),
			do: func(h *harness) error {
				if err := h.applyOps(c, ops, take); err != nil {
					return err
				}
				h.commit(c, ops, take)
				return nil
			},
		})
	}
	steps = append(steps, faultStep{name: "prune", do: func(h *harness) error { return h.s.Prune(3) }})
	steps = append(steps, faultStep{
		name: "rollback",
		do: func(h *harness) error {
			if err := h.s.Rollback("9"); err != nil {
				return err
			}
			h.model, h.cycle = cloneImages(h.at[9]), 9
			return nil
		},
		done: func(h *harness) bool {
			if slices.Contains(pointCycles(h.s.Points()), 9) {
				return false
			}
			h.model, h.cycle = cloneImages(h.at[9]), 9
			return true
		},
	})
	return steps
}

// TestErrorInjection fails, one at a time, every write (or makes it short),
// sync, directory sync, rename, remove, truncate, open, punch and read the
// workload makes (the Store's and the images'). The error must come back,
// and nothing be claimed done. Then the caller recovers in one of three
// ways: retries on the same Store (opening it again only when it says
// ErrBroken), or closes and opens it, with or without a power cut first;
// and redoes what failed. Every point and the images must then be exact, in
// memory and after another Open.
func TestErrorInjection(t *testing.T) {
	b, mem := base(t, 31)
	type injector struct {
		op     vfs.Op
		short  bool // a short write (io.ErrShortWrite) rather than an error
		inject func(efs *vfs.ErrorFS, n int)
	}
	var injectors []injector
	for _, op := range []vfs.Op{vfs.OpWrite, vfs.OpSync, vfs.OpSyncDir, vfs.OpRename, vfs.OpRemove, vfs.OpTruncate, vfs.OpOpen, vfs.OpPunch, vfs.OpRead} {
		injectors = append(injectors, injector{op: op, inject: func(efs *vfs.ErrorFS, n int) { efs.InjectAfter(op, n, vfs.ErrInjected) }})
	}
	injectors = append(injectors, injector{op: vfs.OpWrite, short: true, inject: func(efs *vfs.ErrorFS, n int) { efs.InjectShortWrite(n) }})
	for _, inj := range injectors {
		op := inj.op
		wantErr := vfs.ErrInjected
		if inj.short {
			wantErr = io.ErrShortWrite
		}
		for _, mode := range []string{"retry", "reopen", "crash"} {
			if mode == "crash" && op == vfs.OpRead {
				continue // a failed read changes nothing a crash could show
			}
			t.Run(fmt.Sprintf("%v/short=%v/%s", op, inj.short, mode), func(t *testing.T) {
				t.Parallel()
				failures, swallowed := 0, 0
				for n := 0; ; n++ {
					inner := mem.CrashClone()
					efs := vfs.NewErrorFS(inner)
					h := b.fork(t, efs, 5)
					h.open()
					steps := faultWorkload(h)
					calls := efs.Count(op)
					inj.inject(efs, n)
					failed := -1
					for i, st := range steps {
						if err := st.do(h); err != nil {
							if !errors.Is(err, wantErr) {
								t.Fatalf("%v #%d, %s: %v", op, n, st.name, err)
							}
							failed = i
							break
						}
					}
					fired := efs.Count(op)-calls > int64(n)
					efs.Reset()
					if !fired {
						if n == 0 {
							t.Fatalf("%v: the workload makes no such call", op)
						}
						h.checkPoints()
						h.s.Close()
						t.Logf("%v short=%v %s: %d calls failed, %d failures only logged", op, inj.short, mode, failures, swallowed)
						break
					}
					reopen := func(crash bool) {
						h.s.Close()
						if crash {
							h.fs = inner.CrashClone()
						}
						s, err := Open(h.config())
						if err != nil {
							t.Fatalf("%v #%d %s: open: %v", op, n, mode, err)
						}
						h.s = s
					}
					h.quick = true
					if mode != "retry" {
						reopen(mode == "crash")
					}
					if failed < 0 {
						// Only removals of what the manifest no longer
						// names (and the directory sync after them) may
						// fail unreported: Open removes leftovers.
						if op != vfs.OpRemove && op != vfs.OpSyncDir {
							t.Fatalf("%v #%d: the injected error was not returned", op, n)
						}
						swallowed++
					} else {
						failures++
						for _, st := range steps[failed:] {
							if st.done != nil && st.done(h) {
								continue
							}
							err := st.do(h)
							if errors.Is(err, ErrBroken) && mode == "retry" {
								reopen(false)
								if st.done != nil && st.done(h) {
									continue
								}
								err = st.do(h)
							}
							if err != nil {
								t.Fatalf("%v #%d %s: redo %s: %v", op, n, mode, st.name, err)
							}
						}
					}
					if mode == "retry" {
						h.checkPoints() // what the Store kept in memory
					}
					reopen(false)
					h.checkPoints()
					if got := pointCycles(h.s.Points()); !slices.Equal(got, []uint64{6}) {
						t.Fatalf("%v #%d %s: points %v after the workload", op, n, mode, got)
					}
					if names, _ := h.fs.ReadDir(h.dir); len(names) != 2 {
						t.Fatalf("%v #%d %s: points dir holds %v", op, n, mode, names)
					}
					h.s.Close()
				}
			})
		}
	}
}

// TestBrokenUntilReopened: after a failed write or sync of its files, or a
// manifest that may or may not have been replaced, the Store refuses every
// mutating call until it is opened again: memory and disk may disagree.
func TestBrokenUntilReopened(t *testing.T) {
	b, mem := base(t, 32)
	for _, tc := range []struct {
		name string
		fail func(h *harness, efs *vfs.ErrorFS) error
	}{
		{"sync", func(h *harness, efs *vfs.ErrorFS) error {
			if err := h.s.BeforeWrite(0, 0, 3*BlockSize); err != nil {
				t.Fatal(err)
			}
			efs.InjectAfter(vfs.OpSync, 0, vfs.ErrInjected)
			return h.s.Sync()
		}},
		{"append", func(h *harness, efs *vfs.ErrorFS) error {
			efs.InjectShortWrite(0)
			return h.s.BeforeWrite(1, 0, 3*BlockSize)
		}},
		{"manifest rename", func(h *harness, efs *vfs.ErrorFS) error {
			efs.InjectAfter(vfs.OpRename, 0, vfs.ErrInjected)
			return h.s.Cycle(11, time.Now(), false, true)
		}},
		{"manifest dir sync", func(h *harness, efs *vfs.ErrorFS) error {
			efs.InjectAfterPath(vfs.OpSyncDir, "", 1, vfs.ErrInjected) // the segment's, then the manifest's
			return h.s.Cycle(11, time.Now(), false, true)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			efs := vfs.NewErrorFS(mem.CrashClone())
			h := b.fork(t, efs, 1)
			h.open()
			if err := tc.fail(h, efs); !errors.Is(err, vfs.ErrInjected) && !errors.Is(err, io.ErrShortWrite) {
				t.Fatalf("injected failure: %v", err)
			}
			efs.Reset()
			for name, call := range map[string]func() error{
				"BeforeWrite": func() error { return h.s.BeforeWrite(0, 0, 1) },
				"Sync":        h.s.Sync,
				"Cycle":       func() error { return h.s.Cycle(50, time.Now(), false, true) },
				"Prune":       func() error { return h.s.Prune(0) },
				"Rollback":    func() error { return h.s.Rollback("3") },
				"View":        func() error { _, err := h.s.View("3"); return err },
			} {
				if err := call(); !errors.Is(err, ErrBroken) {
					t.Errorf("%s on a broken store: %v", name, err)
				}
			}
			h.reopen()
			if ps := h.s.Points(); len(ps) == 4 {
				h.at[11] = cloneImages(h.model) // the point's manifest was durable
			}
			h.cycle = 11
			h.step()
			h.checkPoints()
			h.s.Close()
		})
	}
}
