package apply

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/vdrepl/vdrepl/internal/blocktree"
)

// PointCheck is what VerifyPoint found: a recovery point's disks read
// back through its view and hashed into roots, against the roots the tree
// had when the point was taken.
type PointCheck struct {
	VM              string           `json:"vm"`
	Point           string           `json:"point"`
	CheckedBytes    int64            `json:"checked_bytes"`
	DurationSeconds float64          `json:"duration_seconds"`
	Disks           []PointDiskCheck `json:"disks"`
	// Match: every disk's root equals the recorded one.
	Match bool `json:"match"`
}

// PointDiskCheck is one disk of a PointCheck.
type PointDiskCheck struct {
	Disk     string `json:"disk"`
	Root     string `json:"root"`
	Recorded string `json:"recorded"`
	Match    bool   `json:"match"`
}

// VerifyPoint reads every disk of recovery point id of replica VM name as
// a failover to it would (the images, with the undo data of every newer
// point), hashes it into block-tree roots and compares them with the
// roots recorded when the point was taken. Damage at rest in the undo
// data fails the reads (its records carry checksums) and is returned as
// the error; damage in an image block the point shares with the latest
// state, or undo data that is whole but wrong, shows as a root that does
// not match. Apply goes on meanwhile: the view does not change.
func (s *Server) VerifyPoint(ctx context.Context, name, id string) (PointCheck, error) {
	if id == "" {
		return PointCheck{}, fmt.Errorf("%w: name the recovery point to verify (see `vdrepl replication points %s`)", ErrInvalid, name)
	}
	v, err := s.lookup(name)
	if err != nil {
		return PointCheck{}, err
	}
	recorded := v.snapshot().PointRoots[id]
	view, err := s.View(name, id)
	if err != nil {
		return PointCheck{}, err
	}
	defer view.Close()
	if recorded == nil {
		return PointCheck{}, fmt.Errorf("%w: recovery point %s of %s has no recorded block-tree roots: it was taken while the replica's tree was being built, or by a vdrepl that kept none", ErrUnavailable, id, name)
	}
	if len(recorded) != view.Disks() {
		return PointCheck{}, fmt.Errorf("%w: recovery point %s of %s has roots of %d disks, the VM has %d", ErrInvalid, id, name, len(recorded), view.Disks())
	}
	start := time.Now()
	out := PointCheck{VM: name, Point: id, Match: true}
	buf := make([]byte, 4<<20)
	for i := range view.Disks() {
		d := view.Disk(i)
		root, err := blocktree.RootOf(ctxReader{ctx, d}, d.Size(), buf)
		if err != nil {
			return out, fmt.Errorf("apply: verify point %s of %s, disk %s: %w", id, name, v.disks[i].Name, err)
		}
		c := PointDiskCheck{Disk: v.disks[i].Name, Root: root.String(), Recorded: recorded[i]}
		c.Match = c.Root == c.Recorded
		out.Match = out.Match && c.Match
		out.Disks = append(out.Disks, c)
		out.CheckedBytes += d.Size()
	}
	out.DurationSeconds = time.Since(start).Seconds()
	if !out.Match {
		s.log.Error("a recovery point does not match the roots recorded when it was taken", "vm", name, "point", id)
	}
	return out, nil
}

// ctxReader stops reads once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReader) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}
