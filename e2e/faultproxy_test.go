package e2e

import (
	"io"
	"net"
	"sync"
	"testing"
)

// faultProxy is a TCP proxy on 127.0.0.1 between a primary and a replica.
// The primary's --replica names the proxy; the replica's certificate has
// SAN 127.0.0.1, so TLS verifies through it as it would directly.
//
// It counts the bytes it forwards upstream (primary -> replica), which is
// how the tests tell "the upload resumed" from "it started over", and it
// injects faults on the upstream byte stream: cut the connection at a given
// byte once, flip a byte once, or refuse all traffic while blocked.
// Positions are in the proxy's upstream count (upstream()), summed over all
// connections.
type faultProxy struct {
	t  *testing.T
	ln net.Listener

	mu      sync.Mutex
	target  string
	up      int64 // upstream bytes forwarded
	fault   *proxyFault
	fired   int
	blocked bool
	conns   map[net.Conn]struct{} // both ends of every open pairing
	closed  bool
	wg      sync.WaitGroup
}

type proxyFault struct {
	cut bool  // cut the connection at byte at; else flip byte at
	at  int64 // in upstream count
}

// newFaultProxy listens on 127.0.0.1:0 and forwards to target. It is closed
// when the test ends.
func newFaultProxy(t *testing.T, target string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{t: t, ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

// upstream is the number of bytes forwarded from the primary so far.
func (p *faultProxy) upstream() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.up
}

// faults is how many armed faults fired.
func (p *faultProxy) faults() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fired
}

// cutAfter arms a fault: the connection carrying upstream byte
// upstream()+n is closed (both ways) after forwarding the n bytes before it.
func (p *faultProxy) cutAfter(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault = &proxyFault{cut: true, at: p.up + n}
}

// flipAt arms a fault: upstream byte upstream()+n is inverted on its way.
func (p *faultProxy) flipAt(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault = &proxyFault{at: p.up + n}
}

// block closes every connection and refuses new ones until unblock.
func (p *faultProxy) block() {
	p.mu.Lock()
	p.blocked = true
	conns := make([]net.Conn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

func (p *faultProxy) unblock() {
	p.mu.Lock()
	p.blocked = false
	p.mu.Unlock()
}

func (p *faultProxy) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.ln.Close()
	p.block()
	p.wg.Wait()
}

func (p *faultProxy) accept() {
	defer p.wg.Done()
	for {
		down, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refuse, target := p.blocked || p.closed, p.target
		p.mu.Unlock()
		if refuse {
			down.Close()
			continue
		}
		up, err := net.Dial("tcp", target)
		if err != nil {
			down.Close() // the replica is down: the primary sees a reset
			continue
		}
		p.mu.Lock()
		if p.blocked || p.closed {
			p.mu.Unlock()
			down.Close()
			up.Close()
			continue
		}
		p.conns[down], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(down, up)
		go func() {
			defer p.wg.Done()
			io.Copy(down, up)
			p.drop(down, up)
		}()
	}
}

// drop closes and forgets both ends of a pairing.
func (p *faultProxy) drop(a, b net.Conn) {
	a.Close()
	b.Close()
	p.mu.Lock()
	delete(p.conns, a)
	delete(p.conns, b)
	p.mu.Unlock()
}

// pump forwards primary -> replica, counting and injecting the armed fault.
func (p *faultProxy) pump(down, up net.Conn) {
	defer p.wg.Done()
	defer p.drop(down, up)
	buf := make([]byte, 32<<10)
	for {
		n, err := down.Read(buf)
		if n > 0 {
			b := buf[:n]
			p.mu.Lock()
			pos := p.up
			f := p.fault
			cut := false
			if f != nil && f.at >= pos && f.at < pos+int64(n) {
				i := f.at - pos
				if f.cut {
					b, cut = b[:i], true
				} else {
					b[i] ^= 0xff
				}
				p.fault = nil
				p.fired++
			}
			p.up += int64(len(b))
			p.mu.Unlock()
			if _, werr := up.Write(b); werr != nil || cut {
				return
			}
		}
		if err != nil {
			return // EOF or a reset: HTTP clients do not half-close
		}
	}
}
