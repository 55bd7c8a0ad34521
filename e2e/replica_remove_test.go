package e2e

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// replicaVMs are the VMs `replication status` on h lists as replicas.
func replicaVMs(t *testing.T, h *host) []string {
	t.Helper()
	var s replStatus
	if err := json.Unmarshal([]byte(h.run("replication", "status", "--json")), &s); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range s.Replicas {
		names = append(names, r.VM)
	}
	return names
}

// TestReplicaRemove removes replica VMs on the replica host after their
// primary disabled them (issue 15 item 3): they leave `replication status`
// there, their images stay unless --delete-images; a VM in a test failover
// is refused with the command that ends it; a primary still replicating a
// removed VM stops with the replica's unknown VM, not a retry loop.
func TestReplicaRemove(t *testing.T) {
	p := newPair(t)
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		p.prim.addVM(vm, "16M")
		p.prim.run("replication", "enable", vm, "--replica", p.replicaAddr, "--frequency", "1h")
		p.prim.run("replication", "sync", vm)
	}

	// A test failover holds the replica: refused, naming stop-test.
	p.rep.run("failover", "test", "vm1")
	if _, errOut, err := p.rep.try("replica", "remove", "vm1"); err == nil || !strings.Contains(errOut, "`vdrepl failover stop-test vm1`") {
		t.Fatalf("replica remove during a test failover: %v, stderr %q, want it to name `vdrepl failover stop-test vm1`", err, errOut)
	}
	p.rep.run("failover", "stop-test", "vm1")

	// On the primary host, or with a mistyped name.
	if _, errOut, err := p.prim.try("replica", "remove", "vm1"); err == nil || !strings.Contains(errOut, "run `vdrepl replica remove vm1` on its replica host ("+p.replicaAddr+")") {
		t.Errorf("replica remove on the primary: %v, stderr %q", err, errOut)
	}
	if _, errOut, err := p.rep.try("replica", "remove", "vm4"); err == nil || !strings.Contains(errOut, "did you mean vm1?") {
		t.Errorf("replica remove vm4: %v, stderr %q, want a did-you-mean", err, errOut)
	}

	want := "replication of vm1 disabled; the replica on " + p.replicaAddr + " keeps vm1's replica; remove it there with `vdrepl replica remove vm1`\n"
	if out := p.prim.run("replication", "disable", "vm1"); out != want {
		t.Errorf("replication disable printed %q, want %q", out, want)
	}
	img1 := filepath.Join(p.storage, "vm1", "disk0.img")
	out := p.rep.run("replica", "remove", "vm1")
	if !strings.HasPrefix(out, "replica VM vm1 removed; its images stay in ") || !strings.HasSuffix(out, "vm1\n") {
		t.Errorf("replica remove vm1 printed %q", out)
	}
	if _, err := os.Stat(img1); err != nil {
		t.Errorf("vm1's image after replica remove: %v, want it kept", err)
	}
	if _, err := os.Stat(filepath.Join(p.storage, "vm1", "replica.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("vm1's replica.json after replica remove: %v, want it gone", err)
	}
	if got := replicaVMs(t, p.rep); strings.Join(got, ",") != "vm2,vm3" {
		t.Errorf("replicas after removing vm1: %v, want vm2, vm3", got)
	}
	if _, errOut, err := p.rep.try("replica", "remove", "vm1"); err == nil || !strings.Contains(errOut, "unknown VM") {
		t.Errorf("replica remove vm1 again: %v, stderr %q, want unknown VM", err, errOut)
	}

	// --delete-images --json.
	p.prim.run("replication", "disable", "vm2")
	var rm struct {
		VM            string   `json:"vm"`
		Dir           string   `json:"dir"`
		Images        []string `json:"images"`
		ImagesDeleted bool     `json:"images_deleted"`
	}
	if err := json.Unmarshal([]byte(p.rep.run("replica", "remove", "vm2", "--delete-images", "--json")), &rm); err != nil {
		t.Fatal(err)
	}
	if rm.VM != "vm2" || !rm.ImagesDeleted || len(rm.Images) != 1 || filepath.Base(rm.Images[0]) != "disk0.img" {
		t.Errorf("replica remove vm2 --delete-images --json: %+v", rm)
	}
	if _, err := os.Stat(filepath.Join(p.storage, "vm2")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("vm2's directory after --delete-images: %v, want it gone", err)
	}
	if _, err := os.Stat(img1); err != nil {
		t.Errorf("vm1's image after deleting vm2's: %v", err)
	}

	// vm3 is removed while its primary still replicates it: the next
	// cycle is refused as unknown VM and replication stops for the admin.
	if out := p.rep.run("replica", "remove", "vm3"); !strings.Contains(out, "replica VM vm3 removed") {
		t.Errorf("replica remove vm3 printed %q", out)
	}
	p.prim.try("replication", "sync", "vm3", "--timeout", "20s")
	st := waitStatus(t, p.prim, "vm3", "replication of vm3 to stop", func(s primStatus) bool { return s.Health == "critical" })
	if !strings.Contains(st.LastError+st.Reason, "unknown") {
		t.Errorf("vm3 on the primary after its replica was removed: %+v, want the unknown VM named", st)
	}
	if got := replicaVMs(t, p.rep); len(got) != 0 {
		t.Errorf("replicas at the end: %v, want none", got)
	}
}
