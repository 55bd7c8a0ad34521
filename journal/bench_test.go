package journal

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// BenchmarkWrite measures the journal write path alone (no front end) with
// 16 concurrent writers, like an NBD client at queue depth 16; the
// "-notree" runs do the same without the block tree (Config.NoBlockTree),
// so that the difference is what the tree costs.
func BenchmarkWrite(b *testing.B) {
	for _, run := range []struct {
		bs     int
		noTree bool
	}{{4 << 10, false}, {1 << 20, false}, {4 << 10, true}, {1 << 20, true}} {
		bs := run.bs
		name := map[int]string{4 << 10: "4k-rand-qd16", 1 << 20: "1M-seq-qd16"}[bs]
		if run.noTree {
			name += "-notree"
		}
		b.Run(name, func(b *testing.B) {
			const size = 1 << 30
			dir := b.TempDir()
			cfg := Config{FS: vfs.Default, Dir: dir + "/journal", Cap: 4 << 30, NoBlockTree: run.noTree}
			cfg.Disks = []DiskSpec{{Name: "d", Path: dir + "/d.img", Size: size}}
			f, _ := vfs.Default.OpenFile(cfg.Disks[0].Path, 0102, 0o644)
			f.Truncate(size)
			f.Close()
			cfg.SyncInterval = time.Second
			j, err := Open(cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer j.Close()
			// The tree (in memory here) is built from the image at open;
			// the measurement starts once it is.
			for !run.noTree && !j.Stats().TreeBuilt {
				time.Sleep(time.Millisecond)
			}
			var next atomic.Int64
			b.SetBytes(int64(bs))
			b.ResetTimer()
			var wg sync.WaitGroup
			per := b.N/16 + 1
			for w := 0; w < 16; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 1))
					p := make([]byte, bs)
					for i := 0; i < per; i++ {
						var off int64
						if bs == 4<<10 {
							off = r.Int64N(size/int64(bs)) * int64(bs)
						} else {
							off = (next.Add(1) * int64(bs)) % size
						}
						if _, err := j.Disk(0).WriteAt(p, off); err != nil {
							b.Error(err)
							return
						}
					}
				}(w)
			}
			wg.Wait()
		})
	}
}

// BenchmarkWriteBack measures the write-back alone: rounds of writes are
// appended and synced while it waits, then drained (the timed part). Each
// round stays under the budget of kept append buffers.
func BenchmarkWriteBack(b *testing.B) {
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(map[int]string{4 << 10: "4k-rand", 1 << 20: "1M-seq"}[bs], func(b *testing.B) {
			const size = 1 << 30
			dir := b.TempDir()
			cfg := Config{FS: vfs.Default, Dir: dir + "/journal", Cap: 4 << 30, IndexDir: dir + "/index"}
			cfg.Disks = []DiskSpec{{Name: "d", Path: dir + "/d.img", Size: size}}
			f, _ := vfs.Default.OpenFile(cfg.Disks[0].Path, 0102, 0o644)
			f.Truncate(size)
			f.Close()
			j, err := Open(cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer j.Close()
			for !j.Stats().TreeBuilt {
				time.Sleep(time.Millisecond)
			}
			r := rand.New(rand.NewPCG(1, 1))
			p := make([]byte, bs)
			perRound := (48 << 20) / bs
			var pos int64
			b.SetBytes(int64(bs))
			b.ResetTimer()
			for done := 0; done < b.N; {
				b.StopTimer()
				j.wb.Lock()
				n := min(perRound, b.N-done)
				for i := 0; i < n; i++ {
					off := r.Int64N(size/int64(bs)) * int64(bs)
					if bs != 4<<10 {
						off, pos = pos, (pos+int64(bs))%size
					}
					if _, err := j.Disk(0).WriteAt(p, off); err != nil {
						b.Fatal(err)
					}
				}
				if err := j.Flush(); err != nil {
					b.Fatal(err)
				}
				j.wb.Unlock()
				b.StartTimer()
				if err := j.writeBack(); err != nil {
					b.Fatal(err)
				}
				done += n
			}
		})
	}
}
