package apply

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// Receiving a chunk's body, and telling a connection that gave out under it
// from a chunk that arrived whole but damaged.

// readChunk reads body into buf until the body ends (io.EOF: all of it
// arrived) or buf is full (nil), and returns what it read, the CRC32C of
// that, computed a piece at a time as the pieces arrive (while they are in
// the CPU's cache, which halves the checksum's cost against a pass over
// the whole chunk after), and the error that ended it: any other is a body
// that stopped short (cutReason).
func readChunk(body io.Reader, buf []byte) (int, uint32, error) {
	const piece = 256 << 10
	var crc uint32
	n := 0
	for n < len(buf) {
		m, err := body.Read(buf[n:min(n+piece, len(buf))])
		crc = wire.UpdateCRC(crc, buf[n:n+m])
		n += m
		if err != nil {
			return n, crc, err
		}
	}
	return n, crc, nil
}

// cutError is a chunk whose body stopped before its end: the connection
// was closed, reset or timed out while it was sent (net/http reports a
// body shorter than its Content-Length as io.ErrUnexpectedEOF). Nothing
// of it is stored, and it is not corruption: it unwraps to the
// OffsetError that tells the primary where to resume (wire code
// "offset"), as the chunk's own answer or the next request's.
type cutError struct {
	id       string
	off      int64 // the chunk's offset in the upload
	received int   // bytes of its body that arrived
	reason   string
	err      error // what ended the body
	staged   int64 // the upload's staged offset: where the primary resumes
}

func (e *cutError) Error() string {
	return fmt.Sprintf("apply: upload of %s cut after %d bytes of the chunk at offset %d: %s (%v); resume at %d",
		e.id, e.received, e.off, e.reason, e.err, e.staged)
}

func (e *cutError) Unwrap() []error {
	return []error{&OffsetError{Offset: e.staged, Got: e.off}, e.err}
}

// cutReason says how a chunk body read failed if the connection gave out
// under it: "connection closed" or "connection timed out"; "" for any
// other error.
func cutReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "connection timed out"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EPIPE):
		return "connection closed"
	}
	return ""
}

// cut reports a chunk of upload u at off whose body stopped after n bytes
// because of err.
func (v *vm) cut(u uploadID, off int64, n int, err error) error {
	staged := off
	if up, uerr := v.uploadOffset(u); uerr == nil {
		staged = up.Offset
	}
	cerr := &cutError{id: u.id, off: off, received: n, reason: cutReason(err), err: err, staged: staged}
	v.s.log.Warn("upload chunk cut short, not stored; the primary resumes", "vm", v.name, "upload", u.id, "err", cerr)
	return cerr
}
