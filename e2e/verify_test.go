package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// verifyResult is the part of `vdrepl verify --json` the tests read.
type verifyResult struct {
	TotalBytes     int64 `json:"total_bytes"`
	CheckedBytes   int64 `json:"checked_bytes"`
	ChangedBlocks  int64 `json:"skipped_changed_blocks"`
	SkippedBytes   int64 `json:"skipped_bytes"`
	MismatchBlocks int64 `json:"mismatch_blocks"`
	Mismatches     []struct {
		Disk   string `json:"disk"`
		Blocks int64  `json:"blocks"`
		Ranges []struct {
			From int64 `json:"from"`
			To   int64 `json:"to"`
		} `json:"ranges"`
	} `json:"mismatches"`
	ResyncMarked    bool    `json:"resync_marked"`
	Truth           string  `json:"truth"`
	DurationSeconds float64 `json:"duration_seconds"`
	Rate            float64 `json:"rate_bytes_per_second"`
}

// verify runs `vdrepl verify vm1 --json` with args and returns its result
// and exit status.
func verify(t *testing.T, h *host, args ...string) (verifyResult, int) {
	t.Helper()
	out, errOut, err := h.try(append([]string{"verify", "vm1", "--json"}, args...)...)
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var r verifyResult
	if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
		t.Fatalf("vdrepl verify %s: exit %d, %v\n%s%s", strings.Join(args, " "), code, jerr, out, errOut)
	}
	t.Logf("vdrepl verify %s: exit %d: %d bytes compared, %d changed blocks skipped, %d bytes skipped, %d mismatching blocks, %.2fs at %.1f MB/s",
		strings.Join(args, " "), code, r.CheckedBytes, r.ChangedBlocks, r.SkippedBytes, r.MismatchBlocks, r.DurationSeconds, r.Rate/1e6)
	return r, code
}

// A byte flipped in the replica's image at rest is found by a verify: a
// dry run names the disk and the 4 KiB range and exits 1 without marking
// anything; a verify starts a resync at once (outside the resync window),
// which makes the images byte-equal, and a verify after it is clean (exit 0).
func TestVerifyFindsReplicaDamage(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	p := newPairWith(t, pairOpts{primExtra: []string{"--resync-window", closedWindow()}})
	img := p.prim.addVM("vm1", "16M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 6M", "-c", "write -P 0x62 10M 2M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	p.checkEqual(t, "vm1", "disk0")

	if r, code := verify(t, p.prim, "--dry-run"); code != 0 || r.MismatchBlocks != 0 || r.CheckedBytes != 16<<20 {
		t.Fatalf("verify of an intact replica: exit %d, %+v", code, r)
	}

	p.rep.stop()
	const at = 5<<20 + 12345
	flipByte(t, filepath.Join(p.storage, "vm1", "disk0.img"), at)
	restartReplica(t, p)

	from, to := int64(at&^4095), int64(at&^4095+4096)
	r, code := verify(t, p.prim, "--dry-run")
	if code != 1 || r.MismatchBlocks != 1 || len(r.Mismatches) != 1 || r.Mismatches[0].Disk != "disk0" ||
		len(r.Mismatches[0].Ranges) != 1 || r.Mismatches[0].Ranges[0].From != from || r.Mismatches[0].Ranges[0].To != to {
		t.Fatalf("dry run over a damaged replica: exit %d, %+v; want disk0 [%d,%d)", code, r, from, to)
	}
	if r.ResyncMarked || !strings.HasPrefix(r.Truth, "primary") {
		t.Fatalf("dry run: resync marked %v, truth %q", r.ResyncMarked, r.Truth)
	}
	if s := waitStatus(t, p.prim, "vm1", "the status", func(primStatus) bool { return true }); s.State != "replicating" {
		t.Fatalf("a dry run changed the state: %+v", s)
	}

	if r, code := verify(t, p.prim); code != 1 || !r.ResyncMarked || r.MismatchBlocks != 1 {
		t.Fatalf("verify: exit %d, %+v", code, r)
	}
	// The resync starts at once, not at the (closed) resync window: the
	// next cycle is applied after it without an admin's resync.
	p.prim.run("replication", "sync", "vm1", "--timeout", "60s")
	s := waitStatus(t, p.prim, "vm1", "replicating after the resync", func(s primStatus) bool { return s.State == "replicating" })
	t.Logf("status: %s (%s)", s.State, s.Reason)
	text := p.prim.run("replication", "status", "vm1")
	if !strings.Contains(text, "last verified:") || !strings.Contains(text, "1 mismatches, resync started") {
		t.Fatalf("replication status lacks the last verify:\n%s", text)
	}
	p.checkEqual(t, "vm1", "disk0")
	cmpImages(t, p, img, "vm1")

	if r, code := verify(t, p.prim); code != 0 || r.MismatchBlocks != 0 || r.CheckedBytes != 16<<20 {
		t.Fatalf("verify after the resync: exit %d, %+v", code, r)
	}
	var st struct {
		Primaries []struct {
			LastVerify *struct {
				MismatchBlocks int64 `json:"mismatch_blocks"`
				CheckedBytes   int64 `json:"checked_bytes"`
			} `json:"last_verify"`
		} `json:"primaries"`
	}
	if err := json.Unmarshal([]byte(p.prim.run("replication", "status", "vm1", "--json")), &st); err != nil ||
		len(st.Primaries) != 1 || st.Primaries[0].LastVerify == nil || st.Primaries[0].LastVerify.MismatchBlocks != 0 {
		t.Fatalf("last verify in the JSON status: %+v %v", st, err)
	}
	// Bad input is exit status 2.
	if _, _, err := p.prim.try("verify", "vm1", "--rate", "fast"); exitCode(err) != 2 {
		t.Fatalf("verify --rate fast: %v, want exit status 2", err)
	}
	if _, _, err := p.prim.try("verify", "nope"); exitCode(err) != 2 {
		t.Fatalf("verify of an unknown VM: %v, want exit status 2", err)
	}
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// A verify while the guest keeps writing (and cycles ship every second)
// reports no mismatch: what changed after the replica's cycle is skipped.
func TestVerifyWhileTheGuestWrites(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	p := newPair(t)
	p.prim.addVM("vm1", "64M")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1s")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64M", "-c", "flush", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "120s")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	writes := 0
	go func() {
		defer wg.Done()
		for i := 0; i < 200; i++ {
			select {
			case <-stop:
				return
			default:
			}
			var args []string
			for k := 0; k < 16; k++ {
				off := ((i*16 + k) * 1237 % 1024) * 64 << 10 // spread over the 64 MiB
				args = append(args, "-c", fmt.Sprintf("write -P %d %d 64k", (i+k)%250+1, off))
			}
			args = append(args, "-c", "flush")
			if out, err := runOut("qemu-io", append(append([]string{"-f", "raw"}, args...), p.prim.uri("vm1/disk0"))...); err != nil {
				t.Errorf("qemu-io: %v\n%s", err, out)
				return
			}
			writes += 16
			time.Sleep(20 * time.Millisecond)
		}
	}()
	r, code := verify(t, p.prim, "--rate", "16MB/s")
	close(stop)
	wg.Wait()
	t.Logf("the guest wrote %d times 64 KiB during the verify", writes)
	if code != 0 || r.MismatchBlocks != 0 {
		t.Fatalf("verify while the guest writes: exit %d, %+v", code, r)
	}
	if writes == 0 || r.CheckedBytes+r.SkippedBytes+r.ChangedBlocks*4096 < 64<<20 {
		t.Fatalf("verify did not cover the disk or the guest did not write: %d writes, %+v", writes, r)
	}
}
