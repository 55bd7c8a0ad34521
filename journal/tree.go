package journal

import (
	"context"

	"github.com/vdrepl/vdrepl/internal/blocktree"
)

// BlockTree returns the block-hash tree of the images (internal/blocktree),
// kept by the write-back; nil when the journal keeps none.
func (j *Journal) BlockTree() *blocktree.Tree { return nil }

// WaitWrittenBack returns once every record of cycles up to c is in the
// images and in the block tree, so that the tree describes the images at
// c's barrier or later.
func (j *Journal) WaitWrittenBack(ctx context.Context, c uint64) error { return ctx.Err() }

// RootsAt returns the block tree's roots of the images at cycle c's
// barrier, one per disk, waiting for the write-back to pass it. Nil (and
// no error) when the tree did not know them: it was being built, or c is
// older than the roots the journal remembers.
func (j *Journal) RootsAt(ctx context.Context, c uint64) ([]blocktree.Root, error) {
	return nil, ctx.Err()
}
