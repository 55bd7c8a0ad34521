package journal

import (
	"bytes"
	"errors"
	"testing"
)

func FuzzDecodeHeader(f *testing.F) {
	b := make([]byte, HeaderSize)
	encodeHeader(b, &Header{Kind: KindWrite, Disk: 1, LSN: 4096, Cycle: 7, Offset: 8192, Length: 4096, Synced: 32, DCRC: 9})
	f.Add(b)
	encodeHeader(b, &Header{Kind: KindTrim, LSN: 32, Offset: 0, Length: 1 << 30})
	f.Add(bytes.Clone(b))
	f.Add(make([]byte, HeaderSize))
	f.Add([]byte("VDJR"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrZeroed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		// Whatever decodes must encode back to the same bytes.
		out := make([]byte, HeaderSize)
		encodeHeader(out, &h)
		if !bytes.Equal(out, b[:HeaderSize]) {
			t.Fatalf("round trip changed the header")
		}
		if h.PayloadLen() < 0 || h.PayloadLen() > MaxPayload {
			t.Fatalf("payload length %d accepted", h.PayloadLen())
		}
	})
}

func TestRecordGolden(t *testing.T) {
	// The byte layout in doc.go, pinned: a change here is a format change
	// and needs a new version number.
	b := make([]byte, HeaderSize)
	encodeHeader(b, &Header{Kind: KindWrite, Disk: 2, LSN: 0x1122, Cycle: 3, Offset: 0x2000, Length: 0x1000, Synced: 0x20, DCRC: 0xdeadbeef})
	want := []byte{
		0x56, 0x44, 0x4a, 0x52, 1, 1, 2, 0,
		0x22, 0x11, 0, 0, 0, 0, 0, 0,
		3, 0, 0, 0, 0, 0, 0, 0,
		0, 0x20, 0, 0, 0, 0, 0, 0,
		0, 0x10, 0, 0, 0, 0, 0, 0,
		0x20, 0, 0, 0, 0, 0, 0, 0,
		0xef, 0xbe, 0xad, 0xde,
	}
	if !bytes.Equal(b[:52], want) {
		t.Fatalf("layout changed:\n got %x\nwant %x", b[:52], want)
	}
	for _, tc := range []struct {
		name string
		mut  func([]byte)
		want error
	}{
		{"zeroed", func(b []byte) { clear(b) }, ErrZeroed},
		{"bad magic", func(b []byte) { b[0] ^= 1 }, ErrInvalid},
		{"bad crc", func(b []byte) { b[30] ^= 1 }, ErrInvalid},
		{"future version", func(b []byte) { b[4] = 9; encodeCRC(b) }, ErrVersion},
		{"unknown kind", func(b []byte) { b[5] = 99; encodeCRC(b) }, ErrInvalid},
	} {
		c := bytes.Clone(b)
		tc.mut(c)
		if _, err := decodeHeader(c); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}

func encodeCRC(b []byte) {
	v := crc(b[:52])
	b[52], b[53], b[54], b[55] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
