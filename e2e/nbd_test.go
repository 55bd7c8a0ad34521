package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNBDInfoListsExports(t *testing.T) {
	need(t, "nbdinfo")
	h := newHost(t)
	h.addVM("vm1", "64M")
	img2 := filepath.Join(t.TempDir(), "data.img")
	h.run("vm", "add", "vm2", "--disk", "root="+filepath.Join(t.TempDir(), "r.img")+":32M", "--disk", img2+":8M")

	out := sh(t, "nbdinfo", "--list", "--json", "nbd+unix:///?socket="+h.sock)
	var info struct {
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	got := map[string]int64{}
	for _, e := range info.Exports {
		got[e.Name] = e.Size
	}
	want := map[string]int64{"vm1/disk0": 64 << 20, "vm2/root": 32 << 20, "vm2/data": 8 << 20}
	for n, s := range want {
		if got[n] != s {
			t.Errorf("export %s: size %d, want %d (all: %v)", n, got[n], s, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("exports %v, want %v", got, want)
	}

	out = sh(t, "nbdinfo", "--json", h.uri("vm1/disk0"))
	var one map[string]any
	if err := json.Unmarshal([]byte(out), &one); err != nil {
		t.Fatal(err)
	}
	exp := one["exports"].([]any)[0].(map[string]any)
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"} {
		if exp[k] != true {
			t.Errorf("%s = %v, want true", k, exp[k])
		}
	}
	if exp["is_read_only"] != false {
		t.Errorf("is_read_only = %v", exp["is_read_only"])
	}
}

func TestQemuIOPatterns(t *testing.T) {
	need(t, "qemu-io")
	h := newHost(t)
	h.addVM("vm1", "64M")
	uri := h.uri("vm1/disk0")
	sh(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 64k",
		"-c", "write -P 0xcd 1M 1M",
		"-c", "write -P 0x11 4608 512", // unaligned sector inside a written block
		"-c", "write -z 2M 256k",
		"-c", "discard 1536k 512k",
		"-c", "flush")
	sh(t, "qemu-io", "-f", "raw", uri,
		"-c", "read -P 0xab 0 4608",
		"-c", "read -P 0x11 4608 512",
		"-c", "read -P 0xab 5120 60416",
		"-c", "read -P 0xcd 1M 512k",
		"-c", "read -P 0 1536k 512k",
		"-c", "read -P 0 2M 256k")
	// A pattern that is not there must fail: the check can fail.
	if out, err := runOut("qemu-io", "-f", "raw", uri, "-c", "read -P 0xee 0 4k"); err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io accepted a wrong pattern:\n%s", out)
	}
}

func TestNBDCopyRoundTrip(t *testing.T) {
	need(t, "nbdcopy")
	h := newHost(t)
	h.addVM("vm1", "32M")
	src, data := randomFile(t, 32<<20)
	sh(t, "nbdcopy", "--flush", src, h.uri("vm1/disk0"))
	dst := filepath.Join(t.TempDir(), "back.img")
	sh(t, "nbdcopy", h.uri("vm1/disk0"), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip changed the data")
	}
}

func TestFioVerifyTwoConnections(t *testing.T) {
	need(t, "fio")
	h := newHost(t)
	h.addVM("vm1", "64M")
	out := sh(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+h.uri("vm1/disk0"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=32m",
		"--offset_increment=32m", "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1",
		"--do_verify=1", "--group_reporting", "--output-format=json")
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOs int64 `json:"total_ios"`
			} `json:"write"`
			Read struct {
				IOs int64 `json:"total_ios"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if len(res.Jobs) == 0 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOs < 16384 || res.Jobs[0].Read.IOs < 16384 {
		t.Fatalf("fio did not write and verify 2x32 MiB: %+v", res.Jobs)
	}
}

// TestFlushSurvivesKill9: data acknowledged by FLUSH (and FUA) survives kill
// -9 of the daemon, in the NBD view after restart and in the image file.
func TestFlushSurvivesKill9(t *testing.T) {
	need(t, "qemu-io")
	h := newHost(t, "--sync-interval", "1h") // only client flushes sync
	img := h.addVM("vm1", "16M")
	uri := h.uri("vm1/disk0")
	sh(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0x5a 0 1M",
		"-c", "flush",
		"-c", "write -P 0x6b -f 1M 1M") // -f: FUA
	h.kill()
	h.start()
	sh(t, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x6b 1M 1M")
	h.stop()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:1<<20], bytes.Repeat([]byte{0x5a}, 1<<20)) || !bytes.Equal(b[1<<20:2<<20], bytes.Repeat([]byte{0x6b}, 1<<20)) {
		t.Fatal("image file lacks the flushed writes after restart and clean stop")
	}
}
