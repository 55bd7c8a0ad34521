package blockdev_test

// Structured replies, metadata contexts and block status, against a
// handwritten client: what real clients never send is tested here, what
// they do in nbd_map_clients_test.go.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

// More wire values, spelled out as in nbd_test.go.
const (
	optListMeta = 9
	optSetMeta  = 10

	repMetaContext = 4

	flagSendDF = 1 << 7

	cmdBlockStatus = 7
	cmdFlagDF      = 1 << 2
	cmdFlagReqOne  = 1 << 3

	chunkMagic     = 0x668e33ef
	chunkDone      = 1
	chunkData      = 1
	chunkHole      = 2
	chunkStatus    = 5
	chunkError     = 1<<15 | 1
	chunkErrorOff  = 1<<15 | 2
	stateHole      = 1
	stateZero      = 2
	simpleMagicVal = 0x67446698
)

// mapDisk is a Disk whose map is its backing file's SEEK_DATA/SEEK_HOLE, as
// the journal's image map is, and which counts the bytes read from it.
type mapDisk struct {
	blockdev.Disk
	f         vfs.File
	readBytes atomic.Int64
	mapCalls  atomic.Int64
}

func (m *mapDisk) ReadAt(p []byte, off int64) (int, error) {
	m.readBytes.Add(int64(len(p)))
	return m.Disk.ReadAt(p, off)
}

func (m *mapDisk) Extents(off, length int64) ([]blockdev.Extent, error) {
	m.mapCalls.Add(1)
	return vfs.Map(m.f, off, length)
}

// mappedFixture serves "vm/map" (a mapDisk of size bytes) and "vm/other".
func mappedFixture(t *testing.T, size int64) (*fixture, *mapDisk) {
	t.Helper()
	var md *mapDisk
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "vm/map", size: size, wrap: func(d blockdev.Disk) blockdev.Disk {
			md = &mapDisk{Disk: d} // the file is opened below, once its path is known
			return md
		}},
		exportSpec{name: "vm/other", size: 1 << 20},
	)
	file, err := vfs.Default.OpenFile(f.paths["vm/map"], os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { file.Close() })
	md.f = file
	return f, md
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

type metaContext struct {
	id   uint32
	name string
}

// meta sends LIST or SET_META_CONTEXT and collects the contexts up to the
// ACK; it returns the error reply type (0 on success).
func (c *rawClient) meta(opt uint32, name string, queries ...string) ([]metaContext, uint32) {
	c.t.Helper()
	c.opt(opt, metaData(name, queries...))
	var out []metaContext
	for {
		typ, d := c.optReply(opt)
		switch {
		case typ == repAck:
			return out, 0
		case typ == repMetaContext:
			out = append(out, metaContext{binary.BigEndian.Uint32(d), string(d[4:])})
		case typ&(1<<31) != 0:
			return out, typ
		default:
			c.t.Fatalf("unexpected reply type %#x", typ)
		}
	}
}

// structured asks for structured replies and checks they are granted.
func (c *rawClient) structured() {
	c.t.Helper()
	c.opt(optStructured, nil)
	if typ, _ := c.optReply(optStructured); typ != repAck {
		c.t.Fatalf("STRUCTURED_REPLY: reply %#x, want ACK", typ)
	}
}

type chunk struct {
	flags, typ uint16
	handle     uint64
	payload    []byte
}

// chunks reads the chunks of one structured reply, up to the one with DONE.
func (c *rawClient) chunks() []chunk {
	c.t.Helper()
	var out []chunk
	for {
		h := c.read(20)
		if m := binary.BigEndian.Uint32(h); m != chunkMagic {
			c.t.Fatalf("chunk magic %#x (a simple reply where a structured one was due?)", m)
		}
		ch := chunk{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]),
			handle: binary.BigEndian.Uint64(h[8:])}
		ch.payload = c.read(int(binary.BigEndian.Uint32(h[16:])))
		out = append(out, ch)
		if ch.flags&chunkDone != 0 {
			return out
		}
	}
}

// chunkErrno returns the error of an error chunk (0 for others).
func chunkErrno(ch chunk) uint32 {
	if ch.typ&(1<<15) == 0 {
		return 0
	}
	return binary.BigEndian.Uint32(ch.payload)
}

// sread does a structured READ and reassembles it; holes must be zero on
// the disk. It returns the data, the chunk types in order, and the error
// (0 if none).
func (c *rawClient) sread(flags uint16, off uint64, n uint32) ([]byte, []uint16, uint32) {
	c.t.Helper()
	const handle = 0xabcdef
	c.send(cmdRead, flags, handle, off, n, nil)
	buf := make([]byte, n)
	covered := make([]bool, n)
	var types []uint16
	var errno uint32
	for _, ch := range c.chunks() {
		if ch.handle != handle {
			c.t.Fatalf("chunk for handle %#x, want %#x", ch.handle, handle)
		}
		types = append(types, ch.typ)
		var at, size uint64
		switch ch.typ {
		case chunkData:
			at, size = binary.BigEndian.Uint64(ch.payload), uint64(len(ch.payload)-8)
			copy(buf[at-off:], ch.payload[8:])
		case chunkHole:
			if len(ch.payload) != 12 {
				c.t.Fatalf("hole chunk of %d bytes", len(ch.payload))
			}
			at, size = binary.BigEndian.Uint64(ch.payload), uint64(binary.BigEndian.Uint32(ch.payload[8:]))
			clear(buf[at-off : at-off+size])
		case chunkError, chunkErrorOff:
			errno = chunkErrno(ch)
			continue
		default:
			c.t.Fatalf("unexpected chunk type %d in a READ reply", ch.typ)
		}
		if size == 0 || at < off || at+size > off+uint64(n) {
			c.t.Fatalf("chunk [%d,+%d) outside the request [%d,+%d)", at, size, off, n)
		}
		for i := at - off; i < at-off+size; i++ {
			if covered[i] {
				c.t.Fatalf("chunks overlap at %d", off+i)
			}
			covered[i] = true
		}
	}
	if errno == 0 {
		for i, ok := range covered {
			if !ok {
				c.t.Fatalf("byte %d of the read not covered by any chunk", off+uint64(i))
			}
		}
	}
	return buf, types, errno
}

type desc struct{ length, flags uint32 }

// status does a BLOCK_STATUS and returns its descriptors, or the error.
func (c *rawClient) status(flags uint16, off uint64, n uint32) ([]desc, uint32) {
	c.t.Helper()
	c.send(cmdBlockStatus, flags, 77, off, n, nil)
	chs := c.chunks()
	if len(chs) != 1 {
		c.t.Fatalf("BLOCK_STATUS answered with %d chunks, want 1", len(chs))
	}
	ch := chs[0]
	if e := chunkErrno(ch); e != 0 {
		return nil, e
	}
	if ch.typ != chunkStatus || len(ch.payload) < 12 || (len(ch.payload)-4)%8 != 0 {
		c.t.Fatalf("BLOCK_STATUS chunk type %d, %d bytes", ch.typ, len(ch.payload))
	}
	if id := binary.BigEndian.Uint32(ch.payload); id != c.ctxID {
		c.t.Fatalf("context id %d, want %d", id, c.ctxID)
	}
	var out []desc
	for p := ch.payload[4:]; len(p) > 0; p = p[8:] {
		out = append(out, desc{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	return out, 0
}

// openMapped negotiates structured replies and base:allocation on export
// and enters transmission there.
func openMapped(t *testing.T, sock, export string) *rawClient {
	t.Helper()
	c := dial(t, sock)
	c.hello(cFixed | cNoZeroes)
	c.structured()
	ctx, errTyp := c.meta(optSetMeta, export, "base:allocation")
	if errTyp != 0 || len(ctx) != 1 || ctx[0].name != "base:allocation" {
		t.Fatalf("SET_META_CONTEXT: %+v (error %#x)", ctx, errTyp)
	}
	c.ctxID = ctx[0].id
	e, errTyp := c.info(optGo, export)
	if errTyp != 0 || e.flags&flagSendDF == 0 {
		t.Fatalf("GO: %+v (error %#x); want DF offered", e, errTyp)
	}
	return c
}

func TestNBDStructuredNegotiation(t *testing.T) {
	f, _ := mappedFixture(t, 1<<20)

	t.Run("meta contexts need structured replies", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		if _, errTyp := c.meta(optSetMeta, "vm/map", "base:allocation"); errTyp != repErrInvalid {
			t.Errorf("SET_META_CONTEXT before STRUCTURED_REPLY: %#x, want NBD_REP_ERR_INVALID", errTyp)
		}
		if _, errTyp := c.meta(optListMeta, "vm/map"); errTyp != repErrInvalid {
			t.Errorf("LIST_META_CONTEXT before STRUCTURED_REPLY: %#x, want NBD_REP_ERR_INVALID", errTyp)
		}
		// Without structured replies: simple replies, no DF, no block status.
		e, errTyp := c.info(optGo, "vm/map")
		if errTyp != 0 || e.flags&flagSendDF != 0 {
			t.Fatalf("GO: %+v (error %#x); DF must not be offered", e, errTyp)
		}
		c.expectError("BLOCK_STATUS without structured replies", errEINVAL, cmdBlockStatus, 0, 0, 4096, nil)
		c.expectError("READ with DF without structured replies", errEINVAL, cmdRead, cmdFlagDF, 0, 4096, nil)
		c.mustDo(cmdRead, 0, 0, 4096, nil)
	})

	t.Run("list", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.structured()
		c.structured() // asking twice is harmless
		for _, tt := range []struct {
			name    string
			export  string
			queries []string
			want    []metaContext
			errTyp  uint32
		}{
			{"all", "vm/map", nil, []metaContext{{0, "base:allocation"}}, 0},
			{"wildcard", "vm/map", []string{"base:"}, []metaContext{{0, "base:allocation"}}, 0},
			{"by name", "vm/other", []string{"base:allocation"}, []metaContext{{0, "base:allocation"}}, 0},
			{"unknown namespace", "vm/map", []string{"qemu:dirty-bitmap:b0", "x-foo:"}, nil, 0},
			{"unknown leaf", "vm/map", []string{"base:nothing"}, nil, 0},
			{"both", "vm/map", []string{"x-foo:bar", "base:allocation", "base:"}, []metaContext{{0, "base:allocation"}}, 0},
			{"unknown export", "vm/none", nil, nil, repErrUnknown},
			{"no namespace", "vm/map", []string{"allocation"}, nil, repErrInvalid},
		} {
			got, errTyp := c.meta(optListMeta, tt.export, tt.queries...)
			if errTyp != tt.errTyp || fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("%s: LIST = %+v (error %#x), want %+v (error %#x)", tt.name, got, errTyp, tt.want, tt.errTyp)
			}
		}
		c.opt(optListMeta, []byte{0, 0, 0, 9, 'v'})
		if typ, _ := c.optReply(optListMeta); typ != repErrInvalid {
			t.Errorf("LIST with truncated data: %#x, want NBD_REP_ERR_INVALID", typ)
		}
	})

	t.Run("set", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.structured()
		for _, tt := range []struct {
			name    string
			export  string
			queries []string
			n       int
			errTyp  uint32
		}{
			{"nothing asked", "vm/map", nil, 0, 0},
			{"wildcard selects nothing", "vm/map", []string{"base:"}, 0, 0},
			{"unknown namespace ignored", "vm/map", []string{"x-foo:bar", "qemu:allocation-depth"}, 0, 0},
			{"unknown export", "vm/none", []string{"base:allocation"}, 0, repErrUnknown},
			{"no namespace", "vm/map", []string{"base"}, 0, repErrInvalid},
			{"selected", "vm/map", []string{"x-foo:bar", "base:allocation"}, 1, 0},
		} {
			got, errTyp := c.meta(optSetMeta, tt.export, tt.queries...)
			if errTyp != tt.errTyp || len(got) != tt.n {
				t.Errorf("%s: SET = %+v (error %#x), want %d contexts (error %#x)", tt.name, got, errTyp, tt.n, tt.errTyp)
			}
			if len(got) == 1 && (got[0].name != "base:allocation" || got[0].id == 0) {
				t.Errorf("%s: SET selected %+v", tt.name, got[0])
			}
		}
	})

	t.Run("selection replaced by a later SET", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.structured()
		if got, _ := c.meta(optSetMeta, "vm/map", "base:allocation"); len(got) != 1 {
			t.Fatalf("SET: %+v", got)
		}
		if got, errTyp := c.meta(optSetMeta, "vm/map", "x-foo:bar"); len(got) != 0 || errTyp != 0 {
			t.Fatalf("second SET: %+v (error %#x)", got, errTyp)
		}
		if _, errTyp := c.info(optGo, "vm/map"); errTyp != 0 {
			t.Fatalf("GO: %#x", errTyp)
		}
		c.send(cmdBlockStatus, 0, 5, 0, 4096, nil)
		if chs := c.chunks(); len(chs) != 1 || chunkErrno(chs[0]) != errEINVAL {
			t.Fatalf("BLOCK_STATUS with no context selected: %+v, want one EINVAL error chunk", chs)
		}
	})

	t.Run("context for another export", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.structured()
		if got, _ := c.meta(optSetMeta, "vm/other", "base:allocation"); len(got) != 1 {
			t.Fatalf("SET: %+v", got)
		}
		if _, errTyp := c.info(optGo, "vm/map"); errTyp != 0 {
			t.Fatalf("GO: %#x", errTyp)
		}
		c.send(cmdBlockStatus, 0, 5, 0, 4096, nil)
		if chs := c.chunks(); len(chs) != 1 || chunkErrno(chs[0]) != errEINVAL {
			t.Fatalf("BLOCK_STATUS with the context of another export: %+v, want one EINVAL error chunk", chs)
		}
	})

	t.Run("export name", func(t *testing.T) {
		c := dial(t, f.sock)
		c.hello(cFixed | cNoZeroes)
		c.structured()
		if got, _ := c.meta(optSetMeta, "vm/map", "base:allocation"); len(got) != 1 {
			t.Fatalf("SET: %+v", got)
		}
		c.ctxID = 1
		c.opt(optExportName, []byte("vm/map"))
		b := c.read(10)
		if flags := binary.BigEndian.Uint16(b[8:]); flags&flagSendDF == 0 {
			t.Fatalf("EXPORT_NAME flags %#x lack DF", flags)
		}
		if d, errno := c.status(0, 0, 1<<20); errno != 0 || len(d) != 1 || d[0] != (desc{1 << 20, stateHole | stateZero}) {
			t.Fatalf("BLOCK_STATUS of an empty disk: %+v (error %d)", d, errno)
		}
	})
}

func TestNBDStructuredTransmission(t *testing.T) {
	const k = 1 << 10
	f, md := mappedFixture(t, 1<<20)
	c := openMapped(t, f.sock, "vm/map")
	data := pattern(3, 64*k)
	data[0] = 1 // no zero byte at either end, so a hole cannot hide the data
	data[len(data)-1] = 1
	c.mustDo(cmdWrite, 0, 64*k, 64*k, data)
	c.mustDo(cmdWrite, 0, 512*k, 64*k, data)
	c.mustDo(cmdTrim, 0, 528*k, 16*k, nil)

	t.Run("sparse read", func(t *testing.T) {
		md.readBytes.Store(0)
		got, types, errno := c.sread(0, 0, 256*k)
		want := append(append(make([]byte, 64*k), data...), make([]byte, 128*k)...)
		if errno != 0 || !bytes.Equal(got, want) {
			t.Fatalf("structured read: error %d, data differs: %v", errno, !bytes.Equal(got, want))
		}
		if fmt.Sprint(types) != fmt.Sprint([]uint16{chunkHole, chunkData, chunkHole}) {
			t.Errorf("chunks %v, want hole, data, hole", types)
		}
		if n := md.readBytes.Load(); n != 64*k {
			t.Errorf("the disk was read for %d bytes, want only the 64 KiB of data", n)
		}
	})

	t.Run("read a hole", func(t *testing.T) {
		got, types, errno := c.sread(0, 300*k, 4*k)
		if errno != 0 || !bytes.Equal(got, make([]byte, 4*k)) || fmt.Sprint(types) != fmt.Sprint([]uint16{chunkHole}) {
			t.Fatalf("read of a hole: error %d, chunks %v", errno, types)
		}
	})

	t.Run("unaligned read across data and hole", func(t *testing.T) {
		got, _, errno := c.sread(0, 128*k-100, 300)
		want := append(append([]byte{}, data[len(data)-100:]...), make([]byte, 200)...)
		if errno != 0 || !bytes.Equal(got, want) {
			t.Fatalf("unaligned read: error %d, got % x", errno, got[95:105])
		}
	})

	t.Run("DF", func(t *testing.T) {
		got, types, errno := c.sread(cmdFlagDF, 0, 256*k)
		want := append(append(make([]byte, 64*k), data...), make([]byte, 128*k)...)
		if errno != 0 || !bytes.Equal(got, want) || fmt.Sprint(types) != fmt.Sprint([]uint16{chunkData}) {
			t.Fatalf("DF read: error %d, chunks %v (want one data chunk)", errno, types)
		}
	})

	t.Run("block status", func(t *testing.T) {
		hz := uint32(stateHole | stateZero)
		for _, tt := range []struct {
			name  string
			flags uint16
			off   uint64
			n     uint32
			want  []desc
			errno uint32
		}{
			{"whole disk", 0, 0, 1 << 20, []desc{{64 * k, hz}, {64 * k, 0}, {384 * k, hz}, {16 * k, 0}, {16 * k, hz}, {32 * k, 0}, {448 * k, hz}}, 0},
			{"middle", 0, 100 * k, 50 * k, []desc{{28 * k, 0}, {22 * k, hz}}, 0},
			{"req one", cmdFlagReqOne, 0, 1 << 20, []desc{{64 * k, hz}}, 0},
			{"req one, short", cmdFlagReqOne, 0, 4 * k, []desc{{4 * k, hz}}, 0},
			{"to the end", 0, 1<<20 - 512, 512, []desc{{512, hz}}, 0},
			{"beyond the end", 0, 1<<20 - 512, 1024, nil, errEINVAL},
			{"past the end", 0, 2 << 20, 512, nil, errEINVAL},
			{"zero length", 0, 0, 0, nil, errEINVAL},
			{"bad flag", cmdFlagDF, 0, 4096, nil, errEINVAL},
		} {
			got, errno := c.status(tt.flags, tt.off, tt.n)
			if errno != tt.errno || fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("%s: BLOCK_STATUS [%d,+%d) = %v (error %d), want %v (error %d)", tt.name, tt.off, tt.n, got, errno, tt.want, tt.errno)
			}
		}
	})

	t.Run("errors are structured", func(t *testing.T) {
		for _, tt := range []struct {
			name     string
			typ      uint16
			flags    uint16
			off      uint64
			n        uint32
			wantType uint16
			errno    uint32
		}{
			{"read past the end", cmdRead, 0, 1 << 20, 512, chunkError, errEINVAL},
			{"read with REQ_ONE", cmdRead, cmdFlagReqOne, 0, 512, chunkError, errEINVAL},
			{"write past the end", cmdWrite, 0, 1 << 20, 0, chunkError, errEINVAL},
		} {
			c.send(tt.typ, tt.flags, 9, tt.off, tt.n, nil)
			chs := c.chunks()
			if len(chs) != 1 || chs[0].typ != tt.wantType || chunkErrno(chs[0]) != tt.errno || chs[0].handle != 9 {
				t.Errorf("%s: %+v, want one chunk of type %#x with error %d", tt.name, chs, tt.wantType, tt.errno)
			}
		}
		// A failing disk: ERROR_OFFSET at the data extent that failed.
		f.disks["vm/map"].FailNext(1, syscall.EIO)
		_, types, errno := c.sread(0, 0, 256*k)
		if errno != errEIO || fmt.Sprint(types) != fmt.Sprint([]uint16{chunkErrorOff}) {
			t.Errorf("read of a failing disk: chunks %v error %d, want one ERROR_OFFSET with EIO", types, errno)
		}
		// Replies without data stay simple.
		if errno, _ := c.do(cmdFlush, 0, 0, 0, nil); errno != 0 {
			t.Errorf("FLUSH: error %d", errno)
		}
	})
}

// errMap is a Disk whose map fails: reads fall back to data, block status
// reports the error.
type errMap struct{ blockdev.Disk }

func (errMap) Extents(off, length int64) ([]blockdev.Extent, error) {
	return nil, errors.New("no map today")
}

// shortMap answers one 4 KiB extent at a time: reads and block status must
// go on from where it stopped.
type shortMap struct{ blockdev.Disk }

func (shortMap) Extents(off, length int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Offset: off, Length: min(length, 4096), Hole: off%8192 == 0, Zero: off%8192 == 0}}, nil
}

func TestNBDStructuredOddMaps(t *testing.T) {
	f := newFixture(t, blockdev.NBDConfig{},
		exportSpec{name: "err", size: 1 << 20, wrap: func(d blockdev.Disk) blockdev.Disk { return errMap{d} }},
		exportSpec{name: "short", size: 1 << 20, wrap: func(d blockdev.Disk) blockdev.Disk { return shortMap{d} }},
	)
	c := openMapped(t, f.sock, "err")
	c.mustDo(cmdWrite, 0, 0, 4, []byte("abcd"))
	got, types, errno := c.sread(0, 0, 8192)
	if errno != 0 || string(got[:4]) != "abcd" || fmt.Sprint(types) != fmt.Sprint([]uint16{chunkData}) {
		t.Errorf("read with a failing map: error %d chunks %v", errno, types)
	}
	c.send(cmdBlockStatus, 0, 1, 0, 8192, nil)
	if chs := c.chunks(); len(chs) != 1 || chunkErrno(chs[0]) != errEIO {
		t.Errorf("block status with a failing map: %+v, want one EIO error chunk", chs)
	}

	c = openMapped(t, f.sock, "short")
	c.mustDo(cmdWrite, 0, 4096, 4, []byte("wxyz"))
	got, types, errno = c.sread(0, 0, 16384)
	if errno != 0 || string(got[4096:4100]) != "wxyz" || fmt.Sprint(types) != fmt.Sprint([]uint16{chunkHole, chunkData}) {
		t.Errorf("read with a short map: error %d chunks %v", errno, types)
	}
	if d, errno := c.status(0, 0, 16384); errno != 0 || fmt.Sprint(d) != fmt.Sprint([]desc{{4096, stateHole | stateZero}}) {
		t.Errorf("block status with a short map: %v (error %d)", d, errno)
	}
}
