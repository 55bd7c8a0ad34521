package e2e

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The tests here are about what an admin meets around replication: who the
// replica lets in, a replica disk that fills up, a journal that overflows
// while replication is paused, initial copies by media or from a restored
// backup, and the JSON a monitoring script reads.

// extraPrimary starts another primary daemon with a certificate named name
// from the CA in dir (issued here) and trusting that CA.
func extraPrimary(t *testing.T, dir, name string) *host {
	t.Helper()
	vdrepl(t, "pki", "issue", "--dir", dir, "--name", name, "--san", "127.0.0.1")
	return newHost(t, append(tlsFlags(dir, name), "--retry-scale", "0.0005")...)
}

// waitStatus polls the primary's status of vm until cond holds (30 s) and
// returns that status; on time-out it fails with the last one seen.
func waitStatus(t *testing.T, h *host, vm, what string, cond func(primStatus) bool) primStatus {
	t.Helper()
	var last primStatus
	deadline := time.Now().Add(30 * time.Second)
	for {
		last = primaryStatus(t, h, vm)
		if cond(last) {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last status of %s: %+v", what, vm, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pollStatus polls like waitStatus for at most d, and reports whether cond
// held instead of failing; it returns the last status seen.
func pollStatus(t *testing.T, h *host, vm string, d time.Duration, cond func(primStatus) bool) (primStatus, bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		s := primaryStatus(t, h, vm)
		if cond(s) {
			return s, true
		}
		if time.Now().After(deadline) {
			return s, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkEqualAt compares prim's export of vm/disk0 with the image under storage.
func checkEqualAt(t *testing.T, prim *host, storage, vm string) {
	t.Helper()
	(&pair{prim: prim, storage: storage}).checkEqual(t, vm, "disk0")
}

func fileHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// noReplicaVM checks that the replica wrote nothing for vm: no directory in
// any of the storage directories, and no replica entry in its status.
func noReplicaVM(t *testing.T, rep *host, vm string, storages ...string) {
	t.Helper()
	for _, s := range storages {
		if _, err := os.Stat(filepath.Join(s, vm)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("replica has %s after a refused primary (stat: %v)", filepath.Join(s, vm), err)
		}
	}
	var all replStatus
	if err := json.Unmarshal([]byte(rep.run("replication", "status", "--json")), &all); err != nil {
		t.Fatal(err)
	}
	for _, r := range all.Replicas {
		if r.VM == vm {
			t.Fatalf("replica lists %s after a refused primary: %+v", vm, r)
		}
	}
}

// refused waits until replication of vm on h has stopped for good: health
// critical, state error, no retry scheduled and none made, a reason that
// matches want.
func refused(t *testing.T, h *host, vm string, want *regexp.Regexp) primStatus {
	t.Helper()
	s := waitStatus(t, h, vm, "health critical", func(s primStatus) bool { return s.Health == "critical" })
	if s.State != "error" || !s.NextRetry.IsZero() || s.Metrics.RetriesTotal != 0 || s.Metrics.Health != 2 {
		t.Fatalf("a refused primary should stop without retrying (state error, no next_retry, retries_total 0, metrics.health 2): %+v", s)
	}
	if !want.MatchString(s.Reason) {
		t.Fatalf("reason %q does not say %v", s.Reason, want)
	}
	t.Logf("%s refused: %s", vm, s.Reason)
	// No retry later either: the state stays, the counter stays 0.
	again := primaryStatus(t, h, vm)
	if again.State != "error" || again.Metrics.RetriesTotal != 0 {
		t.Fatalf("refused replication retried: %+v", again)
	}
	return s
}

// TestReplicationRefusesStrangers checks DESIGN invariant 5 end to end: the
// replica takes data only from a primary whose certificate chains to its CA,
// that is on its allow-list, and only for VMs that primary owns. Each
// refusal stops replication on the primary with health critical and a
// reason an admin can act on, writes nothing on the replica, and, once the
// admin fixed the cause, `replication resume` replicates.
func TestReplicationRefusesStrangers(t *testing.T) {
	need(t, "nbdcopy", "qemu-io")
	p := newPair(t)

	// (a) A primary with a certificate from another CA. The daemon's own
	// certificate must chain to its --tls-ca, so it trusts only that CA and
	// refuses the replica's certificate; the replica, for its part, refuses
	// a client certificate from that CA (checked with a plain TLS client
	// below). Even an allow-list entry for its name does not let it in.
	otherCA := t.TempDir()
	vdrepl(t, "pki", "init", "--dir", otherCA, "--name", "other")
	stranger := extraPrimary(t, otherCA, "stranger.test")
	strangerStorage := filepath.Join(t.TempDir(), "stranger")
	p.rep.run("replica", "allow", "add", "--primary", "stranger.test", "--storage", strangerStorage)
	stranger.addVM("vma", "32M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", stranger.uri("vma/disk0"))
	// --no-check: the shipper's own refusal is under test here (the
	// pre-check of enable is TestEnableChecksReplica's).
	stranger.run("replication", "enable", "vma", "--replica", p.replicaAddr, "--frequency", "1h", "--no-check")
	refused(t, stranger, "vma", regexp.MustCompile(`(?i)certificate|authority`))
	noReplicaVM(t, p.rep, "vma", strangerStorage, p.storage)

	// The replica side: a client certificate from the other CA gets no
	// answer at all, whatever it asks.
	cert, err := tls.LoadX509KeyPair(filepath.Join(otherCA, "stranger.test.crt"), filepath.Join(otherCA, "stranger.test.key"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(p.pki, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	for _, certs := range [][]tls.Certificate{{cert}, nil} {
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: roots, ServerName: "127.0.0.1", Certificates: certs, MinVersion: tls.VersionTLS13,
		}}}
		body := strings.NewReader(`{"disks":[{"name":"disk0","size":33554432}]}`)
		req, _ := http.NewRequest(http.MethodPut, "https://"+p.replicaAddr+"/v1/replicas/vma", body)
		resp, err := c.Do(req)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Fatalf("replica answered a client with %d certificate(s) from no CA of its own: %s %s", len(certs), resp.Status, b)
		}
		if !regexp.MustCompile(`(?i)certificate|authority`).MatchString(err.Error()) {
			t.Errorf("TLS refusal of a stranger's certificate does not name the certificate: %v", err)
		}
	}
	noReplicaVM(t, p.rep, "vma", strangerStorage, p.storage)

	// (b) A certificate from the right CA, not on the allow-list.
	unlisted := extraPrimary(t, p.pki, "unlisted.test")
	unlistedStorage := filepath.Join(t.TempDir(), "unlisted")
	unlisted.addVM("vmb", "32M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 2M", "-c", "write -P 0x23 20M 64k", unlisted.uri("vmb/disk0"))
	unlisted.run("replication", "enable", "vmb", "--replica", p.replicaAddr, "--frequency", "1h", "--no-check")
	refused(t, unlisted, "vmb", regexp.MustCompile(`(?i)not on the allow-list|not allowed|forbidden`))
	noReplicaVM(t, p.rep, "vmb", unlistedStorage, p.storage, strangerStorage)

	// The admin allows it; resume retries at once and it replicates.
	p.rep.run("replica", "allow", "add", "--primary", "unlisted.test", "--storage", unlistedStorage)
	unlisted.run("replication", "resume", "vmb")
	unlisted.run("replication", "sync", "vmb", "--timeout", "30s")
	checkEqualAt(t, unlisted, unlistedStorage, "vmb")
	if s := primaryStatus(t, unlisted, "vmb"); s.State != "replicating" || s.Health != "normal" {
		t.Fatalf("after allow add and resume: %+v", s)
	}

	// (c) An allowed primary naming a VM another primary replicates there.
	p.prim.addVM("vm1", "32M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4M", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
	aImage := filepath.Join(p.storage, "vm1", "disk0.img")
	before := fileHash(t, aImage)

	// unlisted.test is allowed now (its own storage entry); its vm1 is
	// someone else's VM on this replica.
	unlisted.addVM("vm1", "32M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 0 8M", unlisted.uri("vm1/disk0"))
	unlisted.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h", "--no-check")
	refused(t, unlisted, "vm1", regexp.MustCompile(`(?i)forbidden|belongs to|not allowed|may not`))
	if after := fileHash(t, aImage); after != before {
		t.Fatal("primary.test's replica image of vm1 changed after unlisted.test tried to replicate its own vm1")
	}
	if _, err := os.Stat(filepath.Join(unlistedStorage, "vm1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("replica made vm1 in unlisted.test's storage: %v", err)
	}
	rs := p.rep.replication("vm1")
	if len(rs.Replicas) != 1 || rs.Replicas[0].Primary != "primary.test" {
		t.Fatalf("vm1 on the replica should still be primary.test's: %+v", rs.Replicas)
	}
	// The owner goes on replicating.
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x55 6M 1M", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
}

// fioWrite writes random, incompressible data through NBD: total bytes in
// all, 4 KiB at a time, at random places in [offset, offset+size) when
// random, else sequentially.
func fioWrite(t *testing.T, uri, offset, size, total string, random bool) {
	t.Helper()
	rw := "write"
	if random {
		rw = "randwrite"
	}
	sh(t, "fio", "--name=fill", "--ioengine=nbd", "--uri="+uri, "--rw="+rw, "--bs=4k", "--iodepth=16",
		"--offset="+offset, "--size="+size, "--io_size="+total, "--refill_buffers", "--norandommap", "--randrepeat=0")
}

// background runs the CLI against h in the background; the channel gets
// its error (nil on exit 0) and output once it exits.
func background(h *host, args ...string) <-chan error {
	ch := make(chan error, 1)
	cmd := exec.Command(vdreplBin, append([]string{"--state", h.state}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		ch <- err
		return ch
	}
	go func() {
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("vdrepl %s: %w\n%s", strings.Join(args, " "), err, out.String())
		}
		ch <- err
	}()
	return ch
}

// needRoot skips a test that mounts filesystems when not root (CI runs as
// root, so there it fails instead).
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("this test mounts a tmpfs and needs root")
		}
		t.Skip("this test mounts a tmpfs and needs root")
	}
}

// TestReplicaStorageFull: the replica's storage directory is a 40 MiB
// filesystem, nearly full, when a 16 MiB cycle arrives. The primary sees a
// clear "full" error and keeps retrying (health warning, never critical:
// an admin freeing space is all it takes), the replica image stays at the
// last applied cycle, and once space is freed the next retry goes through,
// the waiting `replication sync` returns and the images are equal.
func TestReplicaStorageFull(t *testing.T) {
	need(t, "fio", "nbdcopy", "qemu-io")
	needRoot(t)
	mnt := t.TempDir()
	sh(t, "mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", mnt)
	// Registered before the daemons start, so it runs after they stopped.
	t.Cleanup(func() {
		if out, err := runOut("umount", mnt); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	p := newPairWith(t, pairOpts{storage: mnt})
	p.prim.addVM("vm1", "64M")
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", p.prim.uri("vm1/disk0"))
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
	image := filepath.Join(mnt, "vm1", "disk0.img")
	applied := fileHash(t, image)

	// Leave 4 MiB free.
	var fs syscall.Statfs_t
	if err := syscall.Statfs(mnt, &fs); err != nil {
		t.Fatal(err)
	}
	free := int64(fs.Bavail) * fs.Bsize
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, free-4<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	fioWrite(t, p.prim.uri("vm1/disk0"), "8m", "16m", "16m", false)
	syncDone := background(p.prim, "replication", "sync", "vm1")
	full := regexp.MustCompile(`(?i)full|no space`)
	s := waitStatus(t, p.prim, "vm1", "a full-storage error with a retry scheduled", func(s primStatus) bool {
		return full.MatchString(s.LastError) && !s.NextRetry.IsZero()
	})
	t.Logf("while full: %+v", s)
	if s.Health != "warning" || s.Metrics.Health != 1 || s.State == "error" {
		t.Fatalf("a full replica is worth a warning and retries, not a stop: %+v", s)
	}
	// Watch a few retries: never critical, never stopped, always a warning
	// (a script polling health must not see "normal" while the cycle cannot
	// be stored, also not while a retry is under way), the sync does not
	// return, the replica image does not change.
	retries := s.Metrics.RetriesTotal
	var notWarning []primStatus
	waitStatus(t, p.prim, "vm1", "three more retries", func(s primStatus) bool {
		if s.Health == "critical" || s.State == "error" {
			t.Fatalf("replication stopped on a full replica: %+v", s)
		}
		if s.Health != "warning" || s.Metrics.Health != 1 {
			notWarning = append(notWarning, s)
		}
		return s.Metrics.RetriesTotal >= retries+3
	})
	if len(notWarning) > 0 {
		s := notWarning[0]
		t.Errorf("%d status(es) with health other than warning while the replica is full, e.g. health %q, state %q, reason %q, last error %q, next retry %v",
			len(notWarning), s.Health, s.State, s.Reason, s.LastError, s.NextRetry)
	}
	select {
	case err := <-syncDone:
		t.Fatalf("replication sync returned while the replica is full: %v", err)
	default:
	}
	if fileHash(t, image) != applied {
		t.Fatal("the replica image changed although the cycle could not be stored")
	}

	// The admin frees space; a retry ships the cycle.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-syncDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(40 * time.Second):
		t.Fatalf("replication sync did not finish within 40s of freeing space: %+v", primaryStatus(t, p.prim, "vm1"))
	}
	p.checkEqual(t, "vm1", "disk0")
	if s := primaryStatus(t, p.prim, "vm1"); s.State != "replicating" || s.Health != "normal" || !s.NextRetry.IsZero() {
		t.Fatalf("after space was freed and the cycle shipped: %+v", s)
	}
}

// TestJournalCapResync: with replication paused, writes pass the journal's
// 8 MiB cap. The journal can no longer prove the replica complete, so the
// VM says resync-required. Resume plus a manual resync (which does not wait
// for the resync window) repairs it, sending only the blocks that differ:
// the 8 MiB region written, not the 64 MiB disk.
func TestJournalCapResync(t *testing.T) {
	need(t, "fio", "nbdcopy")
	// A resync window that is not now (it opens in two hours), so nothing
	// but the manual resync can repair the replica while the test runs.
	now := time.Now()
	window := now.Add(2*time.Hour).Format("15:04") + "-" + now.Add(3*time.Hour).Format("15:04")
	p := newPairWith(t, pairOpts{primExtra: []string{"--journal-cap", "8M", "--resync-window", window}})
	p.prim.addVM("vm1", "64M")
	fioWrite(t, p.prim.uri("vm1/disk0"), "0", "48m", "48m", false)
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")

	p.prim.run("replication", "pause", "vm1")
	waitStatus(t, p.prim, "vm1", "state paused", func(s primStatus) bool { return s.State == "paused" })
	// 32 MiB of random 4 KiB writes, all inside [16M, 24M): four times the
	// cap passes through the journal, an eighth of the disk changes.
	fioWrite(t, p.prim.uri("vm1/disk0"), "16m", "8m", "32m", true)
	// Paused or not, an admin must see that the journal overflowed and that
	// resuming alone will not catch the replica up.
	ps, ok := pollStatus(t, p.prim, "vm1", 5*time.Second, func(s primStatus) bool {
		return (s.State == "resync-required" || strings.Contains(s.Reason, "cap")) && s.Health == "warning"
	})
	if !ok {
		t.Errorf("paused with the journal past its cap, the status does not say so: state %q, health %q, reason %q, pending_bytes %d",
			ps.State, ps.Health, ps.Reason, ps.Metrics.PendingBytes)
	}
	p.prim.run("replication", "resume", "vm1")
	s := waitStatus(t, p.prim, "vm1", "state resync-required", func(s primStatus) bool { return s.State == "resync-required" })
	t.Logf("after the journal passed its cap: %+v", s)
	if s.Health != "warning" || s.Metrics.JournalCapBytes != 8<<20 {
		t.Fatalf("resync required is worth a warning; the cap is 8 MiB: %+v", s)
	}
	before := s.Metrics.SyncWireBytesTotal

	p.prim.run("replication", "resync", "vm1")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
	s = waitStatus(t, p.prim, "vm1", "replicating after the resync", func(s primStatus) bool { return s.State == "replicating" })
	sent := s.Metrics.SyncWireBytesTotal - before
	t.Logf("resync sent %d bytes", sent)
	if sent <= 0 || sent > 12<<20 {
		t.Fatalf("the resync sent %d bytes for an 8 MiB region of a 64 MiB disk; want more than 0 and at most 12 MiB", sent)
	}
	if s.Health != "normal" {
		t.Fatalf("after the resync: %+v", s)
	}
}

// TestOfflineInitialCopy: the initial copy goes by media. The primary writes
// it to a directory, the replica imports it, and the writes made on the
// primary after the copy was written (they are in no piece of it) arrive as
// cycles.
func TestOfflineInitialCopy(t *testing.T) {
	need(t, "fio", "nbdcopy", "qemu-io")
	p := newPair(t)
	p.prim.addVM("vm1", "64M")
	fioWrite(t, p.prim.uri("vm1/disk0"), "0", "24m", "24m", false)
	media := filepath.Join(t.TempDir(), "media")
	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h", "--initial", "offline:"+media)
	waitFor(t, "the offline copy's manifest", func() bool {
		_, err := os.Stat(filepath.Join(media, "manifest.json"))
		return err == nil
	})
	s := waitStatus(t, p.prim, "vm1", "the primary waiting for the import", func(s primStatus) bool {
		return s.State == "initial-copy" && strings.Contains(s.Reason, "import")
	})
	if s.Health == "critical" {
		t.Fatalf("waiting for an import is no failure: %+v", s)
	}

	// Writes after the copy was written, to data the copy holds and to
	// places it does not: overwritten, new, and discarded blocks.
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x7a 30M 2M", "-c", "write -P 0x7b 1M 64k", "-c", "discard 8M 1M", p.prim.uri("vm1/disk0"))
	fioWrite(t, p.prim.uri("vm1/disk0"), "40m", "8m", "4m", true)

	p.rep.run("replication", "import-initial", "vm1", media)
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
	s = waitStatus(t, p.prim, "vm1", "replicating", func(s primStatus) bool { return s.State == "replicating" })
	if s.Health != "normal" || s.LastApplied == 0 {
		t.Fatalf("after the import and a sync: %+v", s)
	}
	// The 24 MiB went by media, not over the network.
	if s.Metrics.SyncWireBytesTotal > 4<<20 {
		t.Errorf("an offline initial copy sent %d sync bytes over the network", s.Metrics.SyncWireBytesTotal)
	}
	if r := p.rep.replication("vm1"); len(r.Replicas) != 1 || !r.Replicas[0].Consistent || r.Replicas[0].Primary != "primary.test" {
		t.Fatalf("replica status after the import: %+v", r.Replicas)
	}
}

// TestExistingInitialCopy: the replica host already holds the images (a
// restored backup), a little older than the primary. Enabled with
// --initial existing, only the blocks that differ cross the network. Then
// the JSON of `replication status` on both hosts has what a monitoring
// script reads.
func TestExistingInitialCopy(t *testing.T) {
	need(t, "fio", "nbdcopy", "qemu-io")
	p := newPair(t)
	p.prim.addVM("vm1", "64M")
	fioWrite(t, p.prim.uri("vm1/disk0"), "0", "48m", "48m", false)

	// The backup: the primary's disk as it is now, restored where the
	// replica keeps vm1's image.
	backup := exportBytes(t, p.prim, "vm1/disk0")
	if err := os.MkdirAll(filepath.Join(p.storage, "vm1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p.storage, "vm1", "disk0.img"), backup, 0o600); err != nil {
		t.Fatal(err)
	}
	// Life went on after the backup: 1.3 MiB changed, with random data (a
	// pattern would compress to nothing and prove nothing about what was
	// sent), and 64 KiB discarded.
	fioWrite(t, p.prim.uri("vm1/disk0"), "10m", "1m", "1m", false)
	fioWrite(t, p.prim.uri("vm1/disk0"), "40m", "256k", "256k", false)
	fioWrite(t, p.prim.uri("vm1/disk0"), "56m", "64k", "64k", false)
	sh(t, "qemu-io", "-f", "raw", "-c", "discard 20M 64k", p.prim.uri("vm1/disk0"))

	p.prim.run("replication", "enable", "vm1", "--replica", p.replicaAddr, "--frequency", "1h", "--initial", "existing")
	p.prim.run("replication", "sync", "vm1", "--timeout", "30s")
	p.checkEqual(t, "vm1", "disk0")
	s := waitStatus(t, p.prim, "vm1", "replicating", func(s primStatus) bool { return s.State == "replicating" })
	t.Logf("existing initial copy sent %d sync bytes", s.Metrics.SyncWireBytesTotal)
	if s.Metrics.SyncWireBytesTotal < 1<<20 || s.Metrics.SyncWireBytesTotal > 4<<20 {
		t.Fatalf("the existing initial copy sent %d bytes for 1.3 MiB of random changes on a 64 MiB disk (48 MiB of data); want 1-4 MiB", s.Metrics.SyncWireBytesTotal)
	}

	checkStatusJSON(t, p, "vm1")
}

// checkStatusJSON reads `replication status --json` of both hosts as a
// script would, by field name, after a `replication sync`.
func checkStatusJSON(t *testing.T, p *pair, vm string) {
	t.Helper()
	var prim, rep map[string]any
	if err := json.Unmarshal([]byte(p.prim.run("replication", "status", "--json")), &prim); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(p.rep.run("replication", "status", "--json")), &rep); err != nil {
		t.Fatal(err)
	}
	one := func(m map[string]any, list string) map[string]any {
		l, _ := m[list].([]any)
		for _, e := range l {
			if e, _ := e.(map[string]any); e["vm"] == vm {
				return e
			}
		}
		t.Fatalf("status has no %s entry for %s: %v", list, vm, m)
		return nil
	}
	pe, re := one(prim, "primaries"), one(rep, "replicas")
	if pe["role"] != "primary" || pe["state"] != "replicating" || pe["health"] != "normal" {
		t.Errorf("primary: role %v, state %v, health %v", pe["role"], pe["state"], pe["health"])
	}
	applied, ok := pe["last_applied_cycle"].(float64)
	if !ok || applied < 1 {
		t.Errorf("primary: last_applied_cycle %v", pe["last_applied_cycle"])
	}
	m, _ := pe["metrics"].(map[string]any)
	for _, k := range []string{"lag_seconds", "pending_bytes", "pending_cycles", "journal_cap_bytes", "health", "cycles_shipped_total", "sync_wire_bytes_total"} {
		if _, ok := m[k].(float64); !ok {
			t.Errorf("primary: metrics.%s is %v (%T), want a number", k, m[k], m[k])
		}
	}
	if lag, _ := m["lag_seconds"].(float64); lag < 0 || lag > 60 {
		t.Errorf("primary: metrics.lag_seconds %v right after a sync", m["lag_seconds"])
	}
	if m["pending_cycles"] != 0.0 || m["health"] != 0.0 {
		t.Errorf("primary: after a sync pending_cycles %v, metrics.health %v", m["pending_cycles"], m["health"])
	}
	if re["role"] != "replica" || re["primary"] != "primary.test" || re["state"] != "replicating" || re["consistent"] != true || re["applied"] != applied {
		t.Errorf("replica: role %v, primary %v, state %v, consistent %v, applied %v (primary says %v)",
			re["role"], re["primary"], re["state"], re["consistent"], re["applied"], applied)
	}

	// Unshipped writes show as pending bytes while paused.
	p.prim.run("replication", "pause", vm)
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x66 0 2M", p.prim.uri(vm+"/disk0"))
	s := primaryStatus(t, p.prim, vm)
	if s.Metrics.PendingBytes < 2<<20 {
		t.Errorf("paused with 2 MiB written, pending_bytes is %d", s.Metrics.PendingBytes)
	}
	p.prim.run("replication", "resume", vm)
	p.prim.run("replication", "sync", vm, "--timeout", "30s")
	p.checkEqual(t, vm, "disk0")
}
