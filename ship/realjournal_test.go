package ship

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/journal"
)

// The real journal through FromJournal: cycles with coalesced runs,
// unaligned writes, trims and zeroes.
func TestRealJournal(t *testing.T) {
	e := newEnv(t, 4096) // only for the PKI and the fake replica
	sizes := []int64{3 << 20, 1 << 20}
	var specs []journal.DiskSpec
	var disks []wire.Disk
	for i, n := range sizes {
		p := filepath.Join(e.dir, "img"+string(rune('0'+i)))
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, n); err != nil {
			t.Fatal(err)
		}
		name := "disk" + string(rune('0'+i))
		specs = append(specs, journal.DiskSpec{Name: name, Path: p, Size: n})
		disks = append(disks, wire.Disk{Name: name, Size: n})
	}
	j, err := journal.Open(journal.Config{Dir: filepath.Join(e.dir, "journal"), Disks: specs, Retain: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	j.Disk(0).WriteAt(random(300<<10), 5000)
	j.Disk(1).WriteAt(random(4096), 0)

	cfg := e.cfg
	cfg.Journal, cfg.Disks = FromJournal(j), disks
	var mu sync.Mutex
	var last [2]int64
	cfg.Progress = func(done, total int64) {
		mu.Lock()
		last = [2]int64{done, total}
		mu.Unlock()
	}
	r := e.start(cfg)
	waitReplicating(t, r.s)
	mu.Lock()
	progress := last
	mu.Unlock()
	if progress[0] != sizes[0]+sizes[1] || progress[1] != progress[0] {
		t.Fatalf("progress ended at %v, want both %d", progress, sizes[0]+sizes[1])
	}

	for i := range 4 {
		d0 := j.Disk(0)
		d0.WriteAt(random(70<<10), int64(i)*100_000)
		d0.WriteAt(random(1000), sizes[0]-1000) // unaligned, up to the end
		d0.Trim(2<<20, 64<<10)
		j.Disk(1).Zero(int64(i)*8192, 4096, i%2 == 0)
		j.Disk(1).WriteAt(random(8192), 512<<10)
		if _, err := r.s.Sync(syncCtx(t), false); err != nil {
			t.Fatal(err)
		}
		for d, n := range sizes {
			want := make([]byte, n)
			if _, err := j.Disk(d).ReadAt(want, 0); err != nil {
				t.Fatal(err)
			}
			if got := e.rep.image("vm1", d); string(got) != string(want) {
				t.Fatalf("round %d: disk %d differs at %d", i, d, firstDiff(got, want))
			}
		}
	}
	if st := j.Stats(); st.ClosedCycles != 0 || st.ResyncBase != 0 {
		t.Fatalf("journal after shipping: %+v", st)
	}
}
