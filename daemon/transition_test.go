package daemon

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vdrepl/vdrepl/control"
)

// newTestDaemon is a Daemon that is not running (no listener, no replica
// role) over a temporary state directory, for tests of VM handling. It
// sets no memory limit (TestMemoryLimit configures its own).
func newTestDaemon(t *testing.T) *Daemon {
	t.Helper()
	d, err := New(Config{StateDir: t.TempDir(), MemoryLimit: -1})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// addTestVM registers a served VM of one 1 MiB disk in a temporary
// directory and returns it.
func addTestVM(t *testing.T, d *Daemon, name string) *vm {
	t.Helper()
	img := filepath.Join(t.TempDir(), name+".img")
	if _, err := d.AddVM(control.VMSpec{Name: name, Disks: []control.DiskSpec{{Name: "d0", Path: img, Size: 1 << 20, Create: true}}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.mu.Lock()
		v := d.vms[name]
		d.mu.Unlock()
		if v != nil {
			v.close()
		}
	})
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.vms[name]
}

func servedNow(d *Daemon, name string) *vm {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.vms[name]
}

// TestTransitionSuccess: the change runs with the journal closed (what
// the VM took is in its image) and the VM stays out of service, busy.
func TestTransitionSuccess(t *testing.T) {
	d := newTestDaemon(t)
	v := addTestVM(t, d, "a")
	data := bytes.Repeat([]byte{0xa5}, 4096)
	if _, err := v.j.Disk(0).WriteAt(data, 8192); err != nil {
		t.Fatal(err)
	}
	var inImage []byte
	err := d.transition(v, "testing", func() error {
		b, err := os.ReadFile(v.spec.Disks[0].Path)
		if err != nil {
			return err
		}
		inImage = b[8192 : 8192+4096]
		if s := servedNow(d, "a"); !s.busy || s.j != nil || s.err.Error() != "testing" {
			t.Errorf("during the change the VM is %+v, want a busy stand-in saying why", s)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(inImage, data) {
		t.Fatal("the change ran before the journal wrote the VM's data back to its image")
	}
	if v.j != nil || v.locks != nil {
		t.Fatal("journal or image locks still open after the transition")
	}
	if err := d.RemoveVM("a"); !errors.Is(err, control.ErrInUse) {
		t.Fatalf("RemoveVM of a VM in a transition: %v, want ErrInUse", err)
	}
}

// TestTransitionChangeFails: a failed change serves the VM again and
// returns the change's error.
func TestTransitionChangeFails(t *testing.T) {
	d := newTestDaemon(t)
	v := addTestVM(t, d, "a")
	boom := errors.New("change failed")
	err := d.transition(v, "testing", func() error { return boom })
	if !errors.Is(err, boom) {
		t.Fatalf("transition: %v, want the change's error", err)
	}
	s := servedNow(d, "a")
	if s == v || s.j == nil || s.busy || s.err != nil {
		t.Fatalf("after a failed change the VM is %+v, want it served again", s)
	}
	if _, err := s.j.Disk(0).WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("the VM served again takes no write: %v", err)
	}
}

// TestTransitionReopenFails: when the VM cannot be served again either,
// both errors are returned and the VM is listed with the reopen's.
func TestTransitionReopenFails(t *testing.T) {
	d := newTestDaemon(t)
	v := addTestVM(t, d, "a")
	boom := errors.New("change failed")
	err := d.transition(v, "testing", func() error {
		if err := os.Remove(v.spec.Disks[0].Path); err != nil {
			t.Fatal(err)
		}
		return boom
	})
	if !errors.Is(err, boom) || !errors.Is(err, control.ErrInvalid) || !strings.Contains(err.Error(), "could not be served again") {
		t.Fatalf("transition: %v, want the change's error and the reopen's", err)
	}
	s := servedNow(d, "a")
	if s.j != nil || s.busy || !errors.Is(s.err, control.ErrInvalid) {
		t.Fatalf("after a failed reopen the VM is %+v, want it listed unserved with the reason", s)
	}
	infos := d.VMs()
	if len(infos) != 1 || !strings.Contains(infos[0].Error, "does not exist") {
		t.Fatalf("VMs: %+v, want the VM listed with why it is not served", infos)
	}
}

// TestReleaseUnservedVM: the failover state machine releases a VM that is
// registered but not served (a cancel interrupted after apply recorded it:
// the guarded images refuse to open), so the cancel can be run again and
// finish. A busy VM is refused; an unknown one is named.
func TestReleaseUnservedVM(t *testing.T) {
	d := newTestDaemon(t)
	v := addTestVM(t, d, "a")
	if err := v.close(); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	d.vms["a"] = &vm{spec: v.spec, err: errors.New("failover being cancelled: images guarded")}
	d.mu.Unlock()
	ran := false
	if err := (*failoverHost)(d).Release("a", "failover being cancelled", func() error { ran = true; return nil }); err != nil || !ran {
		t.Fatalf("Release of a VM that is not served: %v (change ran: %v)", err, ran)
	}
	if nv := servedNow(d, "a"); !nv.busy {
		t.Fatalf("after Release the VM is %+v, want the busy stand-in", nv)
	}
	if err := (*failoverHost)(d).Release("a", "again", nil); !errors.Is(err, control.ErrInUse) {
		t.Fatalf("Release of a busy VM: %v, want ErrInUse", err)
	}
	if err := (*failoverHost)(d).Release("nope", "x", nil); !errors.Is(err, control.ErrUnknownVM) {
		t.Fatalf("Release of an unknown VM: %v", err)
	}
}
