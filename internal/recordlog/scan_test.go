package recordlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
)

// testHeader is a decoded testFormat header.
type testHeader struct {
	kind   uint8 // 1 data, 2 mark (no payload)
	n      int64
	synced int64
	dcrc   uint32
}

// testPrefix stands for a segment header: records start after it.
const testPrefix = 8

func testRecord(kind uint8, payload []byte, synced int64) []byte {
	b := make([]byte, testFormat.Size, testFormat.Size+len(payload))
	b[5] = kind
	binary.LittleEndian.PutUint16(b[6:], uint16(len(payload)))
	binary.LittleEndian.PutUint64(b[8:], uint64(synced))
	binary.LittleEndian.PutUint32(b[16:], Checksum(payload))
	testFormat.Put(b)
	return append(b, payload...)
}

func decodeTest(b []byte) (testHeader, error) {
	if err := testFormat.Check(b); err != nil {
		return testHeader{}, err
	}
	h := testHeader{
		kind:   b[5],
		n:      int64(binary.LittleEndian.Uint16(b[6:])),
		synced: int64(binary.LittleEndian.Uint64(b[8:])),
		dcrc:   binary.LittleEndian.Uint32(b[16:]),
	}
	if h.kind != 1 && h.kind != 2 || h.kind == 2 && h.n != 0 {
		return h, fmt.Errorf("%w: kind %d of %d bytes", ErrInvalid, h.kind, h.n)
	}
	return h, nil
}

// scanned is what a test scanner saw.
type scanned struct {
	at        []int64
	payloads  [][]byte
	maxSynced int64
}

func testScanner(got *scanned, readAhead int, want bool) *Scanner[testHeader] {
	return &Scanner[testHeader]{
		HeaderSize: testFormat.Size,
		ReadAhead:  readAhead,
		Header: func(b []byte, _ int64) (testHeader, int64, bool, error) {
			h, err := decodeTest(b)
			return h, h.n, want, err
		},
		Record: func(h *testHeader, at int64, p []byte) error {
			if p != nil {
				if err := CheckPayload(p, h.n, h.dcrc); err != nil {
					return err
				}
			}
			got.at = append(got.at, at)
			got.payloads = append(got.payloads, bytes.Clone(p))
			got.maxSynced = max(got.maxSynced, h.synced)
			return nil
		},
	}
}

// testSegment is a prefix and three records: 100 bytes of data, a mark,
// 3000 bytes of data. offs are where they start.
func testSegment() (seg []byte, offs []int64) {
	seg = bytes.Repeat([]byte{0xee}, testPrefix)
	for _, r := range []struct {
		kind uint8
		p    []byte
	}{
		{1, bytes.Repeat([]byte{1}, 100)},
		{2, nil},
		{1, bytes.Repeat([]byte{3}, 3000)},
	} {
		offs = append(offs, int64(len(seg)))
		seg = append(seg, testRecord(r.kind, r.p, int64(len(seg)))...)
	}
	return seg, offs
}

// readerAt counts what is read and fails reads at or past failAt.
type readerAt struct {
	b      []byte
	failAt int64
	read   int64
}

var errRead = errors.New("test: read failed")

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	if r.failAt > 0 && off+int64(len(p)) > r.failAt {
		return 0, errRead
	}
	r.read += int64(len(p))
	return bytes.NewReader(r.b).ReadAt(p, off)
}

func TestScan(t *testing.T) {
	full, offs := testSegment()
	end := int64(len(full))
	errBoom := errors.New("test: consumer failed")
	for _, tc := range []struct {
		name     string
		mut      func([]byte) []byte
		scanEnd  int64 // 0: the file's end
		failAt   int64
		record   error // returned by Record for the second record
		wantEnd  int64
		wantN    int
		wantTorn error
		wantErr  error
	}{
		{name: "intact", wantEnd: end, wantN: 3},
		{name: "empty", mut: func(b []byte) []byte { return b[:testPrefix] }, wantEnd: testPrefix},
		{name: "zeroed tail", mut: func(b []byte) []byte { return append(b, make([]byte, 100)...) }, wantEnd: end, wantN: 3, wantTorn: ErrZeroed},
		{name: "stray bytes", mut: func(b []byte) []byte { return append(b, 1, 2, 3) }, wantEnd: end, wantN: 3, wantTorn: ErrInvalid},
		{name: "half header", mut: func(b []byte) []byte { return b[:offs[2]+10] }, wantEnd: offs[2], wantN: 2, wantTorn: ErrInvalid},
		{name: "half payload", mut: func(b []byte) []byte { return b[:end-1] }, wantEnd: offs[2], wantN: 2, wantTorn: ErrInvalid},
		{name: "torn header", mut: func(b []byte) []byte { b[offs[1]+9] ^= 1; return b }, wantEnd: offs[1], wantN: 1, wantTorn: ErrInvalid},
		{name: "torn payload", mut: func(b []byte) []byte { b[offs[2]+30] ^= 1; return b }, wantEnd: offs[2], wantN: 2, wantTorn: ErrInvalid},
		{name: "newer version", mut: func(b []byte) []byte {
			b[offs[1]+4] = 9
			binary.LittleEndian.PutUint32(b[offs[1]+20:], Checksum(b[offs[1]:offs[1]+20]))
			return b
		}, wantEnd: offs[1], wantN: 1, wantTorn: ErrVersion},
		{name: "closed before the file's end", mut: func(b []byte) []byte { return append(b, 9, 9, 9) }, scanEnd: end, wantEnd: end, wantN: 3},
		{name: "consumer error", record: errBoom, wantEnd: offs[1], wantN: 1, wantErr: errBoom},
		{name: "consumer says torn", record: ErrInvalid, wantEnd: offs[1], wantN: 1, wantTorn: ErrInvalid},
		{name: "read error", failAt: offs[2] + 100, wantEnd: offs[2], wantN: 2, wantErr: errRead},
	} {
		for _, ra := range []int{0, 64, 1 << 20} {
			t.Run(fmt.Sprintf("%s/readahead=%d", tc.name, ra), func(t *testing.T) {
				b := bytes.Clone(full)
				if tc.mut != nil {
					b = tc.mut(b)
				}
				scanEnd := tc.scanEnd
				if scanEnd == 0 {
					scanEnd = int64(len(b))
				}
				var got scanned
				s := testScanner(&got, ra, true)
				if tc.record != nil {
					rec := s.Record
					s.Record = func(h *testHeader, at int64, p []byte) error {
						if at == offs[1] {
							return tc.record
						}
						return rec(h, at, p)
					}
				}
				res, err := s.Scan(&readerAt{b: b, failAt: tc.failAt}, testPrefix, scanEnd)
				if tc.wantErr == nil && err != nil || !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				if tc.wantTorn == nil && res.Torn != nil || !errors.Is(res.Torn, tc.wantTorn) {
					t.Fatalf("torn %v, want %v", res.Torn, tc.wantTorn)
				}
				wantEnd, wantN := tc.wantEnd, tc.wantN
				if tc.failAt > 0 && ra == 1<<20 {
					// The first read-ahead takes the whole file, and fails.
					wantEnd, wantN = testPrefix, 0
				}
				if res.End != wantEnd || len(got.at) != wantN {
					t.Fatalf("end %d after %d records, want %d after %d", res.End, len(got.at), wantEnd, wantN)
				}
				for i, at := range got.at {
					if at != offs[i] || !bytes.Equal(got.payloads[i], full[at+24:at+24+int64(len(got.payloads[i]))]) || i != 1 && len(got.payloads[i]) == 0 {
						t.Fatalf("record %d at %d, payload of %d bytes", i, at, len(got.payloads[i]))
					}
				}
			})
		}
	}
}

// TestScanSkipsPayloads: without read-ahead, payloads the decoder does not
// want are not read at all.
func TestScanSkipsPayloads(t *testing.T) {
	full, _ := testSegment()
	r := &readerAt{b: full}
	var got scanned
	res, err := testScanner(&got, 0, false).Scan(r, testPrefix, int64(len(full)))
	if err != nil || res.Torn != nil || res.End != int64(len(full)) || len(got.at) != 3 {
		t.Fatalf("scan: %+v, %v, %d records", res, err, len(got.at))
	}
	for i, p := range got.payloads {
		if p != nil {
			t.Fatalf("record %d: payload passed though not wanted", i)
		}
	}
	if r.read != 3*int64(testFormat.Size) {
		t.Fatalf("read %d bytes, want only the 3 headers", r.read)
	}
}

func TestSearch(t *testing.T) {
	rec := testRecord(2, nil, 77)
	// Headers at 10 and 500, a cut one at the end, magic bytes in between
	// with nothing valid after them; one straddling the read chunk.
	b := make([]byte, searchChunk+200)
	copy(b[10:], rec)
	copy(b[300:], rec[:4])
	copy(b[500:], rec)
	copy(b[searchChunk-5:], rec)
	copy(b[len(b)-10:], rec)
	var at []int64
	all := func(a int64, h []byte) bool {
		if len(h) != testFormat.Size || !bytes.Equal(h[:4], rec[:4]) {
			t.Fatalf("header at %d: %x", a, h)
		}
		at = append(at, a)
		return true
	}
	for _, tc := range []struct {
		after, end int64
		fn         func(int64, []byte) bool
		want       []int64
	}{
		{0, int64(len(b)), all, []int64{10, 300, 500, searchChunk - 5}},
		{10, int64(len(b)), all, []int64{300, 500, searchChunk - 5}},
		{9, int64(len(b)), all, []int64{10, 300, 500, searchChunk - 5}},
		{0, 500 + 23, all, []int64{10, 300}},
		{0, 500 + 24, all, []int64{10, 300, 500}},
		{0, int64(len(b)), func(a int64, h []byte) bool { at = append(at, a); return a < 300 }, []int64{10, 300}},
		{int64(len(b)) - 20, int64(len(b)), all, nil},
	} {
		at = nil
		if err := testFormat.Search(bytes.NewReader(b), tc.after, tc.end, tc.fn); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(at) != fmt.Sprint(tc.want) {
			t.Errorf("Search(%d, %d) found %v, want %v", tc.after, tc.end, at, tc.want)
		}
	}
	if err := testFormat.Search(&readerAt{b: b, failAt: 100}, 0, int64(len(b)), all); !errors.Is(err, errRead) {
		t.Fatalf("read error: %v", err)
	}
}

// file is a segment file for CutTornTail.
type file struct {
	b                  []byte
	synced             bool
	truncErr, syncErr  error
	truncated, didSync int
}

func (f *file) Truncate(n int64) error {
	if f.truncErr != nil {
		return f.truncErr
	}
	f.truncated++
	f.b, f.synced = f.b[:n], false
	return nil
}

func (f *file) Sync() error {
	if f.syncErr != nil {
		return f.syncErr
	}
	f.didSync++
	f.synced = true
	return nil
}

func TestCutTornTail(t *testing.T) {
	why := fmt.Errorf("%w: test damage", ErrInvalid)
	errIO := errors.New("test: I/O error")
	for _, tc := range []struct {
		name           string
		good, durable  int64
		why            error
		truncErr, sErr error
		want           error
		wantSize       int
	}{
		{name: "clean end", good: 100, durable: 100, wantSize: 200},
		{name: "clean end below durable", good: 50, durable: 100, wantSize: 200},
		{name: "torn past durable", good: 120, durable: 100, why: why, wantSize: 120},
		{name: "torn at durable", good: 100, durable: 100, why: ErrZeroed, wantSize: 100},
		{name: "torn at start", good: 0, durable: 0, why: why, wantSize: 0},
		{name: "corrupt middle", good: 99, durable: 100, why: why, want: ErrCorrupt, wantSize: 200},
		{name: "truncate fails", good: 120, durable: 100, why: why, truncErr: errIO, want: errIO, wantSize: 200},
		{name: "sync fails", good: 120, durable: 100, why: why, sErr: errIO, want: errIO, wantSize: 120},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &file{b: make([]byte, 200), truncErr: tc.truncErr, syncErr: tc.sErr}
			err := CutTornTail(f, tc.good, tc.durable, tc.why)
			if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if errors.Is(err, ErrCorrupt) && !errors.Is(err, tc.why) {
				t.Fatalf("%v does not wrap why the scan stopped", err)
			}
			if len(f.b) != tc.wantSize {
				t.Fatalf("file of %d bytes, want %d", len(f.b), tc.wantSize)
			}
			if cut := len(f.b) != 200; cut && err == nil && !f.synced {
				t.Fatal("cut but not synced")
			}
			if tc.why == nil && (f.truncated != 0 || f.didSync != 0) {
				t.Fatal("touched a segment with no torn tail")
			}
		})
	}
}

// FuzzScan scans arbitrary bytes after the prefix: Scan must not panic,
// must stop inside the segment, and what it kept must scan again cleanly
// to the same records once CutTornTail has cut the rest.
func FuzzScan(f *testing.F) {
	full, offs := testSegment()
	f.Add(full[testPrefix:], 0)
	f.Add(full[testPrefix:offs[2]+7], 64)
	f.Add(append(bytes.Clone(full[testPrefix:]), make([]byte, 30)...), 1<<20)
	f.Add([]byte{}, 0)
	f.Fuzz(func(t *testing.T, tail []byte, readAhead int) {
		readAhead = max(0, min(readAhead, 1<<16))
		b := append(bytes.Clone(full[:testPrefix]), tail...)
		var got scanned
		res, err := testScanner(&got, readAhead, true).Scan(bytes.NewReader(b), testPrefix, int64(len(b)))
		if err != nil {
			t.Fatalf("scan of bytes in memory: %v", err)
		}
		if res.End < testPrefix || res.End > int64(len(b)) || (res.Torn == nil) != (res.End == int64(len(b))) {
			t.Fatalf("scan ended at %d of %d, torn %v", res.End, len(b), res.Torn)
		}
		if res.Torn != nil && !errors.Is(res.Torn, ErrZeroed) && !errors.Is(res.Torn, ErrInvalid) && !errors.Is(res.Torn, ErrVersion) {
			t.Fatalf("unexpected torn class: %v", res.Torn)
		}
		seg := &file{b: b}
		if err := CutTornTail(seg, res.End, 0, res.Torn); err != nil {
			t.Fatal(err)
		}
		var again scanned
		res2, err := testScanner(&again, 0, true).Scan(bytes.NewReader(seg.b), testPrefix, int64(len(seg.b)))
		if err != nil || res2.Torn != nil || res2.End != res.End || fmt.Sprint(again.at) != fmt.Sprint(got.at) {
			t.Fatalf("after the cut: %+v %v, records at %v, before %v", res2, err, again.at, got.at)
		}
	})
}

var _ io.ReaderAt = (*readerAt)(nil)
