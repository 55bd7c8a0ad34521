package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/vfs"
)

// The byte layouts in doc.go, pinned: a change here is a format change and
// needs a new version number.
func TestLayoutGolden(t *testing.T) {
	b := make([]byte, segHeaderSize)
	encodeSegHeader(b, segHeader{Disks: 2, No: 0x0102, Cycle: 0x0304, Salt: 0xa1b2c3d4})
	want := []byte{
		0x56, 0x44, 0x55, 0x53, 1, 0, 2, 0,
		0x02, 0x01, 0, 0, 0, 0, 0, 0,
		0x04, 0x03, 0, 0, 0, 0, 0, 0,
		0xd4, 0xc3, 0xb2, 0xa1,
	}
	if !bytes.Equal(b[:28], want) {
		t.Errorf("segment header:\n got %x\nwant %x", b[:28], want)
	}
	if h, err := decodeSegHeader(b); err != nil || h.No != 0x0102 {
		t.Errorf("segment header round trip: %+v %v", h, err)
	}

	r := make([]byte, recHeaderSize)
	encodeRecHeader(r, &recHeader{Kind: kindData, Disk: 1, Block: 0x0a0b, Synced: 0x2000, Salt: 0xa1b2c3d4, DCRC: 0xdeadbeef})
	want = []byte{
		0x56, 0x44, 0x55, 0x52, 1, 1, 1, 0,
		0x0b, 0x0a, 0, 0, 0, 0, 0, 0,
		0, 0x20, 0, 0, 0, 0, 0, 0,
		0xd4, 0xc3, 0xb2, 0xa1,
		0xef, 0xbe, 0xad, 0xde,
		0, 0, 0, 0,
	}
	if !bytes.Equal(r[:36], want) {
		t.Errorf("record header:\n got %x\nwant %x", r[:36], want)
	}
	for _, tc := range []struct {
		name string
		mut  func([]byte)
		want error
	}{
		{"zeroed", func(b []byte) { clear(b) }, ErrZeroed},
		{"bad magic", func(b []byte) { b[0] ^= 1 }, ErrInvalid},
		{"bad crc", func(b []byte) { b[9] ^= 1 }, ErrInvalid},
		{"future version", func(b []byte) { b[4] = 2; recCRC(b) }, ErrVersion},
		{"unknown kind", func(b []byte) { b[5] = 9; recCRC(b) }, ErrInvalid},
		{"other segment", func(b []byte) { b[24] ^= 1; recCRC(b) }, ErrInvalid},
		{"reserved", func(b []byte) { b[33] = 1; recCRC(b) }, ErrInvalid},
	} {
		c := bytes.Clone(r)
		tc.mut(c)
		if _, err := decodeRecHeader(c, 0xa1b2c3d4); !errors.Is(err, tc.want) {
			t.Errorf("record %s: got %v, want %v", tc.name, err, tc.want)
		}
	}

	m := encodeManifest(&manifest{Seq: 5, NextSeg: 9, Disks: []int64{0x1000},
		Points: []manPoint{
			{Seg: 7, Cycle: 3, Sealed: time.Unix(0, 0x10), App: true, Closed: 0x40},
			{Seg: 8, Cycle: 6},
		}})
	want = []byte{
		0x56, 0x44, 0x50, 0x4d, 1, 0, 0, 0,
		5, 0, 0, 0, 0, 0, 0, 0,
		9, 0, 0, 0, 0, 0, 0, 0,
		1, 0, 0, 0, 2, 0, 0, 0,
		0, 0x10, 0, 0, 0, 0, 0, 0,
		7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
		0x10, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
		0x40, 0, 0, 0, 0, 0, 0, 0,
		8, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0,
	}
	if !bytes.Equal(m[:len(m)-4], want) {
		t.Errorf("manifest:\n got %x\nwant %x", m[:len(m)-4], want)
	}
	if _, err := decodeManifest(m); err != nil {
		t.Errorf("manifest: %v", err)
	}
	m[4] = 2
	binary.LittleEndian.PutUint32(m[len(m)-4:], crc(m[:len(m)-4]))
	if _, err := decodeManifest(m); !errors.Is(err, ErrVersion) {
		t.Errorf("manifest of version 2: %v", err)
	}

	in := encodeIntent(intent{Seq: 1, Seg: 2, Cycle: 3})
	want = []byte{
		0x56, 0x44, 0x52, 0x42, 1, 0, 0, 0,
		1, 0, 0, 0, 0, 0, 0, 0,
		2, 0, 0, 0, 0, 0, 0, 0,
		3, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 0,
	}
	if !bytes.Equal(in[:36], want) {
		t.Errorf("intent:\n got %x\nwant %x", in[:36], want)
	}
	in[10] ^= 1
	if _, err := decodeIntent(in); !errors.Is(err, ErrInvalid) {
		t.Errorf("damaged intent: %v", err)
	}
}

func recCRC(b []byte) { binary.LittleEndian.PutUint32(b[36:], crc(b[:36])) }

func FuzzDecodeRecHeader(f *testing.F) {
	b := make([]byte, recHeaderSize)
	encodeRecHeader(b, &recHeader{Kind: kindData, Disk: 1, Block: 77, Synced: 4096, Salt: 5, DCRC: 9})
	f.Add(bytes.Clone(b), uint32(5))
	encodeRecHeader(b, &recHeader{Kind: kindZero, Block: maxBlock, Synced: 32, Salt: 5})
	f.Add(bytes.Clone(b), uint32(5))
	f.Add(make([]byte, recHeaderSize), uint32(0))
	f.Add([]byte("VDUR"), uint32(0))
	f.Fuzz(func(t *testing.T, b []byte, salt uint32) {
		h, err := decodeRecHeader(b, salt)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrZeroed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		out := make([]byte, recHeaderSize)
		encodeRecHeader(out, &h)
		if !bytes.Equal(out, b[:recHeaderSize]) {
			t.Fatal("round trip changed the header")
		}
		if h.Salt != salt || h.Block > maxBlock || h.Synced < 0 || (h.Kind == kindZero && h.size() != recHeaderSize) {
			t.Fatalf("accepted %+v", h)
		}
	})
}

func FuzzDecodeManifest(f *testing.F) {
	f.Add(encodeManifest(&manifest{NextSeg: 1, Disks: []int64{1 << 20}}))
	f.Add(encodeManifest(&manifest{Seq: 3, NextSeg: 4, Disks: []int64{1 << 20, 4096},
		Points: []manPoint{{Seg: 1, Cycle: 3, Closed: 100}, {Seg: 3, Cycle: 9, App: true, Sealed: time.Unix(5, 0)}}}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeManifest(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if !bytes.Equal(encodeManifest(m), b) {
			t.Fatal("round trip changed the manifest")
		}
		for i, p := range m.Points {
			if (p.Closed == 0) != (i == len(m.Points)-1) || p.Seg >= m.NextSeg {
				t.Fatalf("accepted point %d: %+v", i, p)
			}
		}
	})
}

func FuzzDecodeIntent(f *testing.F) {
	f.Add(encodeIntent(intent{Seq: 1, Seg: 2, Cycle: 3}))
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := decodeIntent(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if !bytes.Equal(encodeIntent(in), b) {
			t.Fatal("round trip changed the intent")
		}
	})
}

// recSpec is a record for a hand-built segment.
type recSpec struct {
	kind   uint8
	disk   uint16
	block  uint64
	synced int64 // -1: the end of the records before it
	fill   byte
}

const testSalt = 0x5a5a1234

// buildSegment returns a segment file of the given records and where each
// starts.
func buildSegment(no uint64, recs []recSpec) ([]byte, []int64) {
	b := make([]byte, segHeaderSize)
	encodeSegHeader(b, segHeader{Disks: 2, No: no, Cycle: 10, Salt: testSalt})
	var offs []int64
	for _, r := range recs {
		offs = append(offs, int64(len(b)))
		h := recHeader{Kind: r.kind, Disk: r.disk, Block: r.block, Synced: r.synced, Salt: testSalt}
		if r.synced < 0 {
			h.Synced = int64(len(b))
		}
		var payload []byte
		if r.kind == kindData {
			payload = bytes.Repeat([]byte{r.fill}, BlockSize)
			h.DCRC = crc(payload)
		}
		hb := make([]byte, recHeaderSize)
		encodeRecHeader(hb, &h)
		b = append(b, hb...)
		b = append(b, payload...)
	}
	return b, offs
}

func scanStore(t testing.TB) *Store {
	return &Store{disks: []Disk{{Size: 1 << 20}, {Size: 64 << 10}}, log: testLogger(t), dir: "/"}
}

// TestCutTornTail: what a crash can leave at the end of the open segment
// is cut; damage a sync covered is ErrCorrupt, and changes nothing.
func TestCutTornTail(t *testing.T) {
	// Records 0 and 1 were written, then synced (size D = offs[2]); 2 and
	// 3 written after, not synced.
	full, offs := buildSegment(1, []recSpec{
		{kindData, 0, 1, segHeaderSize, 1},
		{kindZero, 1, 2, segHeaderSize, 0},
		{kindData, 0, 3, -1, 3},
		{kindData, 1, 4, -2, 4}, // patched below: synced D
	})
	d := offs[2]
	patchSynced := func(b []byte, at, synced int64) {
		binary.LittleEndian.PutUint64(b[at+16:], uint64(synced))
		recCRC(b[at:])
	}
	patchSynced(full, offs[3], d)
	end := int64(len(full))

	for _, tc := range []struct {
		name    string
		mut     func([]byte) []byte
		closed  int64
		wantEnd int64 // -1: ErrCorrupt
		entries int
	}{
		{"intact", func(b []byte) []byte { return b }, 0, end, 4},
		{"zeroed tail", func(b []byte) []byte { return append(b, make([]byte, 3*BlockSize)...) }, 0, end, 4},
		{"half record", func(b []byte) []byte { return b[:offs[3]+100] }, 0, offs[3], 3},
		{"half header", func(b []byte) []byte { return b[:offs[3]+10] }, 0, offs[3], 3},
		{"torn payload", func(b []byte) []byte { b[offs[3]+recHeaderSize+7] ^= 1; return b }, 0, offs[3], 3},
		{"unsynced kept out of order", func(b []byte) []byte { clear(b[offs[2]:offs[3]]); return b }, 0, offs[2], 2},
		{"record of another segment after", func(b []byte) []byte {
			other := bytes.Clone(b[offs[3]:])
			binary.LittleEndian.PutUint32(other[24:], 1)
			patchSynced(other, 0, 1<<30)
			return append(b[:offs[3]], other...)
		}, 0, offs[3], 3},
		{"damage under a synced record", func(b []byte) []byte { b[offs[1]+3] ^= 1; return b }, 0, -1, 0},
		{"damaged payload before synced records", func(b []byte) []byte { b[offs[0]+recHeaderSize+100] ^= 1; return b }, 0, -1, 0},
		{"zeroed synced record", func(b []byte) []byte { clear(b[offs[1] : offs[1]+recHeaderSize]); return b }, 0, -1, 0},
		{"claims more synced than its offset", func(b []byte) []byte { patchSynced(b, offs[1], offs[1]+1); return b }, 0, -1, 0},
		{"block beyond the disk", func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[offs[1]+8:], 16)
			recCRC(b[offs[1]:])
			return b
		}, 0, -1, 0},
		{"closed intact", func(b []byte) []byte { return b }, end, end, 4},
		{"closed with a torn record", func(b []byte) []byte { b[offs[3]+recHeaderSize+7] ^= 1; return b }, end, -1, 0},
		{"closed shorter than recorded", func(b []byte) []byte { return b[:offs[3]] }, end, -1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMemFS()
			data := tc.mut(bytes.Clone(full))
			f, err := mem.OpenFile("/seg", os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			f.WriteAt(data, 0)
			f.Sync()
			seg, err := scanStore(t).scanSegment(f, "/seg", 1, 10, tc.closed)
			size, _ := f.Size()
			if tc.wantEnd < 0 {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("got %v, want ErrCorrupt", err)
				}
				if size != int64(len(data)) {
					t.Fatalf("file changed to %d bytes", size)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if seg.size != tc.wantEnd || seg.idx.len() != tc.entries {
				t.Fatalf("end %d with %d records, want %d with %d", seg.size, seg.idx.len(), tc.wantEnd, tc.entries)
			}
			if tc.closed == 0 && size != tc.wantEnd {
				t.Fatalf("file is %d bytes, want %d", size, tc.wantEnd)
			}
		})
	}
}

// FuzzScanSegment loads arbitrary bytes after a valid header as the open
// segment: it must not panic, and either refuse (ErrCorrupt) or keep only
// records that verify, cutting the file there.
func FuzzScanSegment(f *testing.F) {
	full, _ := buildSegment(1, []recSpec{{kindData, 0, 1, segHeaderSize, 1}, {kindZero, 1, 2, -1, 0}, {kindData, 0, 3, -1, 3}})
	f.Add(full[segHeaderSize:])
	f.Add(full[segHeaderSize : len(full)-50])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, tail []byte) {
		mem := vfs.NewMemFS()
		file, _ := mem.OpenFile("/seg", os.O_RDWR|os.O_CREATE, 0o600)
		defer file.Close()
		file.WriteAt(append(bytes.Clone(full[:segHeaderSize]), tail...), 0)
		s := &Store{disks: []Disk{{Size: 1 << 20}, {Size: 64 << 10}}, log: slog.New(slog.DiscardHandler), dir: "/"}
		seg, err := s.scanSegment(file, "/seg", 1, 10, 0)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("unexpected error: %v", err)
			}
			return
		}
		if size, _ := file.Size(); size != seg.size {
			t.Fatalf("segment ends at %d, file is %d bytes", seg.size, size)
		}
		rec := make([]byte, dataRecordSize)
		seg.idx.each(func(key uint64, loc int64) error {
			if _, err := seg.readBlock(key, loc, rec); err != nil {
				t.Fatalf("indexed record does not read: %v", err)
			}
			return nil
		})
	})
}
