// Package statefile encodes the small JSON state files of vdrepl (the
// replica's replica.json and registry, the shipper's progress) in one
// envelope, so that each has a format name, a version and a checksum:
//
//	{"format":"NAME","version":N,"crc32c":"8 hex digits","body":{...}}
//
// The CRC32C covers the exact bytes of body as written; the envelope is
// assembled by hand so that they are json.Marshal's output. Writing the
// file atomically is the caller's (vfs.WriteFileAtomic). It imports nothing
// of vdrepl's.
package statefile

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
)

// ErrInvalid is a file that is not the expected state: not JSON, another
// format or version, or a checksum mismatch.
var ErrInvalid = errors.New("statefile: invalid state file")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type envelope struct {
	Format  string          `json:"format"`
	Version int             `json:"version"`
	CRC     string          `json:"crc32c"`
	Body    json.RawMessage `json:"body"`
}

// Encode renders v as the body of a state file of format and version.
func Encode(format string, version int, v any) ([]byte, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	out := fmt.Appendf(nil, `{"format":%q,"version":%d,"crc32c":"%08x","body":`, format, version, crc32.Checksum(body, castagnoli))
	out = append(out, body...)
	return append(out, "}\n"...), nil
}

// Decode checks data's envelope against format and version and its
// checksum, then decodes the body into v. Errors wrap ErrInvalid.
func Decode(format string, version int, data []byte, v any) error {
	var env envelope
	if err := json.Unmarshal(data, &env); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if env.Format != format {
		return fmt.Errorf("%w: format %q, want %q", ErrInvalid, env.Format, format)
	}
	if env.Version != version {
		return fmt.Errorf("%w: version %d not supported (this vdrepl reads %d)", ErrInvalid, env.Version, version)
	}
	crc, err := strconv.ParseUint(env.CRC, 16, 32)
	if err != nil || uint32(crc) != crc32.Checksum(env.Body, castagnoli) {
		return fmt.Errorf("%w: checksum mismatch", ErrInvalid)
	}
	if err := json.Unmarshal(env.Body, v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}
