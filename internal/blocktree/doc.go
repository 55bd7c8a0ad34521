// Package blocktree keeps the block-hash tree of a VM's disks: a 64-bit
// hash of every 4 KiB block, grouped in leaves of 64 KiB, with a root per
// disk that is kept up to date as blocks change, so comparing two disks
// costs a lookup, not a read of either.
//
// The primary keeps one for its images (the journal updates it as the
// write-back puts blocks in place), the replica one for its replica images
// (apply updates it with every stream it applies). Resync compares the two
// top-down (roots, then leaves, then blocks) and reads only the blocks that
// differ; after every cycle the replica compares its roots with the ones
// the primary had at that cycle's barrier.
//
// # Hashes
//
// A block's hash is XXH64 (seed 0) of its 4096 bytes; the last block of a
// disk whose size is not a multiple of 4 KiB is hashed as if zero-padded.
// A hash of 0 is reserved for Unknown (the tree does not know the block's
// content: a range recovery could not prove, a write that covered part of
// a block); a block whose XXH64 is 0 is given 1. A leaf's digest is XXH64
// of its 16 block hashes (little endian), 0 remapped to 1, and 0 when any
// of them is Unknown. A disk's root is the sum, modulo 2^64 in each of two
// lanes, of mixA(i, d) and mixB(i, d) over every leaf i whose digest d is
// not the digest of a zero leaf:
//
//	mixA(i, d) = XXH64(i as 8 bytes LE ‖ d as 8 bytes LE)
//	mixB(i, d) = XXH64(d as 8 bytes LE ‖ i as 8 bytes LE ‖ 0x5a)
//
// A sum can be updated for one leaf without visiting the others, which is
// what keeps the tree incremental: no inner node is stored. A root is only
// meaningful when the whole disk was hashed (Built == Size) and no leaf is
// Unknown; Root says so. The root is a checksum for finding damage and
// divergence, not a cryptographic commitment: the data it covers came over
// mutual TLS and is never chosen by an adversary who could aim at a sum.
//
// # Storage
//
// The tree lives in a BadgerDB given by the caller, under a key prefix of
// the caller's choice (the journal shares its own database). Values are
// little endian.
//
//	prefix 'L' disk(2, BE) leaf(8, BE) -> 16 block hashes, 8 bytes each
//	prefix 'M'                         -> meta, JSON: version, and per disk
//	                                      size, built, unknown leaves, root;
//	                                      dirty
//
// A leaf without a key is a leaf of zero blocks: a new sparse image costs
// nothing, and a leaf that becomes zero again is deleted. Every Commit
// writes its leaves and the meta in one transaction, so the root always
// agrees with the stored leaves. A Commit too large for one transaction is
// split; the meta is then marked dirty in the first and cleaned in the last.
//
// # Crash consistency
//
// The tree is an index of the images, never their source of truth. The
// caller updates it only after the image writes it describes returned, and
// makes it durable (Sync) before it forgets how to redo them (the journal
// before its checkpoint; apply before it records a stream as applied). A
// caller that cannot keep to that marks the tree dirty (Begin) before the
// images change: a tree found dirty at open describes images that may have
// changed under it, and Open resets it, to be rebuilt from the images by
// BuildStep. A reset or a partly built tree never claims a hash: it answers
// Unknown where it was not built.
//
// # Concurrency
//
// A Tree is safe for concurrent use. Commits are serialised by its mutex;
// queries read a consistent BadgerDB view. The caller keeps the images
// still during a BuildStep of the range it hashes.
package blocktree
