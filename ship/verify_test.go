package ship

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// ChangedSince is the fake journal's answer from its cycles: the blocks and
// ranges of the closed cycles after a and of the open one; a cycle after a
// that is no longer kept makes it journal.ErrTooOld.
func (j *fakeJournal) ChangedSince(a uint64, disk int, off, n int64) ([]bool, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	oldest := j.cycle
	if len(j.closed) > 0 {
		oldest = j.closed[0].info.Cycle
	}
	if j.dirty || a+1 < oldest {
		return nil, journal.ErrTooOld
	}
	first := off / bs
	out := make([]bool, (off+n+bs-1)/bs-first)
	for _, c := range append(j.closed, j.open) {
		if c.info.Cycle <= a {
			continue
		}
		for k := range c.blocks {
			if k[0] == int64(disk) && k[1] >= first && k[1] < first+int64(len(out)) {
				out[k[1]-first] = true
			}
		}
		for _, r := range c.ranges {
			for b := r.Offset / bs; r.Disk == disk && b < (r.Offset+r.Length+bs-1)/bs; b++ {
				if b >= first && b < first+int64(len(out)) {
					out[b-first] = true
				}
			}
		}
	}
	return out, nil
}

var _ ChangedSincer = (*fakeJournal)(nil)

// replicating starts a shipper on a 1 MiB and a 512 KiB disk full of data
// and waits until the replica holds them.
func replicating(t *testing.T) (*env, *run) {
	t.Helper()
	e := newEnv(t, 1<<20, 512<<10)
	e.j.write(0, 0, random(1<<20))
	e.j.write(1, 0, random(512<<10))
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	return e, r
}

// A block that differs on the replica is reported by disk and 4 KiB
// range; a dry run only reports, a verify marks the VM resync required
// with a reason naming them, the resync repairs it, and the verify after
// it is clean. The last result is in the state file.
func TestVerifyFindsAndRepairsADifferentBlock(t *testing.T) {
	e, r := replicating(t)
	e.rep.mu.Lock()
	e.rep.vms["vm1"].images[1][300000] ^= 0xff
	e.rep.mu.Unlock()

	res, err := r.s.Verify(syncCtx(t), VerifyOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.MismatchBlocks != 1 || len(res.Mismatches) != 1 || res.Mismatches[0].Disk != "disk1" ||
		len(res.Mismatches[0].Ranges) != 1 || res.Mismatches[0].Ranges[0].From != 299008 || res.Mismatches[0].Ranges[0].To != 303104 {
		t.Fatalf("dry run: %+v", res)
	}
	if res.ResyncMarked || r.s.Status().State != StateReplicating {
		t.Fatalf("a dry run marked a resync: %+v, status %+v", res, r.s.Status())
	}
	if res.CheckedBytes != (1<<20)+(512<<10) || res.ChangedBlocks != 0 || res.SkippedBytes != 0 {
		t.Fatalf("an idle VM was not checked whole: %+v", res)
	}

	// Hold the resync back until the status was seen.
	var hold atomic.Bool
	hold.Store(true)
	e.rep.mu.Lock()
	e.rep.fail = func(r *http.Request) (int, string) {
		if hold.Load() && strings.HasSuffix(r.URL.Path, "/sync") {
			return http.StatusServiceUnavailable, "busy"
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	res, err = r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !res.ResyncMarked || res.MismatchBlocks != 1 {
		t.Fatalf("verify: %+v", res)
	}
	want := "verify: disk disk1 differs from the replica in 1 blocks: [299008,303104)"
	waitFor(t, r.s, "the reason in the status", func() bool { return strings.Contains(r.s.Status().Reason, want) })
	if l := r.s.Status().LastVerify; l == nil || l.MismatchBlocks != 1 || !l.ResyncMarked || l.CheckedBytes != res.CheckedBytes {
		t.Fatalf("last verify in status: %+v", l)
	}
	st, _, err := loadState(r.s.fs, e.cfg.StateFile)
	if err != nil || st.LastVerify == nil || st.LastVerify.MismatchBlocks != 1 {
		t.Fatalf("last verify in the state file: %+v, %v", st.LastVerify, err)
	}
	hold.Store(false)
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
	res, err = r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil || res.MismatchBlocks != 0 || res.ResyncMarked {
		t.Fatalf("verify after the resync: %+v, %v", res, err)
	}
}

// A block the guest writes while the scrub runs differs from the replica's
// (the cycle holding it is not shipped) and is skipped, never reported.
func TestVerifySkipsBlocksWrittenDuringTheScrub(t *testing.T) {
	e, r := replicating(t)
	var once atomic.Bool
	e.rep.mu.Lock()
	e.rep.fail = func(req *http.Request) (int, string) {
		// The replica hashes its image at its cycle; the guest then
		// writes before the primary reads.
		if strings.HasSuffix(req.URL.Path, "/sums") && once.CompareAndSwap(false, true) {
			e.j.write(0, 100*bs, random(2*bs))
			e.j.zero(0, 200*bs, bs, journal.KindZero)
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	res, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.MismatchBlocks != 0 || res.ResyncMarked {
		t.Fatalf("a write during the scrub was reported: %+v", res)
	}
	// The resync block is 16 KiB: the written blocks 100 and 101 share one,
	// and block 200 is another.
	if want := 2 * DefaultBlockSize / bs; res.ChangedBlocks != int64(want) {
		t.Fatalf("skipped %d blocks as changed, want %d: %+v", res.ChangedBlocks, want, res)
	}
}

// A replica behind by more than the journal holds is skipped with that
// reason, never compared.
func TestVerifySkipsWhatTheJournalCannotAnswer(t *testing.T) {
	e, r := replicating(t)
	e.rep.mu.Lock()
	e.rep.vms["vm1"].applied-- // as if the replica were a cycle behind a released one
	e.rep.mu.Unlock()
	res, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.SkippedBytes != (1<<20)+(512<<10) || len(res.Skipped) != 2 || res.Skipped[0].Why != SkipTooOld || res.CheckedBytes != 0 {
		t.Fatalf("verify against a replica behind the journal: %+v", res)
	}
	// Nothing was compared: the result says so and why, never clean.
	if !res.NothingCompared || res.NotCompared != SkipTooOld || res.SkipReason != SkipTooOld {
		t.Fatalf("a verify that compared nothing: %+v", res)
	}
}

// racingJournal runs once before its first ReadAt: as if, while the
// primary read a step, a cycle was written, shipped, applied and released.
type racingJournal struct {
	*fakeJournal
	once   atomic.Bool
	before func()
}

func (j *racingJournal) ReadAt(disk int, p []byte, off int64) error {
	if j.before != nil && j.once.CompareAndSwap(false, true) {
		j.before()
	}
	return j.fakeJournal.ReadAt(disk, p, off)
}

// A step whose replica cycle the journal released while the primary read
// it is tried again at the replica's new cycle, not skipped.
func TestVerifyTriesAgainWhenACycleWasReleased(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.j.write(0, 0, random(1<<20))
	rj := &racingJournal{fakeJournal: e.j}
	cfg := e.cfg
	cfg.Journal = rj
	r := e.start(cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	rj.before = func() {
		data := random(bs)
		e.j.write(0, 7*bs, data)
		info, _ := e.j.Seal(0)
		e.rep.mu.Lock()
		vm := e.rep.vms["vm1"]
		copy(vm.images[0][7*bs:], data)
		vm.applied = info.Cycle
		e.rep.mu.Unlock()
		e.j.Release(info.Cycle)
	}
	res, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.SkippedBytes != 0 || res.CheckedBytes != 1<<20 || res.MismatchBlocks != 0 || !rj.once.Load() {
		t.Fatalf("verify across a release: %+v", res)
	}
}

// A verify still running when its shipper is closed (replication disable,
// vm remove) is cut short and writes no state: the state file, removed
// after Close, stays removed.
func TestVerifyClosedMidwayWritesNoState(t *testing.T) {
	e, r := replicating(t)
	var sums atomic.Int32
	closing := make(chan struct{})
	e.rep.mu.Lock()
	e.rep.fail = func(req *http.Request) (int, string) {
		// The last step's sums: close the shipper and remove its state
		// as replication disable does, then let the answer go.
		if strings.HasSuffix(req.URL.Path, "/sums") && sums.Add(1) == 2 {
			go func() {
				r.s.Close()
				close(closing)
			}()
			<-r.s.done
			if err := r.s.fs.Remove(e.cfg.StateFile); err != nil {
				t.Error(err)
			}
		}
		return 0, ""
	}
	e.rep.mu.Unlock()
	_, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), "replication was closed") {
		t.Fatalf("verify across Close: %v", err)
	}
	<-closing
	if _, err := r.s.fs.Stat(e.cfg.StateFile); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the state file is back after Close: %v", err)
	}
}

// A verify that finds a block that differs starts the resync at once, as
// `replication resync` does: outside the resync window, shipping is not
// held until the window opens.
func TestVerifyStartsTheResyncAtOnce(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.j.write(0, 0, random(1<<20))
	cfg := e.cfg
	now := time.Now()
	cfg.ResyncWindow = now.Add(2*time.Hour).Format("15:04") + "-" + now.Add(3*time.Hour).Format("15:04")
	r := e.start(cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	e.rep.mu.Lock()
	e.rep.vms["vm1"].images[0][5000] ^= 0xff
	e.rep.mu.Unlock()
	res, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil || !res.ResyncMarked || res.MismatchBlocks != 1 {
		t.Fatalf("verify: %+v, %v", res, err)
	}
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatalf("the resync waits for the window: %v", err)
	}
	e.checkImages(c)
}

// A replica that differs everywhere still makes a result of bounded size:
// at most maxResultRanges merged ranges over all disks are listed, the rest
// counted, and the resync reason counts them too.
func TestVerifyResultRangesAreBounded(t *testing.T) {
	s := &Shipper{cfg: Config{Disks: []wire.Disk{{Name: "d0"}, {Name: "d1"}}}, now: time.Now}
	v := &verifier{s: s}
	const n = maxResultRanges + 500
	for i := int64(0); i < n; i++ { // every other block: n ranges
		v.mismatch(0, 2*i*bs, (2*i+1)*bs)
	}
	v.mismatch(0, (2*n-1)*bs, 2*n*bs) // joins the last range left out
	for i := int64(0); i < 10; i++ {
		v.mismatch(1, 2*i*bs, (2*i+1)*bs)
	}
	r := v.finish()
	if len(r.Mismatches) != 2 {
		t.Fatalf("mismatches: %d disks", len(r.Mismatches))
	}
	m0, m1 := r.Mismatches[0], r.Mismatches[1]
	if len(m0.Ranges) != maxResultRanges || m0.MoreRanges != 500 || m0.Blocks != n+1 {
		t.Fatalf("disk d0: %d ranges listed, %d more, %d blocks", len(m0.Ranges), m0.MoreRanges, m0.Blocks)
	}
	if len(m1.Ranges) != 0 || m1.MoreRanges != 10 || m1.Blocks != 10 || r.MismatchBlocks != n+11 {
		t.Fatalf("disk d1: %d ranges listed, %d more, %d blocks; %d in all", len(m1.Ranges), m1.MoreRanges, m1.Blocks, r.MismatchBlocks)
	}
	if b, _ := json.Marshal(r); len(b) > 200<<10 {
		t.Fatalf("a result of %d bytes", len(b))
	}
	want := "disk d0 differs from the replica in 1501 blocks: [0,4096)"
	if reason := r.reason(); !strings.Contains(reason, want) || !strings.Contains(reason, "and 1492 more") || !strings.Contains(reason, "disk d1 differs from the replica in 10 blocks: and 10 more") {
		t.Fatalf("reason: %s", reason)
	}
}

// staleJournal's first ReadAt returns stale data at staleOff: as if a trim
// of a cycle the replica had applied was punched in the image only after
// the primary read it.
type staleJournal struct {
	*fakeJournal
	once     atomic.Bool
	staleOff int64
}

func (j *staleJournal) ReadAt(disk int, p []byte, off int64) error {
	if err := j.fakeJournal.ReadAt(disk, p, off); err != nil {
		return err
	}
	if disk == 0 && off <= j.staleOff && j.staleOff < off+int64(len(p)) && j.once.CompareAndSwap(false, true) {
		p[j.staleOff-off] ^= 0xff
	}
	return nil
}

// A block whose first read differs from the replica is read again after
// the replica's fine sums, before it is reported: data that reached the
// image late is not a mismatch.
func TestVerifyRefineReadsAgain(t *testing.T) {
	e := newEnv(t, 1<<20)
	e.j.write(0, 0, random(1<<20))
	sj := &staleJournal{fakeJournal: e.j, staleOff: 300000}
	sj.once.Store(true) // fresh reads until the verify
	cfg := e.cfg
	cfg.Journal = sj
	r := e.start(cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	sj.once.Store(false)
	res, err := r.s.Verify(syncCtx(t), VerifyOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !sj.once.Load() || res.MismatchBlocks != 0 || res.CheckedBytes != 1<<20 {
		t.Fatalf("a stale first read was reported: %+v", res)
	}
}

// A block damaged at rest in the primary's image (changed behind the
// journal's back, so its tree still holds the hash of the data the guest
// wrote) differs from the replica; the trees say the replica is right:
// the verify names it as primary damage, takes the replica as the truth
// and starts no resync, which would copy the damage over the good copy.
// A block damaged on the replica in the same run is a plain mismatch.
func TestVerifyNamesPrimaryDamage(t *testing.T) {
	e := newEnv(t, 1<<20, 512<<10)
	e.j.write(0, 0, random(1<<20))
	e.j.write(1, 0, random(512<<10))
	e.j.withTree(t)
	r := e.start(e.cfg)
	waitReplicating(t, r.s)
	if _, err := r.s.Sync(syncCtx(t), false); err != nil {
		t.Fatal(err)
	}
	e.j.mu.Lock()
	e.j.disks[0][70000] ^= 0x5a
	e.j.mu.Unlock()

	res, err := r.s.Verify(syncCtx(t), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.PrimaryDamagedBlocks != 1 || res.MismatchBlocks != 1 || len(res.PrimaryDamaged) != 1 ||
		res.PrimaryDamaged[0].Disk != "disk0" || res.PrimaryDamaged[0].Ranges[0].From != 69632 || res.ResyncMarked ||
		!strings.HasPrefix(res.Truth, "replica") {
		t.Fatalf("verify over a damaged primary image: %+v", res)
	}
	if st := r.s.Status(); st.State != StateReplicating {
		t.Fatalf("primary damage started something: %+v", st)
	}

	// Damage on the replica instead: the primary is right.
	e.j.mu.Lock()
	e.j.disks[0][70000] ^= 0x5a
	e.j.mu.Unlock()
	e.rep.mu.Lock()
	e.rep.vms["vm1"].images[1][300000] ^= 0xff
	e.rep.mu.Unlock()
	res, err = r.s.Verify(syncCtx(t), VerifyOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.PrimaryDamagedBlocks != 0 || res.MismatchBlocks != 1 || !strings.HasPrefix(res.Truth, "primary") {
		t.Fatalf("verify over a damaged replica image: %+v", res)
	}
}

// With VerifyEvery, verifies run on their own: the first one interval
// after the start (the initial copy not done yet makes it wait and try
// again), the next one interval after the last; a block damaged on the
// replica in between is found and repaired without an admin.
func TestScheduledVerify(t *testing.T) {
	e := newEnv(t, 1<<20, 512<<10)
	e.j.write(0, 0, random(1<<20))
	e.j.write(1, 0, random(512<<10))
	cfg := e.cfg
	cfg.VerifyEvery = 200 * time.Millisecond
	r := e.start(cfg)
	waitReplicating(t, r.s)
	waitFor(t, r.s, "a scheduled verify", func() bool {
		l := r.s.Status().LastVerify
		return l != nil && l.CheckedBytes > 0 && l.MismatchBlocks == 0
	})
	first := r.s.Status().LastVerify.At
	e.rep.mu.Lock()
	e.rep.vms["vm1"].images[0][5000] ^= 0xff
	e.rep.mu.Unlock()
	waitFor(t, r.s, "a scheduled verify that finds the damage", func() bool {
		l := r.s.Status().LastVerify
		return l != nil && l.At.After(first) && l.MismatchBlocks == 1 && l.ResyncMarked
	})
	c, err := r.s.Sync(syncCtx(t), false)
	if err != nil {
		t.Fatal(err)
	}
	e.checkImages(c)
}
