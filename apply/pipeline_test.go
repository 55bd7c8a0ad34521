package apply

import (
	"io/fs"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// holdFS holds the first fsync of an image after hold: an apply stops
// there, its image writes done and applied=N not yet recorded.
type holdFS struct {
	vfs.FS
	mu      sync.Mutex
	armed   bool
	reached chan struct{}
	release chan struct{}
}

func (h *holdFS) hold() (reached, release chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.armed, h.reached, h.release = true, make(chan struct{}), make(chan struct{})
	return h.reached, h.release
}

func (h *holdFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := h.FS.OpenFile(name, flag, perm)
	if err != nil || !strings.HasSuffix(name, imageExt) {
		return f, err
	}
	return &holdFile{File: f, fs: h}, nil
}

type holdFile struct {
	vfs.File
	fs *holdFS
}

func (f *holdFile) Sync() error {
	f.fs.mu.Lock()
	armed, reached, release := f.fs.armed, f.fs.reached, f.fs.release
	f.fs.armed = false
	f.fs.mu.Unlock()
	if armed {
		close(reached)
		<-release
	}
	return f.File.Sync()
}

// The primary uploads cycle N+1 while the commit of N runs (ship's
// pipeline): chunks are staged while an apply holds the VM, the state
// answered meanwhile says N-1 (a commit answers only once its cycle is
// applied), and N+1's commit, sent after N's answer, applies on top.
func TestNextCycleStagedWhileCommitApplies(t *testing.T) {
	hfs := &holdFS{FS: vfs.Default}
	_, a, dir := setup(t, hfs)
	want := newModel(testDisks)
	r := rand.New(rand.NewPCG(3, 4))
	ops1 := randomOps(r, testDisks, 10)
	a.send("vm1", "c1", buildStream(t, cycleHeader("vm1", 1, 0), ops1))
	want.apply(ops1)

	ops2, ops3 := randomOps(r, testDisks, 20), randomOps(r, testDisks, 20)
	s2, s3 := buildStream(t, cycleHeader("vm1", 2, 1), ops2), buildStream(t, cycleHeader("vm1", 3, 2), ops3)
	a.upload("vm1", "c2", s2)
	reached, release := hfs.hold()
	type answer struct {
		status int
		rep    wire.Replica
		e      wire.Error
	}
	done := make(chan answer, 1)
	go func() {
		status, rep, e := a.commit("vm1", "c2")
		done <- answer{status, rep, e}
	}()
	<-reached // cycle 2 is being applied
	a.upload("vm1", "c3", s3)
	var got wire.Replica
	if status, e := a.call("GET", vmPath("vm1"), nil, &got); status != 200 || got.Applied != 1 {
		t.Fatalf("GET while cycle 2 is applied: %d %+v %+v", status, e, got)
	}
	select {
	case ans := <-done:
		t.Fatalf("commit of cycle 2 answered before its apply finished: %+v", ans)
	default:
	}
	close(release)
	if ans := <-done; ans.status != 200 || ans.rep.Applied != 2 {
		t.Fatalf("commit c2: %+v", ans)
	}
	want.apply(ops2)
	checkImages(t, vfs.Default, dir, testDisks, want)
	if status, rep, e := a.commit("vm1", "c3"); status != 200 || rep.Applied != 3 || !rep.Consistent {
		t.Fatalf("commit c3: %d %+v %+v", status, rep, e)
	}
	want.apply(ops3)
	checkImages(t, vfs.Default, dir, testDisks, want)
}

// A commit that failed after its intent (the apply hit an I/O error) left
// the cycle staged whole: its upload's offset says so, so the primary
// commits it again without sending a byte, and that commit finishes it.
func TestFailedApplyOffsetIsWholeStream(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.Default)
	_, a, dir := setup(t, efs)
	c2, _, want2 := cycleTwo(t, a)
	a.upload("vm1", "c2", c2)
	efs.InjectAfterPath(vfs.OpSync, ".img", 0, vfs.ErrInjected) // the images' fsync
	if status, _, e := a.commit("vm1", "c2"); status != http.StatusInternalServerError || e.Code != wire.CodeInternal {
		t.Fatalf("commit with a failing fsync: %d %+v", status, e)
	}
	var up wire.Upload
	if status, e := a.call("GET", vmPath("vm1")+"/uploads/c2", nil, &up); status != 200 || up.Offset != int64(len(c2)) {
		t.Fatalf("upload c2 after the failed apply: %d %+v %+v, want offset %d", status, e, up, len(c2))
	}
	// A chunk sent anyway (a primary whose stream differs) is refused
	// with the offset, not appended to the staged stream.
	if status, _, e := a.chunk("vm1", "c2", up.Offset, []byte("more")); status != http.StatusConflict || e.Code != wire.CodeOffset {
		t.Fatalf("chunk past the staged stream: %d %+v", status, e)
	}
	status, rep, e := a.commit("vm1", "c2")
	if status != 200 || rep.Applied != 2 || !rep.Consistent {
		t.Fatalf("commit again: %d %+v %+v", status, rep, e)
	}
	checkImages(t, vfs.Default, dir, testDisks, want2)
	if status, e := a.call("GET", vmPath("vm1")+"/uploads/c2", nil, &up); status != 200 || up.Offset != 0 {
		t.Fatalf("upload c2 after it was applied: %d %+v %+v", status, e, up)
	}
}
