package ship

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/vdrepl/vdrepl/internal/blocktree"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// A resync compares block trees top-down when both sides keep one
// (internal/blocktree): per piece, the replica's leaf digests (8 bytes per
// 64 KiB) against ours; for the leaves that differ, the replica's block
// hashes against ours; then only the blocks that differ are read from the
// primary's images and sent. Neither side reads its disk to compare, so a
// resync after 1% of the blocks changed reads about 1% of the disk here
// instead of all of it on both sides.
//
// Our tree must describe the images at the sync's base or later: the
// shipper waits for the write-back to pass the base first
// (Journal.WaitWrittenBack). A block the guest writes after the tree was
// asked lies in a cycle after the base, which follows the resync onto the
// replica whatever the comparison said. A hash of 0 (Unknown, on either
// side) counts as a difference: the block is sent.
//
// When a tree cannot answer, the piece is compared with BLAKE3 sums as
// before (remoteSums, fillResync): our tree missing, dirty or incomplete
// when the sync began (the whole sync), changed under the sync (the
// piece), the replica's tree being built (code "unavailable": the piece),
// or a replica that does not know tree sums (no wire.SumsKindHeader in its
// answer: the rest of the sync). Each path and why is logged once per
// sync.

// Bounds of tree sums requests. One answer holds at most maxTreeUnits
// hashes (512 KiB, as a BLAKE3 answer of maxSumBlocks). A leaves request
// spans at most maxSumLength bytes as well: a replica that does not know
// kinds reads that range to answer it with BLAKE3 sums of leaf-sized
// blocks, and must accept its length. Differing leaves up to maxLeafGap
// apart are asked in one blocks request: the hashes of the leaves between
// cost 128 bytes each, a round trip costs far more.
const (
	maxTreeUnits = 65536
	maxLeafGap   = 16
)

// errNoTreeSums: the replica answered a tree sums request without naming
// the kind it holds (a vdrepl that predates block trees).
var errNoTreeSums = errors.New("ship: the replica does not answer block-tree sums")

// treeSumsAt asks the replica for leaf digests or block hashes (q.Kind)
// of a range: 0 is unknown.
func (c *client) treeSumsAt(ctx context.Context, q wire.SumsRequest) ([]uint64, error) {
	var a rawAnswer
	body, n, h := c.jsonBody(q)
	if err := c.do(ctx, "sums "+q.Kind, http.MethodPost, "/sums", body, n, h, smallTimeout, &a); err != nil {
		return nil, err
	}
	if k := a.header.Get(wire.SumsKindHeader); k != q.Kind {
		return nil, fmt.Errorf("%w: asked for %s, the answer holds %q", errNoTreeSums, q.Kind, k)
	}
	unit := int64(blocktree.BlockSize)
	if q.Kind == wire.SumsLeaves {
		unit = blocktree.LeafSize
	}
	want := (q.Length + unit - 1) / unit
	if int64(len(a.body)) != want*8 {
		return nil, fmt.Errorf("%w: %d bytes of %s sums for %d", ErrProtocol, len(a.body), q.Kind, want)
	}
	out := make([]uint64, want)
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(a.body[i*8:])
	}
	return out, nil
}

// treeResync is how the sync under way compares its pieces. It lives
// while the shipper runs (a restart decides anew), under opMu; repairs
// has its own lock, as spools are filled on their own goroutines.
type treeResync struct {
	gen  uint64
	tree *blocktree.Tree // nil: every piece by BLAKE3 sums
	why  string          // why tree is nil
	// logged holds the paths (and whys) logged for this sync.
	logged map[string]bool

	mu      sync.Mutex
	repairs repairLog
}

// repairLog gathers the ranges a resync sent, for the log line of a
// resync that repairs a divergence.
type repairLog struct {
	ranges int64
	bytes  int64
	first  []string // "disk [from,to)", the first maxRepairRanges
	last   struct {
		wd       int
		from, to int64
	}
}

// maxRepairRanges bounds the ranges the repair log line names.
const maxRepairRanges = 8

// note records that [from, to) of wire disk wd was sent.
func (r *treeResync) note(s *Shipper, wd int, from, to int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := &r.repairs
	l.bytes += to - from
	if l.ranges > 0 && l.last.wd == wd && l.last.to == from {
		l.last.to = to
		if int64(len(l.first)) == l.ranges {
			l.first[len(l.first)-1] = fmt.Sprintf("%s [%d,%d)", s.cfg.Disks[wd].Name, l.last.from, to)
		}
		return
	}
	l.ranges++
	l.last.wd, l.last.from, l.last.to = wd, from, to
	if len(l.first) < maxRepairRanges {
		l.first = append(l.first, fmt.Sprintf("%s [%d,%d)", s.cfg.Disks[wd].Name, from, to))
	}
}

// resyncMode returns how the sync rec compares, deciding at its first
// piece since the shipper started: by tree when the journal keeps one that
// is clean and complete on every replicated disk, after waiting for the
// write-back to pass the base.
func (s *Shipper) resyncMode(ctx context.Context, rec *syncRecord) (*treeResync, error) {
	if m := s.tsync; m != nil && m.gen == rec.Gen {
		return m, nil
	}
	m := &treeResync{gen: rec.Gen, logged: map[string]bool{}}
	t := s.j.BlockTree()
	switch {
	case rec.FullCompare:
		m.why = "verify found images that differ; their trees may not know it"
	case t == nil:
		m.why = "the journal keeps no block tree"
	default:
		states, dirty := t.State()
		switch {
		case dirty:
			m.why = "the primary's block tree is dirty (it is being rebuilt)"
		default:
			for wd, jd := range s.cfg.DiskIndex {
				if jd >= len(states) {
					m.why = fmt.Sprintf("the primary's block tree has no disk %s", s.cfg.Disks[wd].Name)
					break
				}
				if d := states[jd]; !d.Complete() {
					m.why = fmt.Sprintf("the primary's block tree of disk %s is incomplete (%d of %d bytes hashed, %d leaves unknown)",
						s.cfg.Disks[wd].Name, min(d.Built, d.Size), d.Size, d.Unknown)
					break
				}
			}
		}
		if m.why == "" {
			if err := s.j.WaitWrittenBack(ctx, rec.Base); err != nil {
				return nil, fmt.Errorf("ship: wait for the write-back of cycle %d: %w", rec.Base, err)
			}
			m.tree = t
		}
	}
	s.tsync = m
	return m, nil
}

// logPath says once per sync and reason which way pieces are compared.
func (s *Shipper) logPath(m *treeResync, rec *syncRecord, tree bool, why string) {
	key := fmt.Sprint(tree, why)
	if m.logged[key] {
		return
	}
	m.logged[key] = true
	if tree {
		s.log.Info("resync compares block trees: reads and sends only the blocks that differ", "gen", rec.Gen, "base", rec.Base)
		return
	}
	s.log.Info("resync compares BLAKE3 sums: both sides read the whole range", "gen", rec.Gen, "base", rec.Base, "why", why)
}

// treePiece plans piece [off, off+n) of wire disk wd by tree: the runs
// of blocks to send, [from, to) each. ok is false when a tree cannot
// answer for the piece; why says so.
func (s *Shipper) treePiece(ctx context.Context, m *treeResync, wd int, off, n int64) (runs [][2]int64, why string, err error) {
	if m.tree == nil {
		return nil, m.why, nil
	}
	jd := s.cfg.DiskIndex[wd]
	states, dirty := m.tree.State()
	if dirty || jd >= len(states) || states[jd].Built < off+n {
		return nil, "the primary's block tree was reset or marked dirty during the resync", nil
	}
	refused := func(err error) string {
		switch {
		case errors.Is(err, errNoTreeSums):
			// It will not learn during this sync: stop asking.
			m.tree, m.why = nil, "the replica does not answer block-tree sums (an older vdrepl)"
			return m.why
		case isCode(err, wire.CodeUnavailable):
			return "the replica's block tree cannot answer: " + err.Error()
		}
		return ""
	}
	size := s.sizes[wd]
	end := off + n
	// Leaves that differ, as indexes.
	var diff []int64
	lo, hi := off/blocktree.LeafSize*blocktree.LeafSize, min((end+blocktree.LeafSize-1)/blocktree.LeafSize*blocktree.LeafSize, size)
	for pos := lo; pos < hi; {
		k := min(hi-pos, maxTreeUnits*blocktree.LeafSize, maxSumLength)
		theirs, err := s.c.treeSumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: pos, Length: k, BlockSize: blocktree.LeafSize, Kind: wire.SumsLeaves})
		if why := refused(err); why != "" {
			return nil, why, nil
		}
		if err != nil {
			return nil, "", err
		}
		first := pos / blocktree.LeafSize
		ours, err := m.tree.Leaves(jd, first, int64(len(theirs)))
		if err != nil {
			return nil, "", fmt.Errorf("ship: leaves of disk %d: %w", jd, err)
		}
		for i, h := range theirs {
			if h == 0 || ours[i] == 0 || h != ours[i] {
				diff = append(diff, first+int64(i))
			}
		}
		pos += k
	}
	// Block hashes of spans of differing leaves.
	for i := 0; i < len(diff); {
		j := i + 1
		for j < len(diff) && diff[j]-diff[j-1] <= maxLeafGap && (diff[j]+1-diff[i])*blocktree.LeafBlocks <= maxTreeUnits {
			j++
		}
		from := max(diff[i]*blocktree.LeafSize, off)
		to := min((diff[j-1]+1)*blocktree.LeafSize, end)
		i = j
		if from >= to {
			continue
		}
		theirs, err := s.c.treeSumsAt(ctx, wire.SumsRequest{Disk: wd, Offset: from, Length: to - from, BlockSize: blocktree.BlockSize, Kind: wire.SumsBlocks})
		if why := refused(err); why != "" {
			return nil, why, nil
		}
		if err != nil {
			return nil, "", err
		}
		ours, err := m.tree.Blocks(jd, from, to-from)
		if err != nil {
			return nil, "", fmt.Errorf("ship: blocks of disk %d: %w", jd, err)
		}
		for b, h := range theirs {
			if h != 0 && blocktree.Hash(h) == ours[b] {
				continue
			}
			bf := from + int64(b)*blocktree.BlockSize
			bt := min(bf+blocktree.BlockSize, to)
			if k := len(runs) - 1; k >= 0 && runs[k][1] == bf {
				runs[k][1] = bt
			} else {
				runs = append(runs, [2]int64{bf, bt})
			}
		}
	}
	return runs, "", nil
}

// fillRuns writes the block runs of wire disk wd as data frames, and zero
// ranges for zero blocks, reading only them.
func (s *Shipper) fillRuns(ctx context.Context, w *wire.Writer, wd int, runs [][2]int64) error {
	for _, r := range runs {
		if err := s.fillResync(ctx, w, wd, r[0], r[1]-r[0], journal.BlockSize, nil, nil); err != nil {
			return err
		}
	}
	return nil
}

// logRepairs says which ranges a resync that repairs a divergence sent:
// the ranges that were wrong on the replica.
func (s *Shipper) logRepairs(rec *syncRecord) {
	d := rec.Divergence
	m := s.tsync
	if d == nil || m == nil || m.gen != rec.Gen {
		return
	}
	m.mu.Lock()
	l := m.repairs
	m.mu.Unlock()
	s.log.Warn("resync repaired the replica's ranges that differed from the primary",
		"cycle", d.Cycle, "disks", strings.Join(d.Disks, ","), "ranges", l.ranges, "bytes", l.bytes,
		"first", strings.Join(l.first, " "))
}
