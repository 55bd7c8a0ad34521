package blockdev

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
)

func TestDecodeRequest(t *testing.T) {
	good := []byte{
		0x25, 0x60, 0x95, 0x13, // magic
		0x00, 0x03, // flags FUA|NO_HOLE
		0x00, 0x06, // WRITE_ZEROES
		1, 2, 3, 4, 5, 6, 7, 8, // handle
		0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
		0, 1, 0, 0, // length 65536
	}
	tests := []struct {
		name    string
		in      []byte
		want    request
		wantErr error
	}{
		{"write zeroes", good, request{RequestMagic: nbdRequestMagic, CommandFlags: 3, Type: 6, Handle: 0x0102030405060708, Offset: 4096, Length: 65536}, nil},
		{"trailing bytes ignored", append(append([]byte{}, good...), 0xff, 0xff), request{RequestMagic: nbdRequestMagic, CommandFlags: 3, Type: 6, Handle: 0x0102030405060708, Offset: 4096, Length: 65536}, nil},
		{"short", good[:27], request{}, errShortRequest},
		{"empty", nil, request{}, errShortRequest},
		{"reply magic", append([]byte{0x67, 0x44, 0x66, 0x98}, good[4:]...), request{}, ErrBadRequestMagic},
		{"zero magic", make([]byte, 28), request{}, ErrBadRequestMagic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeRequest(tt.in)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if err == nil && got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	// Round trip through the encoder.
	r, _ := decodeRequest(good)
	if b := encodeRequest(nil, r); string(b) != string(good) {
		t.Fatalf("encode(decode(x)) = % x, want % x", b, good)
	}
}

func TestCheckRequest(t *testing.T) {
	const size = 1 << 20
	rw := exportLimits{size: size, maxRequest: 64 << 10}
	ro := exportLimits{size: size, maxRequest: 64 << 10, readOnly: true}
	req := func(typ, flags uint16, off uint64, n uint32) request {
		return request{RequestMagic: nbdRequestMagic, Type: typ, CommandFlags: flags, Offset: off, Length: n}
	}
	tests := []struct {
		name string
		r    request
		e    exportLimits
		want uint32
	}{
		{"read", req(nbdCmdRead, 0, 0, 4096), rw, 0},
		{"read last byte", req(nbdCmdRead, 0, size-1, 1), rw, 0},
		{"read unaligned", req(nbdCmdRead, 0, 3, 5), rw, 0},
		{"read past end", req(nbdCmdRead, 0, size-512, 1024), rw, nbdEINVAL},
		{"read at end", req(nbdCmdRead, 0, size, 1), rw, nbdEINVAL},
		{"read offset wraps", req(nbdCmdRead, 0, ^uint64(0)-10, 4096), rw, nbdEINVAL},
		{"read too long", req(nbdCmdRead, 0, 0, 64<<10+1), rw, nbdEOVERFLOW},
		{"read max", req(nbdCmdRead, 0, 0, 64<<10), rw, 0},
		{"read zero length", req(nbdCmdRead, 0, 0, 0), rw, nbdEINVAL},
		{"read FUA tolerated", req(nbdCmdRead, nbdCmdFlagFUA, 0, 512), rw, 0},
		{"read NO_HOLE", req(nbdCmdRead, nbdCmdFlagNoHole, 0, 512), rw, nbdEINVAL},
		{"read DF", req(nbdCmdRead, 1<<2, 0, 512), rw, nbdEINVAL},
		{"read on read-only", req(nbdCmdRead, 0, 0, 512), ro, 0},
		{"write", req(nbdCmdWrite, nbdCmdFlagFUA, 512, 512), rw, 0},
		{"write past end", req(nbdCmdWrite, 0, size, 512), rw, nbdENOSPC},
		{"write offset wraps", req(nbdCmdWrite, 0, ^uint64(0), 2), rw, nbdENOSPC},
		{"write too long", req(nbdCmdWrite, 0, 0, 1<<31), rw, nbdEOVERFLOW},
		{"write read-only", req(nbdCmdWrite, 0, 0, 512), ro, nbdEPERM},
		{"write FUA read-only", req(nbdCmdWrite, nbdCmdFlagFUA, 0, 512), ro, nbdEPERM},
		{"write NO_HOLE", req(nbdCmdWrite, nbdCmdFlagNoHole, 0, 512), rw, nbdEINVAL},
		{"flush", req(nbdCmdFlush, 0, 0, 0), rw, 0},
		{"flush FUA", req(nbdCmdFlush, nbdCmdFlagFUA, 0, 0), rw, 0},
		{"flush with offset", req(nbdCmdFlush, 0, 512, 0), rw, nbdEINVAL},
		{"flush with length", req(nbdCmdFlush, 0, 0, 512), rw, nbdEINVAL},
		{"flush bad flag", req(nbdCmdFlush, nbdCmdFlagNoHole, 0, 0), rw, nbdEINVAL},
		{"trim larger than max request", req(nbdCmdTrim, 0, 0, size), rw, 0},
		{"trim past end", req(nbdCmdTrim, 0, 4096, size), rw, nbdEINVAL},
		{"trim read-only", req(nbdCmdTrim, 0, 0, 512), ro, nbdEPERM},
		{"trim FUA read-only", req(nbdCmdTrim, nbdCmdFlagFUA, 0, 512), ro, nbdEPERM},
		{"trim zero length", req(nbdCmdTrim, 0, 0, 0), rw, nbdEINVAL},
		{"zeroes NO_HOLE FUA", req(nbdCmdWriteZeroes, nbdCmdFlagNoHole|nbdCmdFlagFUA, 0, size), rw, 0},
		{"zeroes past end", req(nbdCmdWriteZeroes, 0, 1, size), rw, nbdENOSPC},
		{"zeroes read-only", req(nbdCmdWriteZeroes, 0, 0, 512), ro, nbdEPERM},
		{"zeroes FAST_ZERO not offered", req(nbdCmdWriteZeroes, 1<<4, 0, 512), rw, nbdEINVAL},
		{"cache not offered", req(5, 0, 0, 512), rw, nbdEINVAL},
		{"block status not offered", req(7, 0, 0, 512), rw, nbdEINVAL},
		{"unknown command", req(0x4242, 0, 0, 512), rw, nbdEINVAL},
		{"disc", req(nbdCmdDisc, 0, 0, 0), rw, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := checkRequest(tt.r, tt.e); got != tt.want {
				t.Fatalf("checkRequest = %s, want %s", nbdErrName(got), nbdErrName(tt.want))
			}
		})
	}
}

func TestDecodeInfoRequest(t *testing.T) {
	enc := func(name string, infos ...uint16) []byte {
		b := []byte{byte(len(name) >> 24), byte(len(name) >> 16), byte(len(name) >> 8), byte(len(name))}
		b = append(b, name...)
		b = append(b, byte(len(infos)>>8), byte(len(infos)))
		for _, i := range infos {
			b = append(b, byte(i>>8), byte(i))
		}
		return b
	}
	tests := []struct {
		name string
		in   []byte
		want string
		n    int
		ok   bool
	}{
		{"name and infos", enc("vm1/disk0", 1, 2, 3), "vm1/disk0", 3, true},
		{"default name", enc(""), "", 0, true},
		{"empty", nil, "", 0, false},
		{"name longer than data", enc("abc")[:5], "", 0, false},
		{"missing count", enc("abc")[:7], "", 0, false},
		{"count too big", enc("abc", 1, 2)[:11], "", 0, false},
		{"trailing junk", append(enc("abc", 1), 0), "", 0, false},
		{"huge name length", []byte{0xff, 0xff, 0xff, 0xff, 0, 0}, "", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeInfoRequest(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok=%v", err, tt.ok)
			}
			if tt.ok && (got.name != tt.want || len(got.infos) != tt.n) {
				t.Fatalf("got %+v", got)
			}
		})
	}
}

func TestNBDErrno(t *testing.T) {
	tests := []struct {
		err  error
		want uint32
	}{
		{syscall.ENOSPC, nbdENOSPC},
		{fmt.Errorf("journal: append: %w", syscall.ENOSPC), nbdENOSPC},
		{syscall.EDQUOT, nbdENOSPC},
		{fmt.Errorf("x: %w", ErrOutOfRange), nbdEINVAL},
		{ErrReadOnly, nbdEPERM},
		{syscall.EROFS, nbdEPERM},
		{errors.New("x"), nbdEIO},
		{syscall.EIO, nbdEIO},
	}
	for _, tt := range tests {
		if got := nbdErrno(tt.err); got != tt.want {
			t.Errorf("nbdErrno(%v) = %s, want %s", tt.err, nbdErrName(got), nbdErrName(tt.want))
		}
	}
}

func TestNBDBufPool(t *testing.T) {
	for _, tt := range []struct{ n, cap int }{{1, 4096}, {4096, 4096}, {4097, 8192}, {1 << 20, 1 << 20}, {1<<20 + 1, 2 << 20}, {32 << 20, 32 << 20}} {
		p := getNBDBuf(tt.n)
		if len(*p) != tt.n || cap(*p) != tt.cap {
			t.Errorf("getNBDBuf(%d): len %d cap %d, want cap %d", tt.n, len(*p), cap(*p), tt.cap)
		}
		putNBDBuf(p)
	}
}

func TestTransmissionFlags(t *testing.T) {
	rw := transmissionFlags(false, false)
	for _, f := range []uint16{nbdFlagHasFlags, nbdFlagSendFlush, nbdFlagSendFUA, nbdFlagSendTrim, nbdFlagSendWriteZeroes, nbdFlagCanMultiConn} {
		if rw&f == 0 {
			t.Errorf("read-write flags %#x lack %#x", rw, f)
		}
	}
	if rw&nbdFlagSendDF != 0 {
		t.Errorf("flags %#x offer DF without structured replies", rw)
	}
	if f := transmissionFlags(false, true); f != rw|nbdFlagSendDF {
		t.Errorf("flags with structured replies %#x, want %#x", f, rw|nbdFlagSendDF)
	}
	if rw&nbdFlagReadOnly != 0 {
		t.Errorf("read-write flags %#x say read-only", rw)
	}
	ro := transmissionFlags(true, false)
	if ro&(nbdFlagSendFUA|nbdFlagSendTrim|nbdFlagSendWriteZeroes|nbdFlagSendFlush) != 0 || ro&nbdFlagReadOnly == 0 || ro&nbdFlagHasFlags == 0 {
		t.Errorf("read-only flags %#x", ro)
	}
}
