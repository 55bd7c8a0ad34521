package failover

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// The primary's fake keeps what the daemon's registry entry holds beyond
// the fake host's (replication, handed_over, disks) in one more file,
// written atomically through the ErrorFS, so a crash keeps what was
// synced. Gate, shipper and clients are in memory: a restart sets them
// the way the daemon's serveRegistered does.

// primRecord is a VM of the fake primary.
type primRecord struct {
	Replica    string        `json:"replica,omitempty"`
	HandedOver *Handover     `json:"handed_over,omitempty"`
	Disks      []PrimaryDisk `json:"disks"`
}

const primFile = "/state/primary.json"

// replicaCert is the certificate the replica host b.example presents.
var replicaCert = &x509.Certificate{DNSNames: []string{"b.example"}}

type fakePrimary struct {
	w *world

	readOnly, shipping, disconnected map[string]bool
	users                            map[string]string

	// The peer and the host, as a test sets them.
	noListen   bool
	noIdentity error
	peer       Peer
	askErr     error
	cycle      uint64
	shipErr    error
	sendErr    error
	refused    bool
	startErr   error
	atSend     func() // runs at every send
	onSend     func() // runs while a handover that succeeds is sent (the lock is not held)

	shipped, sent, replicatedBack int
}

// pworld is a world whose machine has a primary role.
type pworld struct {
	*world
	p *fakePrimary
}

func newPWorld(t *testing.T, mem *vfs.MemFS) *pworld {
	pw := &pworld{world: newWorld(t, mem)}
	pw.p = newFakePrimary(pw.world)
	pw.machine()
	return pw
}

func newFakePrimary(w *world) *fakePrimary {
	return &fakePrimary{
		w: w, readOnly: map[string]bool{}, shipping: map[string]bool{}, disconnected: map[string]bool{},
		users: map[string]string{}, peer: Peer{Known: true, Name: "b.example", Allowed: true}, cycle: 9,
	}
}

func (pw *pworld) machine() {
	pw.m = New(Config{Host: pw.host, Replica: pw.rep, Primary: pw.p, Crash: pw.crash, AdoptWait: 10 * time.Millisecond})
}

// restart is the host after a power cut (world.restart), with the
// handed-over VMs served read-only and the others shipping.
func (pw *pworld) restart() *pworld {
	n := &pworld{world: pw.world.restart()}
	n.p = newFakePrimary(n.world)
	n.machine()
	for name, r := range n.p.load() {
		if _, ok := n.host.Entry(name); !ok {
			continue
		}
		n.p.readOnly[name] = r.HandedOver != nil
		n.p.shipping[name] = r.Replica != "" && r.HandedOver == nil
	}
	return n
}

// addPrimary registers VM vm of this host, served and replicating to
// b.example.
func (pw *pworld) addPrimary(vm string) {
	reg := pw.host.load()
	reg[vm] = hostEntry{}
	if err := pw.host.save(reg); err != nil {
		pw.t.Fatal(err)
	}
	pw.host.served[vm] = true
	if err := pw.p.update(vm, func(r *primRecord) {
		r.Replica = "b.example:8443"
		r.Disks = []PrimaryDisk{{Name: "d0", Size: 4096, Image: "/img/" + vm}}
	}); err != nil {
		pw.t.Fatal(err)
	}
	pw.p.shipping[vm] = true
}

// pstate is the state of vm, handed_over read from the primary's record.
func (pw *pworld) pstate(vm string) State {
	s := pw.state(vm)
	if r := pw.p.load()[vm]; s == Primary && r != nil && r.HandedOver != nil {
		return HandedOver
	}
	return s
}

// adopt is what apply does when the new primary enables vm with existing
// images: Adopt, register the replica VM (a durable write, then the
// adopt-registered crash point), finish.
func (pw *pworld) adopt(vm string) error {
	images, finish, err := pw.m.Adopt(vm, "b.example", replicaCert, []wire.Disk{{Name: "d0", Size: 4096}})
	if err != nil {
		return err
	}
	if len(images) != 1 || images[0] != "/img/"+vm {
		pw.t.Fatalf("adopt images %v", images)
	}
	m := pw.rep.load()
	m[vm] = &repRecord{Adopted: true}
	pw.rep.save(m)
	pw.crash("adopt-registered")
	finish(true)
	return nil
}

func (p *fakePrimary) load() map[string]*primRecord {
	m := map[string]*primRecord{}
	p.w.loadRecord(p.w.efs, primFile, "test-primary", &m)
	return m
}

func (p *fakePrimary) update(vm string, f func(*primRecord)) error {
	m := p.load()
	if m[vm] == nil {
		m[vm] = &primRecord{}
	}
	f(m[vm])
	b, err := statefile.Encode("test-primary", 1, m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(p.w.efs, primFile, b, 0o600)
}

var errNoPrimary = errors.New("fake primary: unknown VM")

func (p *fakePrimary) VM(vm string) (PrimaryVM, error) {
	e, ok := p.w.host.Entry(vm)
	if !ok {
		return PrimaryVM{}, fmt.Errorf("%w: %s", errNoPrimary, vm)
	}
	if !e.Served {
		return PrimaryVM{}, fmt.Errorf("VM %s is not served", vm)
	}
	r := p.load()[vm]
	if r == nil {
		r = &primRecord{}
	}
	return PrimaryVM{Replica: r.Replica, FailedOver: e.FailedOver, HandedOver: r.HandedOver, Users: p.users[vm],
		Disks: r.Disks, UnshippedCycles: 1, Listens: !p.noListen}, nil
}

func (p *fakePrimary) Identity() error { return p.noIdentity }

func (p *fakePrimary) AskReplica(ctx context.Context, vm string) (Peer, error) {
	return p.peer, p.askErr
}

func (p *fakePrimary) ReplicaAddress() (string, error) { return "a.example:8443", nil }
func (p *fakePrimary) Gate(vm string, ro bool)         { p.readOnly[vm] = ro }
func (p *fakePrimary) Disconnect(vm string)            { p.disconnected[vm] = true }

func (p *fakePrimary) ShipLast(ctx context.Context, vm string) (uint64, error) {
	p.shipped++
	return p.cycle, p.shipErr
}

func (p *fakePrimary) RecordHandedOver(vm string, h *Handover) error {
	return p.update(vm, func(r *primRecord) { r.HandedOver = h })
}

func (p *fakePrimary) StopShipping(vm string) { p.shipping[vm] = false }

func (p *fakePrimary) StartShipping(vm string) error {
	if p.startErr != nil {
		return p.startErr
	}
	p.shipping[vm] = true
	return nil
}

func (p *fakePrimary) SendHandover(ctx context.Context, vm string, h Handover) (bool, error) {
	p.sent++
	if p.atSend != nil {
		p.atSend()
	}
	if p.onSend != nil && p.sendErr == nil {
		p.onSend()
	}
	return p.refused, p.sendErr
}

func (p *fakePrimary) ReplicateBack(vm string, h wire.Handover) error {
	p.replicatedBack++
	return p.update(vm, func(r *primRecord) { r.Replica = h.ReplicateTo })
}

func (p *fakePrimary) ServeAgain(vm string) error {
	p.w.host.served[vm] = true
	return nil
}
