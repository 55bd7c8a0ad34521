package blockdev_test

// Real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-io, fio's nbd engine)
// against a fakedisk-backed server on a unix socket. A missing binary skips
// the test on a workstation and fails it in CI (CI set in the environment).

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/blockdev"
)

func needBinaries(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("CI") == "" {
				t.Skipf("%s not installed (set CI=true to make this a failure)", n)
			}
			t.Fatalf("%s not installed and CI is set: %v", n, err)
		}
	}
}

// runClient runs a client binary and returns its standard output; it fails the
// test if the command fails.
func runClient(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runClientErr(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runClientErr(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir() // fio leaves verify state files in its working directory
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if stderr.Len() > 0 {
		t.Logf("%s stderr:\n%s", name, stderr.String())
	}
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

func (f *fixture) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, f.sock)
}

func TestNBDClientNbdinfo(t *testing.T) {
	needBinaries(t, "nbdinfo")
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "vm1/disk0", size: 64 << 20, desc: "root disk"},
		exportSpec{name: "vm1/disk1", size: 8 << 20},
		exportSpec{name: "vm2/ro", size: 1 << 20, ro: true},
	)

	out := runClient(t, "nbdinfo", "--list", "--json", "nbd+unix:///?socket="+f.sock)
	var list struct {
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	got := map[string]int64{}
	for _, e := range list.Exports {
		got[e.Name] = e.Size
	}
	want := map[string]int64{"vm1/disk0": 64 << 20, "vm1/disk1": 8 << 20, "vm2/ro": 1 << 20}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("nbdinfo --list: %v, want %v", got, want)
	}
	out = runClient(t, "nbdinfo", "--list", "nbd+unix:///?socket="+f.sock)
	for _, s := range []string{"vm1/disk0", "vm1/disk1", "vm2/ro", "root disk"} {
		if !strings.Contains(out, s) {
			t.Errorf("nbdinfo --list output lacks %q:\n%s", s, out)
		}
	}

	info := func(export string) map[string]any {
		t.Helper()
		out := runClient(t, "nbdinfo", "--json", f.uri(export))
		var v struct {
			Exports []map[string]any `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.Exports) != 1 {
			t.Fatalf("nbdinfo --json %s: %v\n%s", export, err, out)
		}
		return v.Exports[0]
	}
	rw := info("vm1/disk0")
	for k, v := range map[string]any{
		"export-size": 64.0 * (1 << 20), "is_read_only": false,
		"can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true, "can_multi_conn": true,
		"block_size_minimum": 512.0, "block_size_preferred": 4096.0, "block_size_maximum": 32.0 * (1 << 20),
		"description": "root disk",
	} {
		if rw[k] != v {
			t.Errorf("vm1/disk0: %s = %v, want %v", k, rw[k], v)
		}
	}
	ro := info("vm2/ro")
	for k, v := range map[string]any{
		"export-size": 1.0 * (1 << 20), "is_read_only": true,
		"can_trim": false, "can_zero": false, "can_fua": false, "can_multi_conn": true,
	} {
		if ro[k] != v {
			t.Errorf("vm2/ro: %s = %v, want %v", k, ro[k], v)
		}
	}
}

func TestNBDClientQemuIO(t *testing.T) {
	needBinaries(t, "qemu-io")
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "vm1/disk0", size: 16 << 20},
		exportSpec{name: "vm1/ro", size: 1 << 20, ro: true},
	)
	uri := f.uri("vm1/disk0")
	runClient(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 64k",
		"-c", "write -P 0xcd 1M 1M",
		"-c", "write -P 0x11 4608 512",
		"-c", "write -f -P 0x22 3M 64k", // FUA
		"-c", "write -z 2M 256k",
		"-c", "discard 1536k 512k",
		"-c", "aio_write -P 0x33 4M 4k",
		"-c", "aio_write -P 0x44 5M 4k",
		"-c", "aio_flush",
		"-c", "flush")
	out := runClient(t, "qemu-io", "-f", "raw", uri,
		"-c", "read -P 0xab 0 4608",
		"-c", "read -P 0x11 4608 512",
		"-c", "read -P 0xab 5120 60416",
		"-c", "read -P 0xcd 1M 512k",
		"-c", "read -P 0 1536k 512k",
		"-c", "read -P 0 2M 256k",
		"-c", "read -P 0x22 3M 64k",
		"-c", "read -P 0x33 4M 4k",
		"-c", "read -P 0x44 5M 4k")
	if strings.Contains(out, "failed") || strings.Count(out, "read ") != 9 {
		t.Fatalf("qemu-io read back:\n%s", out)
	}
	// The bytes are on the disk itself, not just in the server's view.
	if got := f.fileBytes("vm1/disk0", 1<<20, 1<<19); !bytes.Equal(got, bytes.Repeat([]byte{0xcd}, 1<<19)) {
		t.Error("0xcd pattern not in the backing file")
	}
	if got := f.fileBytes("vm1/disk0", 4608, 512); !bytes.Equal(got, bytes.Repeat([]byte{0x11}, 512)) {
		t.Error("0x11 pattern not in the backing file")
	}
	if n := f.disks["vm1/disk0"].Flushes.Load(); n < 2 {
		t.Errorf("%d flushes reached the disk, want at least 2 (flush and FUA)", n)
	}
	// A pattern that is not there must fail: the check can fail.
	if out, err := runClientErr(t, "qemu-io", "-f", "raw", uri, "-c", "read -P 0xee 0 4k"); err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io accepted a wrong pattern:\n%s", out)
	}
	// Writes to a read-only export fail.
	out, err := runClientErr(t, "qemu-io", "-f", "raw", "-r", f.uri("vm1/ro"), "-c", "read -P 0 0 64k")
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io read-only read: %v\n%s", err, out)
	}
	out, _ = runClientErr(t, "qemu-io", "-f", "raw", f.uri("vm1/ro"), "-c", "write -P 0x55 0 4k")
	if !strings.Contains(strings.ToLower(out), "read-only") && !strings.Contains(strings.ToLower(out), "permission") &&
		!strings.Contains(out, "failed") {
		t.Fatalf("qemu-io write to a read-only export did not fail:\n%s", out)
	}
	if got := f.fileBytes("vm1/ro", 0, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("write to the read-only export reached the disk")
	}
}

func randomFile(t *testing.T, dir string, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	path := filepath.Join(dir, "src.img")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func TestNBDClientNbdcopy(t *testing.T) {
	needBinaries(t, "nbdcopy")
	const size = 32 << 20
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: size})
	dir := t.TempDir()
	src, data := randomFile(t, dir, size)
	runClient(t, "nbdcopy", "--flush", src, f.uri("vm1/disk0"))
	if !bytes.Equal(f.fileBytes("vm1/disk0", 0, size), data) {
		t.Fatal("nbdcopy upload: backing file differs from the source")
	}
	dst := filepath.Join(dir, "dst.img")
	runClient(t, "nbdcopy", f.uri("vm1/disk0"), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip changed the data")
	}
}

func TestNBDClientFio(t *testing.T) {
	needBinaries(t, "fio")
	f := newFixture(t, blockdev.NBDConfig{}, exportSpec{name: "vm1/disk0", size: 64 << 20})
	// Two jobs, two connections, each on its own 32 MiB half so that their
	// verify passes do not see each other's writes.
	out := runClient(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+f.uri("vm1/disk0"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=32m",
		"--offset_increment=32m", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
		"--group_reporting", "--output-format=json")
	i := strings.Index(out, "{")
	if i < 0 {
		t.Fatalf("fio printed no JSON:\n%s", out)
	}
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
	if err := json.Unmarshal([]byte(out[i:]), &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	// 2 jobs x 32 MiB / 4 KiB = 16384 writes, each verified by a read.
	if len(res.Jobs) != 1 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOs < 16384 || res.Jobs[0].Read.IOs < 16384 {
		t.Fatalf("fio did not write and verify 2 x 32 MiB: %+v", res.Jobs)
	}
	if strings.Contains(out, "verify: bad") || strings.Contains(out, "bad magic") {
		t.Fatalf("fio reported verify errors:\n%s", out)
	}
}
