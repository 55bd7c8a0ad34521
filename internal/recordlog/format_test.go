package recordlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// testFormat is a record header of 24 bytes:
//
//	0 magic "TSTR" | 4 version | 5 kind | 6 payload length u16 |
//	8 synced u64 | 16 payload CRC32C | 20 CRC32C of bytes 0..19
var testFormat = Format{Name: "test record", Magic: 0x52545354, Version: 3, Size: 24, ZeroedEnd: true}

// TestPutGolden pins the frame in doc.go: magic little endian at 0, version
// at 4, the caller's fields untouched, the CRC32C of the rest at the end.
func TestPutGolden(t *testing.T) {
	b := make([]byte, testFormat.Size)
	b[5] = 0xaa
	binary.LittleEndian.PutUint64(b[8:], 0x0102030405060708)
	testFormat.Put(b)
	want := []byte{
		'T', 'S', 'T', 'R', 3, 0xaa, 0, 0,
		8, 7, 6, 5, 4, 3, 2, 1,
		0, 0, 0, 0,
	}
	if !bytes.Equal(b[:20], want) {
		t.Fatalf("frame:\n got %x\nwant %x", b[:20], want)
	}
	// CRC32C test vector: "123456789" is 0xe3069283.
	if got := Checksum([]byte("123456789")); got != 0xe3069283 {
		t.Fatalf("Checksum is %#x, not CRC32C", got)
	}
	if got, want := binary.LittleEndian.Uint32(b[20:]), Checksum(b[:20]); got != want {
		t.Fatalf("checksum %#x, want %#x", got, want)
	}
	if err := testFormat.Check(b); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	good := make([]byte, testFormat.Size)
	good[5] = 1
	testFormat.Put(good)
	reseal := func(b []byte) { binary.LittleEndian.PutUint32(b[20:], Checksum(b[:20])) }
	header := testFormat
	header.ZeroedEnd = false
	for _, tc := range []struct {
		name string
		f    Format
		mut  func([]byte) []byte
		want error
	}{
		{"good", testFormat, func(b []byte) []byte { return b }, nil},
		{"longer buffer", testFormat, func(b []byte) []byte { return append(b, 1, 2, 3) }, nil},
		{"short", testFormat, func(b []byte) []byte { return b[:23] }, ErrInvalid},
		{"empty", testFormat, func(b []byte) []byte { return nil }, ErrInvalid},
		{"zeroed record", testFormat, func(b []byte) []byte { clear(b); return b }, ErrZeroed},
		{"zeroed header", header, func(b []byte) []byte { clear(b); return b }, ErrInvalid},
		{"bad magic", testFormat, func(b []byte) []byte { b[0] ^= 1; return b }, ErrInvalid},
		{"bad magic, resealed", testFormat, func(b []byte) []byte { b[3] ^= 1; reseal(b); return b }, ErrInvalid},
		{"bad checksum", testFormat, func(b []byte) []byte { b[9] ^= 1; return b }, ErrInvalid},
		{"checksum itself", testFormat, func(b []byte) []byte { b[22] ^= 1; return b }, ErrInvalid},
		{"older version", testFormat, func(b []byte) []byte { b[4] = 2; reseal(b); return b }, ErrVersion},
		{"newer version", testFormat, func(b []byte) []byte { b[4] = 4; reseal(b); return b }, ErrVersion},
		{"version, not resealed", testFormat, func(b []byte) []byte { b[4] = 4; return b }, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.f.Check(tc.mut(bytes.Clone(good)))
			if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestCheckPayload(t *testing.T) {
	p := []byte("payload")
	sum := Checksum(p)
	for _, tc := range []struct {
		name    string
		payload []byte
		size    int64
		sum     uint32
		want    error
	}{
		{"good", p, 7, sum, nil},
		{"empty", nil, 0, Checksum(nil), nil},
		{"short", p[:6], 7, sum, ErrInvalid},
		{"long", p, 6, sum, ErrInvalid},
		{"checksum", p, 7, sum ^ 1, ErrInvalid},
	} {
		err := CheckPayload(tc.payload, tc.size, tc.sum)
		if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}

func TestAllZero(t *testing.T) {
	if !AllZero(nil) || !AllZero(make([]byte, 9)) || AllZero([]byte{0, 0, 1}) {
		t.Fatal("AllZero")
	}
}

// FuzzCheck: Check never panics, fails only with its three errors, and
// accepts only frames that Put would write the same way.
func FuzzCheck(f *testing.F) {
	b := make([]byte, testFormat.Size)
	b[5] = 7
	testFormat.Put(b)
	f.Add(b)
	f.Add(make([]byte, testFormat.Size))
	f.Add([]byte("TSTR"))
	f.Fuzz(func(t *testing.T, b []byte) {
		err := testFormat.Check(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrZeroed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		out := bytes.Clone(b[:testFormat.Size])
		testFormat.Put(out)
		if !bytes.Equal(out, b[:testFormat.Size]) {
			t.Fatal("Put changed a frame Check accepted")
		}
	})
}
