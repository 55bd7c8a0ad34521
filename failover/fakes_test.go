package failover

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"testing"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// The fakes keep the two records the way the daemon and apply do: each
// change is one atomic file write (vfs.WriteFileAtomic) on a MemFS, so
// MemFS.CrashClone after a crash point is the state a restart finds. What
// is not in a file (which VMs are served) is lost with the crash.

// crashed is the panic a crash point raises in the tests.
type crashed struct{ step string }

// world is one host: its filesystem, registry, replica role and machine.
type world struct {
	t     *testing.T
	mem   *vfs.MemFS
	efs   *vfs.ErrorFS
	host  *fakeHost
	rep   *fakeReplica
	m     *Machine
	armed string
	hit   []string // the crash points passed, in order
}

func newWorld(t *testing.T, mem *vfs.MemFS) *world {
	w := &world{t: t, mem: mem, efs: vfs.NewErrorFS(mem)}
	if err := mem.MkdirAll("/state", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := mem.SyncDir("/"); err != nil {
		t.Fatal(err)
	}
	w.host = &fakeHost{w: w, served: map[string]bool{}}
	w.rep = &fakeReplica{w: w}
	w.m = New(Config{Host: w.host, Replica: w.rep, Crash: w.crash})
	return w
}

func (w *world) crash(step string) {
	w.hit = append(w.hit, step)
	if step == w.armed {
		panic(crashed{step})
	}
}

// run runs f, reporting the crash point it stopped at ("" if none) and
// its error.
func (w *world) run(f func() error) (step string, err error) {
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(crashed)
			if !ok {
				panic(r)
			}
			step = c.step
		}
	}()
	return "", f()
}

// restart is the host after a power cut: only what was synced is kept,
// the replica role recovers, the registry is reconciled and the VMs that
// can be are served.
func (w *world) restart() *world {
	n := newWorld(w.t, w.mem.CrashClone())
	n.rep.recover()
	reg := n.host.load()
	var es []Entry
	for _, name := range slices.Sorted(maps.Keys(reg)) {
		es = append(es, Entry{Name: name, FailedOver: reg[name].FailedOver, PromotedFrom: reg[name].PromotedFrom})
	}
	for _, f := range n.m.Reconcile(es) {
		switch f.Action {
		case Forget:
			delete(reg, f.VM)
		case MarkCompleted:
			e := reg[f.VM]
			e.FailedOver = false
			reg[f.VM] = e
		case Register:
			reg[f.VM] = hostEntry{FailedOver: true}
		}
	}
	n.host.save(reg)
	for name, e := range reg {
		st := StateOf(&Entry{Name: name, FailedOver: e.FailedOver}, n.rep.Status(name))
		n.host.served[name] = st == Served || st == Primary
	}
	return n
}

// state is the state of vm as the two records and the served set say.
func (w *world) state(vm string) State {
	r := w.rep.Status(vm)
	_, r.Rolled = w.rep.FailedOver()[vm]
	e, ok := w.host.Entry(vm)
	if !ok {
		return StateOf(nil, r)
	}
	return StateOf(&e, r)
}

// hostEntry is a VM in the fake registry.
type hostEntry struct {
	FailedOver   bool   `json:"failed_over,omitempty"`
	PromotedFrom string `json:"promoted_from,omitempty"`
}

const regFile = "/state/vms.json"

type fakeHost struct {
	w       *world
	served  map[string]bool
	failRel error // Release's close of the journal fails with it
}

// loadRecord reads the record in file of format into v; no file leaves v
// as it is.
func (w *world) loadRecord(fsys vfs.FS, file, format string, v any) {
	b, err := vfs.ReadFile(fsys, file)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err == nil {
		err = statefile.Decode(format, 1, b, v)
	}
	if err != nil {
		w.t.Fatalf("%s: %v", file, err)
	}
}

func (h *fakeHost) load() map[string]hostEntry {
	m := map[string]hostEntry{}
	h.w.loadRecord(h.w.efs, regFile, "test-registry", &m)
	return m
}

func (h *fakeHost) save(m map[string]hostEntry) error {
	b, err := statefile.Encode("test-registry", 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(h.w.efs, regFile, b, 0o600)
}

func (h *fakeHost) Entry(vm string) (Entry, bool) {
	e, ok := h.load()[vm]
	return Entry{Name: vm, FailedOver: e.FailedOver, PromotedFrom: e.PromotedFrom, Served: h.served[vm]}, ok
}

func (h *fakeHost) Register(vm string, t Target, fresh bool, promotedFrom string) error {
	m := h.load()
	m[vm] = hostEntry{FailedOver: true, PromotedFrom: promotedFrom}
	if err := h.save(m); err != nil {
		return err
	}
	h.served[vm] = true
	return nil
}

func (h *fakeHost) Release(vm, why string, change func() error) error {
	h.served[vm] = false
	err := h.failRel
	if err == nil {
		err = change()
	}
	if err != nil {
		h.served[vm] = true
	}
	return err
}

func (h *fakeHost) Forget(vm string) {
	m := h.load()
	delete(m, vm)
	delete(h.served, vm)
	if err := h.save(m); err != nil {
		h.w.t.Logf("forget %s: %v (Reconcile finishes it)", vm, err)
	}
}

func (h *fakeHost) MarkCompleted(vm, promotedFrom string) error {
	m := h.load()
	e, ok := m[vm]
	if !ok {
		return fmt.Errorf("no VM %s", vm)
	}
	e.FailedOver = false
	if promotedFrom != "" {
		e.PromotedFrom = promotedFrom
	}
	m[vm] = e
	return h.save(m)
}

func (h *fakeHost) StopExtension(vm string) string { return "" }
func (h *fakeHost) EndTest(vm string) error        { return nil }

// repRecord is a replica VM in the fake replica role, with apply's
// failover record.
type repRecord struct {
	Applied  uint64    `json:"applied"`
	Points   []string  `json:"points"`
	Failover *repFover `json:"failover,omitempty"`
	Adopted  bool      `json:"adopted,omitempty"`
}

type repFover struct {
	wire.FailedOver
	Reverted   bool `json:"reverted,omitempty"`
	Cancelling bool `json:"cancelling,omitempty"`
	Completing bool `json:"completing,omitempty"`
}

const repFile = "/state/replica.json"

var errNoReplica = errors.New("fake replica: unknown VM")

type fakeReplica struct{ w *world }

func (r *fakeReplica) load() map[string]*repRecord {
	m := map[string]*repRecord{}
	r.w.loadRecord(r.w.mem, repFile, "test-replica", &m)
	return m
}

func (r *fakeReplica) save(m map[string]*repRecord) {
	b, err := statefile.Encode("test-replica", 1, m)
	if err == nil {
		err = vfs.WriteFileAtomic(r.w.mem, repFile, b, 0o600)
	}
	if err != nil {
		r.w.t.Fatal(err)
	}
}

// update changes the record of vm in one durable write.
func (r *fakeReplica) update(vm string, f func(*repRecord)) {
	m := r.load()
	f(m[vm])
	r.save(m)
}

func (r *fakeReplica) Status(vm string) ReplicaStatus {
	rec, ok := r.load()[vm]
	if !ok {
		return ReplicaStatus{}
	}
	st := ReplicaStatus{Known: true, Adopted: rec.Adopted, Primary: "old-primary"}
	if rec.Failover != nil {
		st.Failover = &rec.Failover.FailedOver
	}
	return st
}

func (r *fakeReplica) FailedOver() map[string]Target {
	out := map[string]Target{}
	for name, rec := range r.load() {
		if f := rec.Failover; f != nil && f.Reverted && !f.Cancelling {
			out[name] = Target{Disks: []wire.Disk{{Name: "d0", Size: 4096}}, Images: []string{"/img/" + name}, FailedOver: f.FailedOver}
		}
	}
	return out
}

func (r *fakeReplica) FailOver(vm, kind, point string) (Target, error) {
	rec, ok := r.load()[vm]
	if !ok {
		return Target{}, errNoReplica
	}
	if f := rec.Failover; f != nil {
		if f.Point != point || f.Kind != kind {
			return Target{}, fmt.Errorf("fake replica: %s already failed over", vm)
		}
	} else {
		if point != "" && !slices.Contains(rec.Points, point) {
			return Target{}, fmt.Errorf("fake replica: no point %q", point)
		}
		r.update(vm, func(rec *repRecord) {
			rec.Failover = &repFover{FailedOver: wire.FailedOver{Kind: kind, Point: point, Latest: rec.Applied}}
		})
		r.w.crash("failover-recorded")
	}
	r.revert(vm)
	return r.FailedOver()[vm], nil
}

func (r *fakeReplica) revert(vm string) {
	f := r.load()[vm].Failover
	if f == nil || f.Reverted || f.Cancelling {
		return
	}
	if f.Point != "" {
		r.w.crash("failover-reverted")
	}
	r.update(vm, func(rec *repRecord) { rec.Failover.Reverted = true })
}

func (r *fakeReplica) CancelFailover(vm string) error {
	rec, ok := r.load()[vm]
	if !ok {
		return errNoReplica
	}
	if rec.Failover == nil || rec.Failover.Completing {
		return fmt.Errorf("fake replica: %s not failed over", vm)
	}
	if !rec.Failover.Cancelling {
		r.update(vm, func(rec *repRecord) { rec.Failover.Cancelling = true })
		r.w.crash("cancel-recorded")
	}
	r.update(vm, func(rec *repRecord) { rec.Failover = nil })
	return nil
}

func (r *fakeReplica) CompleteFailover(vm string) error {
	rec, ok := r.load()[vm]
	if !ok {
		return nil
	}
	if rec.Failover == nil || rec.Failover.Cancelling {
		return fmt.Errorf("fake replica: %s not failed over", vm)
	}
	r.revert(vm)
	r.update(vm, func(rec *repRecord) { rec.Failover.Completing = true })
	r.w.crash("complete-points-dropped")
	m := r.load()
	delete(m, vm)
	r.save(m)
	return nil
}

// recover is what apply does at start-up: finish a cancel or a revert.
func (r *fakeReplica) recover() {
	for name, rec := range r.load() {
		switch f := rec.Failover; {
		case f == nil:
		case f.Cancelling:
			r.update(name, func(rec *repRecord) { rec.Failover = nil })
		case !f.Reverted:
			r.revert(name)
		}
	}
}

// addReplica gives the replica role a replica VM at cycle 7 with a point.
func (w *world) addReplica(vm string) {
	m := w.rep.load()
	m[vm] = &repRecord{Applied: 7, Points: []string{"p1"}}
	w.rep.save(m)
}
