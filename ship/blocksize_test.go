package ship

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
	"lukechampine.com/blake3"
)

// BenchmarkResyncBlockSize measures what the resync block size costs: the
// BLAKE3-256 throughput of hashing a disk in blocks of that size (MB/s; both
// ends hash every block), and for a 1 GiB disk with 1% of its 4 KiB blocks
// changed at random, the MiB of hashes and of changed blocks on the wire
// (reported as hash-MiB, data-MiB and total-MiB). DefaultBlockSize quotes it.
//
//	go test -run - -bench ResyncBlockSize ./ship
func BenchmarkResyncBlockSize(b *testing.B) {
	const disk = 1 << 30
	buf := make([]byte, 64<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	// The same 1% of 4 KiB blocks for every block size.
	changed := map[int64]bool{}
	for len(changed) < disk/4096/100 {
		changed[rng.Int64N(disk/4096)] = true
	}
	for _, bs := range []int{4 << 10, 16 << 10, 64 << 10, 256 << 10} {
		b.Run(fmt.Sprintf("%dKiB", bs>>10), func(b *testing.B) {
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				for off := 0; off < len(buf); off += bs {
					blake3.Sum256(buf[off : off+bs])
				}
			}
			dirty := map[int64]bool{}
			for blk := range changed {
				dirty[blk*4096/int64(bs)] = true
			}
			hashes := float64(disk/bs*wire.HashSize) / (1 << 20)
			data := float64(int64(len(dirty))*int64(bs)) / (1 << 20)
			b.ReportMetric(hashes, "hash-MiB")
			b.ReportMetric(data, "data-MiB")
			b.ReportMetric(hashes+data, "total-MiB")
		})
	}
}
