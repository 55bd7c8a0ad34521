package apply

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// BenchmarkApplyCycle applies cycles of 64 MiB in 1 MiB data frames to a
// 256 MiB image on the real filesystem, with the block tree kept and
// without one: the cost of keeping it.
func BenchmarkApplyCycle(b *testing.B) {
	for _, tree := range []bool{true, false} {
		b.Run(fmt.Sprintf("tree=%v", tree), func(b *testing.B) {
			disks := []wire.Disk{{Name: "d0", Size: 256 << 20}}
			dir := b.TempDir()
			s, err := New(Config{StateDir: filepath.Join(dir, "state")})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			entry := AllowEntry{Primary: "*", Storage: filepath.Join(dir, "storage")}
			if err := s.Allow(entry); err != nil {
				b.Fatal(err)
			}
			if _, err := s.enable("vm1", "a.example.com", nil, entry, wire.Enable{Disks: disks}); err != nil {
				b.Fatal(err)
			}
			v := waitBuilt(b, s, "vm1")
			if !tree {
				v.apply.Lock()
				v.closeTree()
				v.apply.Unlock()
			}
			data := randBytes(1, 1<<20)
			b.SetBytes(64 << 20)
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				c := uint64(i + 1)
				var ops []op
				for f := range 64 {
					off := int64((i*64+f)%256) << 20
					ops = append(ops, op{t: wire.FrameData, disk: 0, off: off, data: data})
				}
				h := wire.Header{VM: "vm1", Kind: wire.KindCycle, Disks: disks, Cycle: c, Prev: c - 1, Sealed: sealed}
				stage(b, v, wire.CycleUploadID(c), buildStream(b, h, ops))
				b.StartTimer()
				if _, err := commitID(v, wire.CycleUploadID(c)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
