package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const crashEnv = "VDREPL_CRASHPOINT" // internal/crashpoint.Env

// crashDuring restarts h armed to SIGKILL itself at step point, runs the
// CLI command (which must fail: the daemon dies under it), and starts h
// again, unarmed.
func crashDuring(t *testing.T, h *host, point string, args ...string) {
	t.Helper()
	os.Setenv(crashEnv, point)
	h.stop()
	h.start()
	os.Unsetenv(crashEnv)
	if out, errOut, err := h.try(args...); err == nil {
		t.Fatalf("%s: vdrepl %s succeeded although the daemon was to crash:\n%s%s", point, strings.Join(args, " "), out, errOut)
	}
	select {
	case <-h.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: the daemon did not crash", point)
	}
	h.cmd = nil
	h.start()
}

type vmEntry struct {
	Name       string `json:"name"`
	FailedOver bool   `json:"failed_over"`
	HandedOver *struct {
		To string `json:"to"`
	} `json:"handed_over"`
	Error string `json:"error"`
}

func vmList(t *testing.T, h *host) map[string]vmEntry {
	t.Helper()
	var vms []vmEntry
	if err := json.Unmarshal([]byte(h.run("vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	out := map[string]vmEntry{}
	for _, v := range vms {
		out[v.Name] = v
	}
	return out
}

// TestUnplannedFailoverCrashPoints kills the replica -9 at each step of an
// unplanned failover, of its cancel and of its complete. After the restart
// the replica is in a state it explains (vm list, points) and the same
// command, run again, finishes the step; the images are what the step
// promises.
func TestUnplannedFailoverCrashPoints(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	type step struct {
		point string
		op    string // unplanned, cancel, complete
	}
	for _, s := range []step{
		{"failover-recorded", "unplanned"},
		{"failover-reverted", "unplanned"},
		{"failover-before-register", "unplanned"},
		{"cancel-journal-closed", "cancel"},
		{"cancel-recorded", "cancel"},
		{"cancel-before-forget", "cancel"},
		{"complete-before-registry", "complete"},
	} {
		t.Run(s.point, func(t *testing.T) {
			p := pointsPair(t, 3)
			// A VM of the replica host's own must come through every
			// restart, whatever the failover does to the registry.
			p.rep.addVM("own", "4M")
			cycles, want := pointedCycles(t, p.prim, 2, 0x21, 2)
			older, latest := fmt.Sprint(cycles[0]), want[cycles[1]]
			img := filepath.Join(p.storage, "vm1", "disk0.img")
			failover := []string{"failover", "unplanned", "vm1", "--point", older}
			if s.op != "unplanned" {
				p.rep.run(failover...)
				writePattern(t, p.rep, "vm1/disk0", 0x99, 9)
			}
			var cmd []string
			switch s.op {
			case "unplanned":
				cmd = failover
			default:
				cmd = []string{"failover", s.op, "vm1"}
			}
			crashDuring(t, p.rep, s.point, cmd...)

			vms := vmList(t, p.rep)
			switch s.op {
			case "unplanned":
				// Run finished the failover: the VM is served at the point.
				if !vms["vm1"].FailedOver {
					t.Fatalf("after the crash: %+v", vms)
				}
				p.rep.run(cmd...) // running it again is harmless
				if !bytes.Equal(exportBytes(t, p.rep, "vm1/disk0"), want[cycles[0]]) {
					t.Fatal("the failed-over disk is not the point")
				}
			case "cancel":
				if _, ok := vms["vm1"]; ok {
					// Not begun in apply: still failed over; cancel again.
					if !vms["vm1"].FailedOver {
						t.Fatalf("after the crash: %+v", vms)
					}
					p.rep.run(cmd...)
				}
				if _, ok := vmList(t, p.rep)["vm1"]; ok {
					t.Fatal("vm1 is still a VM of the replica after cancel")
				}
				fileEquals(t, img, latest)
				if st := p.rep.replication("vm1"); len(st.Replicas) != 1 || st.Replicas[0].Applied != cycles[1] {
					t.Fatalf("the replica after cancel: %+v", st)
				}
			case "complete":
				if vms["vm1"].FailedOver {
					t.Fatalf("complete not finished at start-up: %+v", vms)
				}
				if _, errOut, err := p.rep.try(cmd...); err == nil || !strings.Contains(errOut, "not failed over") {
					t.Fatalf("complete again: %v %s", err, errOut)
				}
				got := exportBytes(t, p.rep, "vm1/disk0")
				if !bytes.Equal(got[9<<20:10<<20], bytes.Repeat([]byte{0x99}, 1<<20)) || !bytes.Equal(got[:9<<20], want[cycles[0]][:9<<20]) {
					t.Fatal("the completed VM lost data")
				}
			}
			p.rep.kill()
			p.rep.start()
			if _, ok := vmList(t, p.rep)["own"]; !ok {
				t.Fatalf("the replica host's own VM left its registry: %+v", vmList(t, p.rep))
			}
		})
	}
}

// TestPlannedFailoverCrashPoints kills the old primary or the new one -9 at
// each step of a planned failover. Running the command again on the old
// primary finishes it, with the images equal.
func TestPlannedFailoverCrashPoints(t *testing.T) {
	need(t, "qemu-io", "nbdcopy", "nbdinfo")
	for _, s := range []struct {
		point string
		onA   bool // the step runs on the old primary
	}{
		{"handover-recorded", true},
		{"promote-failed-over", false},
		{"complete-before-registry", false}, // inside the promotion
		{"promote-completed", false},
		{"adopt-registered", true},
	} {
		t.Run(s.point, func(t *testing.T) {
			w := newTwoWayFixed(t)
			aImg := w.a.addVM("vm1", "16M")
			writePattern(t, w.a, "vm1/disk0", 0x31, 1)
			w.a.run("replication", "enable", "vm1", "--replica", w.bAddr, "--frequency", "1h")
			w.a.run("replication", "sync", "vm1")
			want := exportBytes(t, w.a, "vm1/disk0")

			victim := w.b
			if s.onA {
				victim = w.a
			}
			os.Setenv(crashEnv, s.point)
			victim.stop()
			victim.start()
			os.Unsetenv(crashEnv)
			if _, _, err := w.a.try("failover", "planned", "vm1"); err == nil && s.point != "adopt-registered" {
				t.Fatal("planned failover succeeded although a daemon was to crash")
			}
			select {
			case <-victim.exited:
			case <-time.After(60 * time.Second):
				t.Fatalf("%s: the daemon did not crash", s.point)
			}
			victim.cmd = nil
			victim.start()

			if s.point != "adopt-registered" {
				if e := vmList(t, w.a)["vm1"]; e.HandedOver == nil && s.point == "handover-recorded" {
					t.Fatalf("A after the crash does not say the VM is handed over: %+v", e)
				}
				out := w.a.run("failover", "planned", "vm1")
				if !strings.Contains(out, "handed over") {
					t.Fatalf("planned failover again said %q", out)
				}
			}
			waitFor(t, "B to replicate back to A", func() bool {
				_, ok := vmList(t, w.a)["vm1"]
				st := primaryStatus(t, w.b, "vm1")
				return !ok && st.State == "replicating" && st.LastApplied > 0
			})
			if !bytes.Equal(exportBytes(t, w.b, "vm1/disk0"), want) {
				t.Fatal("B serves something else than A had")
			}
			writePattern(t, w.b, "vm1/disk0", 0x44, 4)
			w.b.run("replication", "sync", "vm1")
			fileEquals(t, aImg, exportBytes(t, w.b, "vm1/disk0"))
		})
	}
}

// newTwoWayFixed is newTwoWay with replica ports that survive restarts.
func newTwoWayFixed(t *testing.T) *twoWay {
	t.Helper()
	w := &twoWay{pki: t.TempDir()}
	vdrepl(t, "pki", "init", "--dir", w.pki)
	vdrepl(t, "pki", "issue", "--dir", w.pki, "--name", "primary.test", "--san", "127.0.0.1")
	vdrepl(t, "pki", "issue", "--dir", w.pki, "--name", "replica.test", "--san", "127.0.0.1")
	w.aAddr, w.bAddr = freeAddr(t), freeAddr(t)
	w.a = newHost(t, append(tlsFlags(w.pki, "primary.test"), "--replica-listen", w.aAddr, "--retry-scale", "0.0005")...)
	w.b = newHost(t, append(tlsFlags(w.pki, "replica.test"), "--replica-listen", w.bAddr, "--retry-scale", "0.0005")...)
	w.a.run("replica", "allow", "add", "--primary", "replica.test", "--storage", filepath.Join(t.TempDir(), "on-a"))
	w.b.run("replica", "allow", "add", "--primary", "primary.test", "--storage", filepath.Join(t.TempDir(), "on-b"))
	return w
}
