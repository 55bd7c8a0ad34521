package tlscost

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
	"github.com/vdrepl/vdrepl/ship"
)

// replicateBytes is what one round writes to each VM's disk and replicates:
// the whole disk, in 1 MiB writes.
const (
	replicateBytes = 1 << 30
	writeSize      = 1 << 20
	// benchDir holds the benchmark's journals, staging and images: a real
	// disk, like the daemon's state directory (not the tmpfs /tmp may be).
	benchDir = "/var/tmp"
)

// rig is one replica server (package apply, staging on disk) listening
// twice on loopback, once with vdrepl's mutual TLS and once in plain HTTP,
// and one primary VM (a real journal and a real Shipper) replicating to
// each listener.
type rig struct {
	compress bool // zstd data frames, and data that compresses to about half
	primary  *pki.Identity
	replica  *apply.Server
	plain    *pipeline
	tls      *pipeline
	size     int64
	pool     []byte // random data the rounds write from
}

// listenerCheck records what the replica's listener saw of the requests
// that reached it, so a benchmark can prove it measured what it says.
type listenerCheck struct {
	mu       sync.Mutex
	requests int
	bad      string // the first request that did not come as it should
}

func (c *listenerCheck) saw(bad string) {
	c.mu.Lock()
	c.requests++
	if c.bad == "" {
		c.bad = bad
	}
	c.mu.Unlock()
}

// verify fails tb if no request came or one came otherwise than it should.
func (c *listenerCheck) verify(tb testing.TB, name string) {
	tb.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.requests == 0 {
		tb.Errorf("%s listener: no request", name)
	}
	if c.bad != "" {
		tb.Errorf("%s listener: %s", name, c.bad)
	}
}

// pipeline is one VM replicated over one of the rig's listeners.
type pipeline struct {
	mode  string // "plain" or "tls"
	vm    string
	j     *journal.Journal
	s     *ship.Shipper
	check *listenerCheck
	// shipped gets the cycles shipped and their bytes on the wire, from
	// Events.CycleShipped (which may come after Sync returned).
	shipped chan shippedCycle
}

type shippedCycle struct {
	cycle uint64
	wire  int64
}

// newRig builds the replica server, both listeners and both pipelines under
// dir, and makes the initial copy of each VM (size bytes of zeroes).
func newRig(tb testing.TB, dir string, size int64, compress bool) *rig {
	tb.Helper()
	primary, replica, caCert := identitiesCA(tb)
	srv, err := apply.New(apply.Config{StateDir: filepath.Join(dir, "replica", "state")})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { srv.Close() })
	if err := srv.Allow(apply.AllowEntry{Primary: primary.Name(), Storage: filepath.Join(dir, "replica", "storage")}); err != nil {
		tb.Fatal(err)
	}
	r := &rig{compress: compress, primary: primary, replica: srv, size: size, pool: make([]byte, 64<<20+writeSize)}
	rng := rand.NewChaCha8([32]byte{'v', 'd', 'r', 'e', 'p', 'l'})
	rng.Read(r.pool)
	if compress {
		// Half of every 4 KiB block random, half zeroes, as fio's
		// buffer_compress_percentage=50 in bench/repl.sh.
		for i := 0; i < len(r.pool); i += 4096 {
			clear(r.pool[i+2048 : min(i+4096, len(r.pool))])
		}
	}

	// The TLS listener is the daemon's (daemon.serveReplica): an http.Server
	// with its handler on a tls.NewListener with pki's ServerConfig.
	tlsCheck := &listenerCheck{}
	tlsAddr := serveReplica(tb, replica.ServerConfig(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch cs := r.TLS; {
		case cs == nil:
			tlsCheck.saw("a request without TLS")
		case cs.Version != tls.VersionTLS13 || cs.CipherSuite != tls.TLS_AES_128_GCM_SHA256 || r.ProtoMajor != 1:
			tlsCheck.saw(fmt.Sprintf("HTTP/%d.%d over %s with %s, want HTTP/1.1 over TLS 1.3 with TLS_AES_128_GCM_SHA256",
				r.ProtoMajor, r.ProtoMinor, tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite)))
		default:
			tlsCheck.saw("")
		}
		srv.Handler().ServeHTTP(w, r)
	}))
	// The plain listener serves the same handler without TLS. apply.Handler
	// takes the primary from the verified client certificate of r.TLS; here
	// the benchmark hands it the certificate the TLS handshake would have
	// verified (the primary's, issued by the CA).
	plainCheck := &listenerCheck{}
	plainAddr := serveReplica(tb, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil || r.ProtoMajor != 1 {
			plainCheck.saw(fmt.Sprintf("HTTP/%d.%d, TLS %v: want plain HTTP/1.1", r.ProtoMajor, r.ProtoMinor, r.TLS != nil))
		} else {
			plainCheck.saw("")
		}
		r.TLS = &tls.ConnectionState{
			Version: tls.VersionTLS13, HandshakeComplete: true,
			PeerCertificates: []*x509.Certificate{primary.Leaf()},
			VerifiedChains:   [][]*x509.Certificate{{primary.Leaf(), caCert}},
		}
		srv.Handler().ServeHTTP(w, r)
	}))
	r.plain = r.newPipeline(tb, dir, "plain", plainAddr, plainCheck)
	r.tls = r.newPipeline(tb, dir, "tls", tlsAddr, tlsCheck)
	return r
}

// serveReplica serves h on a loopback listener, over TLS when conf is not
// nil, with the daemon's server settings; it returns host:port.
func serveReplica(tb testing.TB, conf *tls.Config, h http.Handler) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{
		Handler:           h,
		TLSConfig:         conf,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	if conf != nil {
		l = tls.NewListener(l, conf)
	}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// newPipeline opens a journal on a sparse image of r.size bytes and runs a
// Shipper for it to addr (plain HTTP if mode is "plain"), configured as the
// daemon configures one (ship.Config in daemon/replication.go), compression
// as r.compress. It returns once the initial copy is done.
func (r *rig) newPipeline(tb testing.TB, dir, mode, addr string, check *listenerCheck) *pipeline {
	tb.Helper()
	dir = filepath.Join(dir, mode)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	img := filepath.Join(dir, "disk0.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Truncate(img, r.size); err != nil {
		tb.Fatal(err)
	}
	j, err := journal.Open(journal.Config{
		Dir: filepath.Join(dir, "journal"), IndexDir: filepath.Join(dir, "index"),
		Disks:  []journal.DiskSpec{{Name: "disk0", Path: img, Size: r.size}},
		Retain: true, Cap: 4 * r.size,
	})
	if err != nil {
		tb.Fatal(err)
	}
	p := &pipeline{mode: mode, vm: "vm-" + mode, j: j, check: check, shipped: make(chan shippedCycle, 64)}
	p.s, err = ship.New(ship.Config{
		VM: p.vm, Disks: []wire.Disk{{Name: "disk0", Size: r.size}}, Journal: ship.FromJournal(j),
		Replica: addr, TLS: r.primary.ClientConfig("127.0.0.1"), PlainHTTP: mode == "plain", BypassProxy: true,
		Compress:  r.compress,
		Frequency: time.Hour, StateFile: filepath.Join(dir, "ship", p.vm+".json"),
		Events: ship.Events{CycleShipped: func(c journal.CycleInfo, n int64, _ time.Duration) {
			select {
			case p.shipped <- shippedCycle{c.Cycle, n}:
			default: // nobody asked for it
			}
		}},
	})
	if err != nil {
		j.Close()
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.s.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("%s: Run: %v", mode, err)
		}
		p.s.Close()
		j.Close()
	})
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer scancel()
	if _, err := p.s.Sync(sctx, false); err != nil {
		tb.Fatalf("%s: initial copy: %v; status %+v", mode, err, p.s.Status())
	}
	return p
}

// sample is one cycle replicated: wall time, CPU time of the process (both
// sides of the wire live in it), and bytes on the wire.
type sample struct {
	wall, cpu time.Duration
	wire      int64
}

// round writes the whole disk of p (1 MiB writes from r.pool, different
// data each round), waits until the journal is synced and written back and
// the page cache is clean, then times replicating that one cycle: seal,
// make the stream from the journal, upload it, stage, verify, commit and
// apply it on the replica (ship.Shipper.Sync). Only that is timed.
func (r *rig) round(b testing.TB, p *pipeline, n int, timer func(on bool)) sample {
	b.Helper()
	timer(false)
	d := p.j.Disk(0)
	for off := int64(0); off < r.size; off += writeSize {
		at := (off*5 + int64(n)*(9<<20+4096)) % (int64(len(r.pool)) - writeSize)
		if _, err := d.WriteAt(r.pool[at:at+min(writeSize, r.size-off)], off); err != nil {
			b.Fatal(err)
		}
	}
	if err := p.j.Flush(); err != nil {
		b.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Minute)
	for st := p.j.Stats(); st.Applied < st.Head || st.PendingBlocks > 0; st = p.j.Stats() {
		if time.Now().After(deadline) {
			b.Fatalf("%s: journal not written back after 5 minutes: %+v", p.mode, st)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
	syscall.Sync()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cpu0 := cpuTime()
	t0 := time.Now()
	timer(true)
	c, err := p.s.Sync(ctx, false)
	timer(false)
	s := sample{wall: time.Since(t0), cpu: cpuTime() - cpu0}
	if err != nil {
		b.Fatalf("%s: replication sync: %v; status %+v", p.mode, err, p.s.Status())
	}
	timeout := time.After(time.Minute)
	for s.wire == 0 {
		select {
		case sc := <-p.shipped:
			if sc.cycle == c {
				s.wire = sc.wire
			}
		case <-timeout:
			b.Fatalf("%s: no CycleShipped event for cycle %d", p.mode, c)
		}
	}
	return s
}

// cpuTime is the user and system CPU time of this process so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// verify checks that each replica image equals its primary disk, and that
// each listener saw only what it should (TLS 1.3 with AES-128-GCM, or no
// TLS at all).
func (r *rig) verify(tb testing.TB) {
	tb.Helper()
	for _, p := range []*pipeline{r.plain, r.tls} {
		p.check.verify(tb, p.mode)
		imgs := r.replica.Images(p.vm)
		if len(imgs) != 1 {
			tb.Fatalf("%s: replica images %v", p.mode, imgs)
		}
		f, err := os.Open(imgs[0])
		if err != nil {
			tb.Fatal(err)
		}
		want, got := make([]byte, 8<<20), make([]byte, 8<<20)
		for off := int64(0); off < r.size; off += int64(len(want)) {
			n := min(int64(len(want)), r.size-off)
			if _, err := p.j.Disk(0).ReadAt(want[:n], off); err != nil {
				tb.Fatal(err)
			}
			if _, err := f.ReadAt(got[:n], off); err != nil && !errors.Is(err, io.EOF) {
				tb.Fatal(err)
			}
			if !bytes.Equal(want[:n], got[:n]) {
				f.Close()
				tb.Fatalf("%s: the replica image differs from the primary disk in [%d, %d)", p.mode, off, off+n)
			}
		}
		f.Close()
	}
}

// BenchmarkReplicate measures replication throughput with and without TLS.
// Each iteration is a round: one cycle of 1 GiB (the whole disk in 1 MiB
// writes) replicated over plain HTTP and one over TLS, in turn (which goes
// first alternates), on loopback, through the real journal, shipper and
// replica server, all in this process (as two daemons on this machine,
// they share its cores). Only `replication sync` is timed (Shipper.Sync:
// seal, stream, upload, stage, verify, commit, apply), not the writes nor
// the journal's write-back, which each round lets finish (and syncs the
// file systems) first. "raw" is random data with compression off, as the
// apply-rate part of bench/repl.sh: every byte crosses TLS. "zstd" is data
// that compresses to about half, with compression on (the default).
//
// It reports the medians over the rounds of each side's rate (GiB of guest
// data / wall time) and CPU time of the process per GiB, the TLS cost 1 -
// tls/plain of the medians, and the median of the costs paired by round;
// -v logs every round and the ranges. At the end each replica image is
// compared with its primary disk.
func BenchmarkReplicate(b *testing.B) {
	b.Run("raw", func(b *testing.B) { benchReplicate(b, false) })
	b.Run("zstd", func(b *testing.B) { benchReplicate(b, true) })
}

func benchReplicate(b *testing.B, compress bool) {
	dir, err := os.MkdirTemp(benchDir, "vdrepl-tlscost-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	r := newRig(b, dir, replicateBytes, compress)
	timer := func(on bool) {
		if on {
			b.StartTimer()
		} else {
			b.StopTimer()
		}
	}
	var plain, tlsS []sample
	n := 0
	for b.Loop() {
		first, second := r.plain, r.tls
		if n%2 == 1 {
			first, second = second, first
		}
		s1 := r.round(b, first, 2*n, timer)
		s2 := r.round(b, second, 2*n+1, timer)
		if first == r.tls {
			s1, s2 = s2, s1
		}
		plain, tlsS = append(plain, s1), append(tlsS, s2)
		b.Logf("round %d: plain %s; tls %s; tls costs %.1f%% (%s first)", n+1, s1, s2, 100*(1-s1.wall.Seconds()/s2.wall.Seconds()), first.mode)
		n++
		b.StartTimer() // b.Loop wants it running
	}
	b.StopTimer()
	r.verify(b)
	rate := func(s sample) float64 { return float64(replicateBytes) / (1 << 20) / s.wall.Seconds() }
	cpu := func(s sample) float64 { return s.cpu.Seconds() / (float64(replicateBytes) / (1 << 30)) }
	pr, tr := stats(plain, rate), stats(tlsS, rate)
	pc, tc := stats(plain, cpu), stats(tlsS, cpu)
	// The same, paired by round: each round's two runs saw about the same
	// load on the machine.
	var cost, extra []float64
	for i := range plain {
		cost = append(cost, 100*(1-plain[i].wall.Seconds()/tlsS[i].wall.Seconds()))
		extra = append(extra, cpu(tlsS[i])-cpu(plain[i]))
	}
	rc, re := median(cost), median(extra)
	b.Logf("%d rounds of %d MiB, wire %d MiB per cycle (compression %v)", n, replicateBytes>>20, tlsS[0].wire>>20, compress)
	b.Logf("plain: %.0f MiB/s median (range %.0f-%.0f), %.2f CPU-s/GiB (range %.2f-%.2f)", pr[1], pr[0], pr[2], pc[1], pc[0], pc[2])
	b.Logf("tls:   %.0f MiB/s median (range %.0f-%.0f), %.2f CPU-s/GiB (range %.2f-%.2f)", tr[1], tr[0], tr[2], tc[1], tc[0], tc[2])
	b.Logf("tls costs %.1f%% of plain's rate (medians); by round: median %.1f%% (range %.1f-%.1f), %.2f CPU-s/GiB more (range %.2f-%.2f)",
		100*(1-tr[1]/pr[1]), rc[1], rc[0], rc[2], re[1], re[0], re[2])
	b.ReportMetric(pr[1], "plain-MiB/s")
	b.ReportMetric(tr[1], "tls-MiB/s")
	b.ReportMetric(100*(1-tr[1]/pr[1]), "tls-cost-%")
	b.ReportMetric(rc[1], "paired-cost-%")
	b.ReportMetric(pc[1], "plain-cpu-s/GiB")
	b.ReportMetric(tc[1], "tls-cpu-s/GiB")
}

// stats is the minimum, median and maximum of f over samples.
func stats(samples []sample, f func(sample) float64) [3]float64 {
	v := make([]float64, len(samples))
	for i, s := range samples {
		v[i] = f(s)
	}
	return median(v)
}

// median is the minimum, median and maximum of v, which it sorts.
func median(v []float64) [3]float64 {
	slices.Sort(v)
	m := v[len(v)/2]
	if len(v)%2 == 0 {
		m = (v[len(v)/2-1] + m) / 2
	}
	return [3]float64{v[0], m, v[len(v)-1]}
}

func (s sample) String() string {
	return fmt.Sprintf("%.2f s (%.0f MiB/s), %.2f CPU-s, wire %d MiB", s.wall.Seconds(),
		float64(replicateBytes)/(1<<20)/s.wall.Seconds(), s.cpu.Seconds(), s.wire>>20)
}

// TestReplicate runs BenchmarkReplicate's rig on a small disk: both
// pipelines replicate a cycle, the images match, the TLS listener saw TLS
// 1.3 with AES-128-GCM and the plain one no TLS.
func TestReplicate(t *testing.T) {
	for _, compress := range []bool{false, true} {
		r := newRig(t, t.TempDir(), 8<<20, compress)
		for i, p := range []*pipeline{r.plain, r.tls} {
			s := r.round(t, p, i, func(bool) {})
			if compress != (s.wire < r.size*3/4) {
				t.Errorf("%s, compression %v: %d bytes on the wire for a cycle of %d bytes", p.mode, compress, s.wire, r.size)
			}
		}
		r.verify(t)
	}
}
