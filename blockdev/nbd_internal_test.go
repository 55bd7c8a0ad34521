package blockdev

import (
	"io"
	"net"
	"testing"
	"time"
)

// gatedMem holds reads until gate is closed.
type gatedMem struct {
	memDisk
	gate    chan struct{}
	started chan struct{}
}

func (g *gatedMem) ReadAt(p []byte, off int64) (int, error) {
	g.started <- struct{}{}
	<-g.gate
	return g.memDisk.ReadAt(p, off)
}

// TestNBDInFlightBlocksReader: with MaxInFlight requests held in the disk,
// the reader stops reading (back-pressure) and no further request starts.
func TestNBDInFlightBlocksReader(t *testing.T) {
	const limit, total = 4, 24
	disk := &gatedMem{memDisk: memDisk{data: make([]byte, 1<<20)}, gate: make(chan struct{}), started: make(chan struct{}, total)}
	s := NewNBDServer(NBDConfig{Exports: mapExports{"d": {Name: "d", Disk: disk}}, MaxInFlight: limit})
	srv, cli := net.Pipe()
	cli.SetDeadline(time.Now().Add(20 * time.Second))
	c := s.newConn(srv, nil)
	go c.serve()
	defer func() {
		cli.Close()
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			t.Error("connection did not end")
		}
	}()
	in := (&clientBytes{}).u32(nbdFlagCFixedNewstyle|nbdFlagCNoZeroes).opt(nbdOptGo, infoData("d"))
	for i := 0; i < total; i++ {
		in.req(nbdCmdRead, 0, uint64(i)*512, 512, nil)
	}
	go cli.Write(in.b)
	replies := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, cli)
		replies <- n
	}()

	deadline := time.Now().Add(10 * time.Second)
	for {
		c.inflight.mu.Lock()
		n, waiting := c.inflight.n, c.inflight.waiting
		c.inflight.mu.Unlock()
		if n == limit && waiting == 1 {
			break
		}
		if n > limit || time.Now().After(deadline) {
			t.Fatalf("in flight %d, reader waiting %d: want %d and a blocked reader", n, waiting, limit)
		}
		time.Sleep(time.Millisecond)
	}
	// The reader is blocked, so nothing else can have started.
	if got := len(disk.started); got != limit {
		t.Fatalf("%d reads started with a limit of %d", got, limit)
	}
	close(disk.gate)
	deadline = time.Now().Add(10 * time.Second)
	for len(disk.started) < total {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d reads ran after the gate opened", len(disk.started), total)
		}
		time.Sleep(time.Millisecond)
	}
}
