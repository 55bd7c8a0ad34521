package blockdev

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// FuzzDecodeRequest: the decoder never panics, round-trips what it accepts,
// and checkRequest never lets through a data request outside the disk or
// longer than the maximum.
func FuzzDecodeRequest(f *testing.F) {
	seed := func(typ, flags uint16, off uint64, n uint32) []byte {
		return encodeRequest(nil, request{RequestMagic: nbdRequestMagic, Type: typ, CommandFlags: flags, Handle: 7, Offset: off, Length: n})
	}
	f.Add(seed(nbdCmdRead, 0, 0, 4096), int64(1<<20), false, uint32(32<<20))
	f.Add(seed(nbdCmdWrite, nbdCmdFlagFUA, 1<<20-512, 512), int64(1<<20), false, uint32(4096))
	f.Add(seed(nbdCmdWriteZeroes, nbdCmdFlagNoHole, ^uint64(0), 1), int64(1<<20), true, uint32(4096))
	f.Add(seed(nbdCmdFlush, 0, 0, 0), int64(0), false, uint32(0))
	f.Add([]byte("NBDMAGIC"), int64(512), false, uint32(512))
	f.Fuzz(func(t *testing.T, b []byte, size int64, readOnly bool, maxReq uint32) {
		r, err := decodeRequest(b)
		if err != nil {
			return
		}
		if got := encodeRequest(nil, r); !bytes.Equal(got, b[:nbdRequestSize]) {
			t.Fatalf("round trip: % x -> %+v -> % x", b[:nbdRequestSize], r, got)
		}
		if size < 0 {
			size = -(size + 1)
		}
		lim := exportLimits{size: size, readOnly: readOnly, maxRequest: maxReq}
		if checkRequest(r, lim) != 0 {
			return
		}
		switch r.Type {
		case nbdCmdRead, nbdCmdWrite, nbdCmdTrim, nbdCmdWriteZeroes:
			end := r.Offset + uint64(r.Length)
			if r.Length == 0 || end < r.Offset || end > uint64(size) {
				t.Fatalf("accepted out-of-range %+v on size %d", r, size)
			}
			if (r.Type == nbdCmdRead || r.Type == nbdCmdWrite) && r.Length > maxReq {
				t.Fatalf("accepted oversized %+v (max %d)", r, maxReq)
			}
			if readOnly && r.Type != nbdCmdRead {
				t.Fatalf("accepted %s on a read-only export", nbdCmdName(r.Type))
			}
		case nbdCmdFlush, nbdCmdDisc:
		default:
			t.Fatalf("accepted unknown command %d", r.Type)
		}
	})
}

// memDisk is an in-memory Disk for the internal tests (fakedisk imports this
// package, so only external tests can use it).
type memDisk struct {
	mu   sync.Mutex
	data []byte
}

func (d *memDisk) Size() int64 { return int64(len(d.data)) }
func (d *memDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.data)) {
		return 0, ErrOutOfRange
	}
	return copy(p, d.data[off:]), nil
}
func (d *memDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.data)) {
		return 0, ErrOutOfRange
	}
	return copy(d.data[off:], p), nil
}
func (d *memDisk) Flush() error { return nil }
func (d *memDisk) Trim(off, n int64) error {
	return d.Zero(off, n, true)
}
func (d *memDisk) Zero(off, n int64, punch bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || n < 0 || off+n > int64(len(d.data)) {
		return ErrOutOfRange
	}
	clear(d.data[off : off+n])
	return nil
}

type mapExports map[string]Export

func (m mapExports) Lookup(name string) (Export, bool) { e, ok := m[name]; return e, ok }
func (m mapExports) List() []Export {
	var l []Export
	for _, e := range m {
		l = append(l, e)
	}
	return l
}

// clientBytes builds a client byte stream for seeds.
type clientBytes struct{ b []byte }

func (c *clientBytes) u32(v uint32) *clientBytes {
	c.b = binary.BigEndian.AppendUint32(c.b, v)
	return c
}
func (c *clientBytes) opt(opt uint32, data []byte) *clientBytes {
	c.b = binary.BigEndian.AppendUint64(c.b, nbdOptMagic)
	c.u32(opt).u32(uint32(len(data)))
	c.b = append(c.b, data...)
	return c
}
func (c *clientBytes) req(typ, flags uint16, off uint64, n uint32, payload []byte) *clientBytes {
	c.b = encodeRequest(c.b, request{RequestMagic: nbdRequestMagic, Type: typ, CommandFlags: flags, Handle: uint64(len(c.b)), Offset: off, Length: n})
	c.b = append(c.b, payload...)
	return c
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// mapMem is a memDisk that calls every all-zero 4 KiB block a hole, so
// that the fuzzer drives sparse reads and block status.
type mapMem struct{ *memDisk }

func (m mapMem) Extents(off, length int64) ([]Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Extent
	for pos := off; pos < off+length; {
		n := min(4096-pos%4096, off+length-pos)
		blk := pos &^ 4095
		hole := !slices.ContainsFunc(m.data[blk:min(blk+4096, int64(len(m.data)))], func(b byte) bool { return b != 0 })
		out = append(out, Extent{Offset: pos, Length: n, Hole: hole, Zero: hole})
		pos += n
	}
	return out, nil
}

// FuzzNegotiation feeds arbitrary client bytes to a whole connection
// (handshake and, if the bytes get that far, transmission). The connection
// must end by itself, without panicking, once the client has sent everything
// and hung up.
func FuzzNegotiation(f *testing.F) {
	flags := nbdFlagCFixedNewstyle | nbdFlagCNoZeroes
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptList, nil).opt(nbdOptAbort, nil).b)
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptInfo, infoData("vm1/disk0", nbdInfoName, nbdInfoBlockSize)).
		opt(nbdOptGo, infoData("nope")).opt(99, []byte("junk")).opt(nbdOptStructuredReply, nil).
		opt(nbdOptGo, infoData("vm1/disk0")).
		req(nbdCmdWrite, nbdCmdFlagFUA, 0, 8, []byte("abcdefgh")).req(nbdCmdRead, 0, 0, 8, nil).
		req(nbdCmdWriteZeroes, nbdCmdFlagNoHole, 0, 4096, nil).req(nbdCmdTrim, 0, 4096, 4096, nil).
		req(nbdCmdFlush, 0, 0, 0, nil).req(nbdCmdRead, 0, 1<<20, 1, nil).req(nbdCmdDisc, 0, 0, 0, nil).b)
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptSetMetaContext, metaData("vm1/disk0", nbdContextAllocation)).
		opt(nbdOptStructuredReply, nil).opt(nbdOptListMetaContext, metaData("vm1/disk0")).
		opt(nbdOptListMetaContext, metaData("vm1/disk0", "base:", "x-foo:bar", "nocolon")).
		opt(nbdOptSetMetaContext, metaData("vm1/disk0", "qemu:dirty-bitmap:a", nbdContextAllocation)).
		opt(nbdOptGo, infoData("vm1/disk0")).
		req(nbdCmdWrite, 0, 4096, 8, []byte("abcdefgh")).req(nbdCmdRead, 0, 0, 16384, nil).
		req(nbdCmdRead, nbdCmdFlagDF, 0, 8192, nil).req(nbdCmdBlockStatus, 0, 0, 1<<20, nil).
		req(nbdCmdBlockStatus, nbdCmdFlagReqOne, 4096, 1, nil).req(nbdCmdBlockStatus, 0, 1<<20, 1, nil).
		req(nbdCmdRead, 0, 1<<20, 1, nil).b)
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptStructuredReply, nil).
		opt(nbdOptSetMetaContext, []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}).
		opt(nbdOptExportName, []byte("ro")).req(nbdCmdBlockStatus, 0, 0, 4096, nil).req(nbdCmdRead, 4, 0, 1, nil).b)
	f.Add((&clientBytes{}).u32(0).opt(nbdOptExportName, []byte("ro")).
		req(nbdCmdWrite, 0, 0, 4, []byte("abcd")).req(nbdCmdRead, 0, 0, 4, nil).b)
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptGo, infoData("")).req(nbdCmdWrite, 0, 0, 1<<30, nil).b)
	f.Add((&clientBytes{}).u32(flags).opt(nbdOptInfo, []byte{0xff, 0xff, 0xff, 0xff}).opt(nbdOptGo, infoData("vm1/disk0")).u32(0x25609513).b)
	f.Add((&clientBytes{}).u32(flags).u32(0).u32(0).b)
	f.Add((&clientBytes{}).u32(1 << 7).b)
	f.Fuzz(func(t *testing.T, in []byte) {
		exports := mapExports{
			"vm1/disk0": {Name: "vm1/disk0", Disk: mapMem{&memDisk{data: make([]byte, 1<<20)}}, Description: "fuzz"},
			"ro":        {Name: "ro", Disk: &memDisk{data: make([]byte, 64<<10)}, ReadOnly: true},
		}
		s := NewNBDServer(NBDConfig{Exports: exports, HandshakeTimeout: 2 * time.Second, MaxRequest: 64 << 10})
		srv, cli := net.Pipe()
		deadline := time.Now().Add(5 * time.Second)
		cli.SetDeadline(deadline)
		c := s.newConn(srv, nil)
		go c.serve()
		go io.Copy(io.Discard, cli)
		cli.Write(in)
		cli.Close()
		select {
		case <-c.done:
		case <-time.After(time.Until(deadline)):
			t.Fatalf("connection did not end after the client hung up")
		}
	})
}
