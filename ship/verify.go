package ship

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// Verify is an online scrub: it compares every block of the replicated
// disks with the replica's image, at a bounded read rate, while the guest
// writes and cycles ship. A block that differs is judged by the block
// trees: where the primary's image still hashes to what the primary's tree
// recorded when the data was written, the primary is right and a resync
// sends its block. Where it does not, and the replica's tree holds the
// recorded hash, the primary's image was damaged at rest (or changed
// behind vdrepl's back): the replica holds the data the guest wrote, and
// no resync is started, as it would copy the damage over the good copy.
// Where the trees cannot tell (a tree being built, an unknown block), the
// primary's image is taken as the truth, as before the trees.
//
// A range of verifyRange bytes at a time: the replica hashes its blocks
// under its apply lock and names the applied cycle A its images were at
// (wire.SumsCycleHeader); the primary then reads its live blocks and only
// after that asks the journal which of them changed after barrier A
// (journal.ChangedSince). A block unchanged since A holds on the primary
// what it held at A, which is what the replica's image at A must hold; a
// changed one is skipped, never reported, even when the write raced the
// read. A range whose A the journal can no longer answer for (cycles
// released, dirty tracking) is skipped as a whole. A block that differs is
// hashed again in 4 KiB blocks on both sides to name the exact ranges.

// DefaultVerifyRate bounds how fast Verify reads the primary's images.
const DefaultVerifyRate = "100MB/s"

// verifyRange bounds the disk range one step of Verify compares. A step
// reads about a tenth of a second at the rate (at least minVerifyRange):
// cycles the replica applies during a step are released by the journal,
// and one released after the replica named its cycle makes the step
// unanswerable (it is tried again, up to verifyTries times).
const (
	verifyRange    = 8 << 20
	minVerifyRange = 1 << 20
	verifyTries    = 3
)

// verifyStep is the range of one step at rate bytes per second, a multiple
// of bs.
func verifyStep(rate float64, bs int64) int64 {
	n := int64(verifyRange)
	if !math.IsInf(rate, 1) {
		n = int64(min(max(rate/10, minVerifyRange), verifyRange))
	}
	return max(n/bs*bs, bs)
}

// ErrVerifyRunning is returned by Verify while another verify of the VM
// runs.
var ErrVerifyRunning = errors.New("ship: a verify of this VM is already under way")

// Reasons a range was not compared (VerifyRange.Why).
const (
	SkipNotAtCycle = "the replica's images are not at one applied cycle"
	SkipTooOld     = "skipped, replica behind by more than the journal holds"
)

// ChangedSincer is what Verify needs of the journal besides Journal: which
// blocks changed after a barrier (journal.Journal.ChangedSince, in
// journal.BlockSize blocks; journal.ErrTooOld when it cannot tell).
type ChangedSincer interface {
	ChangedSince(a uint64, disk int, off, n int64) ([]bool, error)
}

// VerifyOptions are a Verify's settings.
type VerifyOptions struct {
	// Rate paces the reads of the primary's images; nil is unlimited. The
	// replica hashes one range per request, so it follows the same pace.
	Rate *Limiter
	// DryRun only reports; otherwise differences start a resync now.
	DryRun bool
	// Progress, if set, is called after every range.
	Progress func(VerifyProgress)
}

// VerifyProgress is a verify under way.
type VerifyProgress struct {
	Done    int64     `json:"done_bytes"`
	Total   int64     `json:"total_bytes"`
	Started time.Time `json:"started"`
	// Rate is the bytes per second so far; ETA the seconds left at it.
	Rate       float64 `json:"rate_bytes_per_second"`
	ETASeconds float64 `json:"eta_seconds"`
	DryRun     bool    `json:"dry_run,omitempty"`
}

// VerifyRange is a byte range [From, To) of a disk.
type VerifyRange struct {
	Disk string `json:"disk"`
	From int64  `json:"from"`
	To   int64  `json:"to"`
	// Why a skipped range was not compared.
	Why string `json:"why,omitempty"`
}

// VerifyMismatch is the blocks of one disk that differ from the replica.
type VerifyMismatch struct {
	Disk   string        `json:"disk"`
	Blocks int64         `json:"blocks"` // of journal.BlockSize (4 KiB)
	Ranges []VerifyRange `json:"ranges"` // merged, ascending
	// MoreRanges counts the merged ranges left out of Ranges: a result
	// lists at most maxResultRanges over all disks.
	MoreRanges int64 `json:"more_ranges,omitempty"`
	moreTo     int64 // the end of the last range left out
}

// maxResultRanges bounds the mismatch ranges a VerifyResult lists over all
// disks, so that a replica that differs everywhere still makes an answer
// of bounded size (the control client reads lines of at most 64 MiB).
const maxResultRanges = 1000

// VerifyResult is what a Verify found. Block counts are of 4 KiB.
type VerifyResult struct {
	VM              string    `json:"vm"`
	Started         time.Time `json:"started"`
	Finished        time.Time `json:"finished"`
	DurationSeconds float64   `json:"duration_seconds"`
	Rate            float64   `json:"rate_bytes_per_second"`
	TotalBytes      int64     `json:"total_bytes"`
	CheckedBytes    int64     `json:"checked_bytes"` // compared with the replica
	// ChangedBlocks were skipped: written on the primary after the cycle
	// the replica's image was at.
	ChangedBlocks int64 `json:"skipped_changed_blocks"`
	// Skipped are ranges not compared at all, with why; SkipReason is
	// their distinct whys, joined by "; ".
	SkippedBytes int64         `json:"skipped_bytes"`
	Skipped      []VerifyRange `json:"skipped,omitempty"`
	SkipReason   string        `json:"skip_reason,omitempty"`
	// NothingCompared: not one byte was compared (every range skipped or
	// changed), so the verify says nothing of the replica; NotCompared
	// says why. A caller treats it as a failed verify, not a clean one.
	NothingCompared bool             `json:"nothing_compared,omitempty"`
	NotCompared     string           `json:"not_compared,omitempty"`
	MismatchBlocks  int64            `json:"mismatch_blocks"`
	Mismatches      []VerifyMismatch `json:"mismatches,omitempty"`
	DryRun          bool             `json:"dry_run"`
	// ResyncMarked: a resync was started to repair the mismatches (not
	// with DryRun). It starts at once, not at the resync window.
	ResyncMarked bool `json:"resync_marked"`
	// Truth says which side a mismatch is repaired from, and why.
	Truth string `json:"truth"`
	// PrimaryDamaged are the mismatching blocks (counted in
	// MismatchBlocks too) where the primary's image no longer hashes to
	// what its block tree recorded when the data was written, while the
	// replica's tree holds that hash: damage at rest on the primary. No
	// resync is started for a verify that finds any.
	PrimaryDamagedBlocks int64            `json:"primary_damaged_blocks,omitempty"`
	PrimaryDamaged       []VerifyMismatch `json:"primary_damaged,omitempty"`
}

// Truths of VerifyResult.Truth.
const (
	verifyTruth  = "primary: where a block differs, the primary's image still hashes to what its block tree recorded when the data was written (or the trees cannot tell), so its block is sent"
	replicaTruth = "replica: the primary's image differs from the block hashes its tree recorded when the data was written, and the replica's tree holds them; restore those blocks on the primary from the replica (a test failover exports them), vdrepl does not overwrite either side"
)

// LastVerify is the last verify that finished, kept in the state file.
type LastVerify struct {
	At             time.Time `json:"at"`
	CheckedBytes   int64     `json:"checked_bytes"`
	MismatchBlocks int64     `json:"mismatch_blocks"`
	ResyncMarked   bool      `json:"resync_marked,omitempty"`
	DryRun         bool      `json:"dry_run,omitempty"`
}

// Verify compares the replicated disks with the replica (see above) and
// returns what it found. Without DryRun, mismatches start a resync at once
// (outside the resync window too) with a reason naming the disks and
// ranges. The result is kept
// in the state file (Status.LastVerify). It refuses while a sync runs.
func (s *Shipper) Verify(ctx context.Context, o VerifyOptions) (VerifyResult, error) {
	cs, ok := s.j.(ChangedSincer)
	if !ok {
		return VerifyResult{}, fmt.Errorf("%w: the journal of VM %s cannot say which blocks changed since a cycle", ErrBadConfig, s.cfg.VM)
	}
	var total int64
	for _, d := range s.cfg.Disks {
		total += d.Size
	}
	started := s.now()
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return VerifyResult{}, ErrClosed
	case s.verify != nil:
		s.mu.Unlock()
		return VerifyResult{}, ErrVerifyRunning
	case s.st.Sync != nil:
		kind := syncWhat(s.st.Sync.Kind)
		s.mu.Unlock()
		return VerifyResult{}, fmt.Errorf("%w: verify once the %s has finished", ErrSyncRunning, kind)
	case !s.st.InitialDone:
		s.mu.Unlock()
		return VerifyResult{}, fmt.Errorf("%w: the initial copy has not finished", ErrSyncRunning)
	}
	s.verify = &VerifyProgress{Total: total, Started: started, DryRun: o.DryRun}
	// Close waits for the verify and cuts it short: it must not write the
	// state file after Close (replication disable or vm remove deletes it
	// then).
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		s.verify = nil
		s.signalLocked()
		s.mu.Unlock()
	}()
	ctx, cancel := s.untilClosed(ctx)
	defer cancel()
	s.log.Info("verify started", "bytes", total, "rate", o.Rate.String(), "dry_run", o.DryRun)

	v := &verifier{s: s, cs: cs, o: o, res: VerifyResult{VM: s.cfg.VM, Started: started, TotalBytes: total, DryRun: o.DryRun, Truth: verifyTruth},
		buf: make([]byte, verifyRange)}
	err := v.run(ctx)
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return v.res, fmt.Errorf("%w: verify of VM %s stopped: the replication was closed", ErrClosed, s.cfg.VM)
	}
	if err != nil {
		return v.res, err
	}
	res := v.finish()
	last := LastVerify{At: res.Finished, CheckedBytes: res.CheckedBytes, MismatchBlocks: res.MismatchBlocks, DryRun: o.DryRun}
	if res.PrimaryDamagedBlocks > 0 {
		res.Truth = replicaTruth
		s.log.Error("verify found the primary's image damaged at rest: it differs from the block hashes recorded when the data was written; no resync is started",
			"blocks", res.PrimaryDamagedBlocks, "ranges", damagedRanges(res.PrimaryDamaged))
	}
	if res.MismatchBlocks > 0 && !o.DryRun && res.PrimaryDamagedBlocks == 0 {
		res.ResyncMarked, last.ResyncMarked = true, true
	}
	reason := res.reason()
	err = s.update(func(st *persisted) {
		st.LastVerify = &last
		// The admin ran verify to repair: the resync starts now, as
		// `replication resync` does, not at the resync window (an
		// automatic one holds all shipping until then).
		if res.ResyncMarked {
			if st.Resync == nil {
				st.Resync = &pendingResync{Reason: reason}
			}
			st.Resync.Manual = true
			st.Resync.FullCompare = true
		}
	})
	if res.MismatchBlocks > 0 {
		s.log.Warn("verify found blocks that differ from the replica", "reason", reason, "resync_marked", res.ResyncMarked)
	}
	s.log.Info("verify finished", "checked", res.CheckedBytes, "changed_blocks", res.ChangedBlocks,
		"skipped", res.SkippedBytes, "mismatch_blocks", res.MismatchBlocks, "seconds", res.DurationSeconds)
	return res, err
}

// verifyProgress records done bytes of the verify under way and returns
// its progress.
func (s *Shipper) verifyProgress(done int64) VerifyProgress {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.verify
	p.Done = done
	if el := now.Sub(p.Started).Seconds(); el > 0 && done > 0 {
		p.Rate = float64(done) / el
		p.ETASeconds = float64(p.Total-done) / p.Rate
	}
	s.signalLocked()
	return *p
}

// verifyStatusLocked fills in a Status's verify figures. Caller holds mu.
func (s *Shipper) verifyStatusLocked(st *Status) {
	if s.verify != nil {
		p := *s.verify
		st.Verify = &p
	}
	if l := s.st.LastVerify; l != nil {
		c := *l
		st.LastVerify = &c
	}
}

// verifier is the state of one Verify.
type verifier struct {
	s      *Shipper
	cs     ChangedSincer
	o      VerifyOptions
	res    VerifyResult
	buf    []byte
	diff   diskRanges // blocks that differ, the primary the truth
	damage diskRanges // blocks damaged on the primary (primaryDamaged)
	ranges int        // ranges listed, over all disks and both lists
}

// diskRanges gathers ranges of blocks per disk, in the order found.
type diskRanges struct {
	byDisk map[int]*VerifyMismatch
	order  []int
}

func (d *diskRanges) list() []VerifyMismatch {
	var out []VerifyMismatch
	for _, wd := range d.order {
		out = append(out, *d.byDisk[wd])
	}
	return out
}

// verifyStepOf is one step of a verify: disk range [off, off+n) of wire
// disk wd, and the replica's answer for it.
type verifyStepOf struct {
	wd      int
	off, n  int64
	sums    []byte
	at      uint64
	err     error
	fetched chan struct{} // closed once sums, at and err are set
}

// run compares every step. The replica hashes the next step while the
// primary reads and hashes this one; a step's own read still starts only
// after the replica's answer for it, as compare requires.
func (v *verifier) run(ctx context.Context) error {
	s := v.s
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	size := verifyStep(v.o.Rate.Rate(time.Now()), s.cfg.BlockSize)
	var steps []*verifyStepOf
	for wd, d := range s.cfg.Disks {
		for off := int64(0); off < d.Size; off += size {
			steps = append(steps, &verifyStepOf{wd: wd, off: off, n: min(size, d.Size-off), fetched: make(chan struct{})})
		}
	}
	fetch := func(st *verifyStepOf) {
		go func() {
			defer close(st.fetched)
			st.sums, st.at, st.err = s.c.sumsAt(ctx, wire.SumsRequest{Disk: st.wd, Offset: st.off, Length: st.n, BlockSize: s.cfg.BlockSize})
		}()
	}
	if len(steps) > 0 {
		fetch(steps[0])
	}
	var done int64
	for i, st := range steps {
		<-st.fetched
		if i+1 < len(steps) {
			fetch(steps[i+1])
		}
		if err := v.compare(ctx, st); err != nil {
			cancel()
			if i+1 < len(steps) {
				<-steps[i+1].fetched
			}
			return fmt.Errorf("ship: verify disk %s at %d: %w", s.cfg.Disks[st.wd].Name, st.off, err)
		}
		done += st.n
		p := s.verifyProgress(done)
		if v.o.Progress != nil {
			v.o.Progress(p)
		}
	}
	return nil
}

// compare compares a step whose replica answer is in. A range the journal
// cannot answer for is tried again while the replica's cycle moves (cycles
// were released during the step), else skipped.
func (v *verifier) compare(ctx context.Context, st *verifyStepOf) error {
	s, bs := v.s, v.s.cfg.BlockSize
	wd, off, n := st.wd, st.off, st.n
	jd := s.cfg.DiskIndex[wd]
	var (
		sums    []byte
		at      uint64
		changed []bool
		buf     = v.buf[:n]
	)
	for try := 0; ; try++ {
		prev := at
		var err error
		if try == 0 {
			sums, at, err = st.sums, st.at, st.err
		} else {
			sums, at, err = s.c.sumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: off, Length: n, BlockSize: bs})
		}
		if err != nil {
			return err
		}
		if at == 0 {
			v.skip(wd, off, n, SkipNotAtCycle)
			return nil
		}
		if try > 0 && at == prev {
			v.skip(wd, off, n, SkipTooOld)
			return nil
		}
		if err := v.o.Rate.WaitN(ctx, int(n)); err != nil {
			return err
		}
		if err := s.j.ReadAt(jd, buf, off); err != nil {
			return fmt.Errorf("read disk %d: %w", jd, err)
		}
		// Only now: a write that raced the read is in the index by now.
		changed, err = v.cs.ChangedSince(at, jd, off, n)
		if err == nil {
			break
		}
		if !errors.Is(err, journal.ErrTooOld) {
			return err
		}
		if try+1 == verifyTries {
			v.skip(wd, off, n, SkipTooOld)
			return nil
		}
	}
	for b := int64(0); b < n; b += bs {
		e := min(b+bs, n)
		if anyChanged(changed, b, e) {
			v.res.ChangedBlocks += blocksIn(e - b)
			continue
		}
		i := b / bs * wire.HashSize
		if same(buf[b:e], sums[i:i+wire.HashSize]) {
			v.res.CheckedBytes += e - b
			continue
		}
		if err := v.refine(ctx, wd, off+b, buf[b:e], at); err != nil {
			return err
		}
	}
	return nil
}

// refine compares a block that differs in 4 KiB blocks: p holds the
// primary's data at off, read before the replica's image at at was found
// to differ. It is read again after the replica's fine sums, and the
// journal asked after that read, in the order compare uses: what the
// first read saw may since have changed in the image without a cycle after
// at (a trim applied late), and the second read sees it.
func (v *verifier) refine(ctx context.Context, wd int, off int64, p []byte, at uint64) error {
	s := v.s
	n := int64(len(p))
	fine, at2, err := s.c.sumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: off, Length: n, BlockSize: journal.BlockSize})
	if err != nil {
		return err
	}
	if at2 == 0 {
		v.skip(wd, off, n, SkipNotAtCycle)
		return nil
	}
	jd := s.cfg.DiskIndex[wd]
	if err := s.j.ReadAt(jd, p, off); err != nil {
		return fmt.Errorf("read disk %d: %w", jd, err)
	}
	// The replica may have applied more cycles meanwhile: what changed
	// after the older of the two cycles is skipped.
	changed, err := v.cs.ChangedSince(min(at, at2), jd, off, n)
	if errors.Is(err, journal.ErrTooOld) {
		v.skip(wd, off, n, SkipTooOld)
		return nil
	}
	if err != nil {
		return err
	}
	for b := int64(0); b < n; b += journal.BlockSize {
		e := min(b+journal.BlockSize, n)
		if changed[b/journal.BlockSize] {
			v.res.ChangedBlocks++
			continue
		}
		v.res.CheckedBytes += e - b
		i := b / journal.BlockSize * wire.HashSize
		if !same(p[b:e], fine[i:i+wire.HashSize]) {
			bad, err := v.primaryDamaged(ctx, wd, off+b, p[b:e], min(at, at2))
			if err != nil {
				return err
			}
			if bad {
				v.damaged(wd, off+b, off+e)
			} else {
				v.mismatch(wd, off+b, off+e)
			}
		}
	}
	return nil
}

// anyChanged says whether a journal block of [b, e) (offsets in the range
// changed covers, in journal.BlockSize blocks) changed.
func anyChanged(changed []bool, b, e int64) bool {
	for k := b / journal.BlockSize; k < (e+journal.BlockSize-1)/journal.BlockSize; k++ {
		if changed[k] {
			return true
		}
	}
	return false
}

func blocksIn(n int64) int64 { return (n + journal.BlockSize - 1) / journal.BlockSize }

func (v *verifier) skip(wd int, off, n int64, why string) {
	v.res.SkippedBytes += n
	name := v.s.cfg.Disks[wd].Name
	if k := len(v.res.Skipped) - 1; k >= 0 {
		if last := &v.res.Skipped[k]; last.Disk == name && last.Why == why && last.To == off {
			last.To = off + n
			return
		}
	}
	v.res.Skipped = append(v.res.Skipped, VerifyRange{Disk: name, From: off, To: off + n, Why: why})
}

// primaryDamaged judges a 4 KiB block blk at off of wire disk wd that
// differs from the replica's image at cycle at: true when the primary's
// image no longer hashes to what its tree recorded and the replica's tree
// holds the recorded hash. The tree is waited for up to cycle at first, so
// that it covers every write the block saw (it did not change after at).
func (v *verifier) primaryDamaged(ctx context.Context, wd int, off int64, blk []byte, at uint64) (bool, error) {
	s := v.s
	t := s.j.BlockTree()
	if t == nil {
		return false, nil
	}
	if err := s.j.WaitWrittenBack(ctx, at); err != nil {
		return false, err
	}
	jd := s.cfg.DiskIndex[wd]
	hs, err := t.Blocks(jd, off, int64(len(blk)))
	if err != nil || len(hs) != 1 || hs[0] == blocktree.Unknown || blocktree.HashBlock(blk) == hs[0] {
		return false, nil
	}
	rep, err := s.c.treeSumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: off, Length: journal.BlockSize, BlockSize: journal.BlockSize, Kind: wire.SumsBlocks})
	if err != nil || len(rep) != 1 {
		// A replica without a tree cannot vouch for its copy: the
		// primary stays the truth, as before the trees.
		return false, nil
	}
	return rep[0] == uint64(hs[0]), nil
}

// damaged records a block found damaged on the primary.
func (v *verifier) damaged(wd int, from, to int64) {
	v.res.PrimaryDamagedBlocks += blocksIn(to - from)
	v.note(&v.damage, wd, from, to)
}

// damagedRanges lists the first ranges of ms for a log line.
func damagedRanges(ms []VerifyMismatch) string {
	var rs []string
	for _, m := range ms {
		for i, x := range m.Ranges {
			if i == maxReasonRanges {
				break
			}
			rs = append(rs, fmt.Sprintf("%s [%d,%d)", m.Disk, x.From, x.To))
		}
	}
	return strings.Join(rs, " ")
}

// mismatch records a block that differs, the primary the truth.
func (v *verifier) mismatch(wd int, from, to int64) { v.note(&v.diff, wd, from, to) }

// note adds [from, to) of wire disk wd to set, merged with the range
// before it, and counts it in MismatchBlocks; past maxResultRanges over
// the whole result, ranges are only counted.
func (v *verifier) note(set *diskRanges, wd int, from, to int64) {
	m := set.byDisk[wd]
	if m == nil {
		if set.byDisk == nil {
			set.byDisk = map[int]*VerifyMismatch{}
		}
		m = &VerifyMismatch{Disk: v.s.cfg.Disks[wd].Name}
		set.byDisk[wd] = m
		set.order = append(set.order, wd)
	}
	m.Blocks += blocksIn(to - from)
	v.res.MismatchBlocks += blocksIn(to - from)
	switch k := len(m.Ranges) - 1; {
	case m.MoreRanges > 0 && m.moreTo == from:
		m.moreTo = to
	case m.MoreRanges == 0 && k >= 0 && m.Ranges[k].To == from:
		m.Ranges[k].To = to
	case v.ranges >= maxResultRanges:
		m.MoreRanges++
		m.moreTo = to
	default:
		v.ranges++
		m.Ranges = append(m.Ranges, VerifyRange{Disk: m.Disk, From: from, To: to})
	}
}

func (v *verifier) finish() VerifyResult {
	r := v.res
	r.Mismatches, r.PrimaryDamaged = v.diff.list(), v.damage.list()
	var whys []string
	for _, x := range r.Skipped {
		if !slices.Contains(whys, x.Why) {
			whys = append(whys, x.Why)
		}
	}
	r.SkipReason = strings.Join(whys, "; ")
	if r.CheckedBytes == 0 && r.TotalBytes > 0 {
		r.NothingCompared = true
		r.NotCompared = r.SkipReason
		if r.ChangedBlocks > 0 {
			if r.NotCompared != "" {
				r.NotCompared += "; "
			}
			r.NotCompared += fmt.Sprintf("%d blocks written on the primary after the replica's cycle", r.ChangedBlocks)
		}
	}
	r.Finished = v.s.now()
	r.DurationSeconds = r.Finished.Sub(r.Started).Seconds()
	if r.DurationSeconds > 0 {
		r.Rate = float64(r.TotalBytes) / r.DurationSeconds
	}
	return r
}

// maxReasonRanges bounds the ranges a resync reason lists per disk.
const maxReasonRanges = 8

// reason is the resync reason for the mismatches: "verify: disk d differs
// from the replica in N blocks: [a,b) [c,d)".
func (r *VerifyResult) reason() string {
	var parts []string
	for _, m := range r.Mismatches {
		var rs []string
		for i, x := range m.Ranges {
			if i == maxReasonRanges {
				break
			}
			rs = append(rs, fmt.Sprintf("[%d,%d)", x.From, x.To))
		}
		if more := int64(len(m.Ranges)-len(rs)) + m.MoreRanges; more > 0 {
			rs = append(rs, fmt.Sprintf("and %d more", more))
		}
		parts = append(parts, fmt.Sprintf("disk %s differs from the replica in %d blocks: %s", m.Disk, m.Blocks, strings.Join(rs, " ")))
	}
	return "verify: " + strings.Join(parts, "; ")
}

// sumsAt asks the replica for the hashes of its blocks of a range and the
// applied cycle its images were at (0: not at one, or a replica that does
// not say).
func (c *client) sumsAt(ctx context.Context, q wire.SumsRequest) ([]byte, uint64, error) {
	var a rawAnswer
	body, n, h := c.jsonBody(q)
	if err := c.do(ctx, "sums", http.MethodPost, "/sums", body, n, h, commitTimeout, &a); err != nil {
		return nil, 0, err
	}
	if want := (q.Length + q.BlockSize - 1) / q.BlockSize * wire.HashSize; int64(len(a.body)) != want {
		return nil, 0, fmt.Errorf("%w: %d bytes of sums for %d blocks", ErrProtocol, len(a.body), want/wire.HashSize)
	}
	var at uint64
	if v := a.header.Get(wire.SumsCycleHeader); v != "" {
		var err error
		if at, err = strconv.ParseUint(v, 10, 64); err != nil {
			return nil, 0, fmt.Errorf("%w: %s %q", ErrProtocol, wire.SumsCycleHeader, v)
		}
	}
	return a.body, at, nil
}
