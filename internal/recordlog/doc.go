// Package recordlog is the framing that vdrepl's append-only logs share (the
// journal's segments and the snapshot store's undo segments): a fixed-size
// header with a magic, a version and a checksum, records back to back after
// a segment header, the scan that reads them, and the one function that cuts
// the torn tail a crash leaves at a log's end. It imports nothing of
// vdrepl's; each log format describes itself with a Format and keeps its own
// fields, kinds and rules.
//
// # Frame
//
// Every header a Format describes (a segment header, a record header, a
// small state file) is Size bytes:
//
//	offset  size      field
//	0       4         magic, little endian (e.g. "VDJR" is 0x524a4456)
//	4       1         version
//	5       Size-9    the format's own fields, little endian
//	Size-4  4         CRC32C (Castagnoli) of bytes 0..Size-5, little endian
//
// Check verifies a frame in this order: length, all zero (only for a
// Format whose ZeroedEnd is set: ErrZeroed), magic, checksum (ErrInvalid),
// version (ErrVersion). The version is checked after the checksum, so a
// damaged frame is never mistaken for one of another version. A record's
// payload, if it has one, follows its header; the header carries the
// payload's CRC32C at a place of the format's choosing, checked by
// CheckPayload.
//
// # Segment
//
//	| segment header | record | record | ... | end of file
//	                 ^ start                   ^ end
//
// Records lie back to back from start and never span segments. A record is
// its header and the payload length its header says. Scan reads them in
// order until end, or until the first that does not verify: that one, and
// all after it, is the tail that Result.Torn explains.
//
// # Torn tail
//
// Records are appended and synced later, so after a crash the end of the
// last segment may hold half-written records, zeroes, or records kept out of
// order; none of it was promised durable. Each record carries how much of
// its log was known synced when it was written, so the log knows a durable
// offset: the largest such value of any record that verifies, before the
// bad one or after it (Format.Search finds headers past damage by their
// magic). CutTornTail then decides:
//
//   - the first bad record lies at or past the durable offset: it is a torn
//     tail (ErrZeroed, ErrInvalid or ErrVersion from the scan); the file is
//     truncated back to the end of the last good record and synced;
//   - it lies below the durable offset: a sync covered it, so it is damage
//     in the middle of the log, data loss the log cannot repair; CutTornTail
//     returns ErrCorrupt and changes nothing.
//
// # Errors
//
// ErrZeroed, ErrInvalid, ErrVersion and ErrCorrupt are returned wrapped with
// detail; test them with errors.Is. A log package may give them its own names
// (journal.ErrInvalid = recordlog.ErrInvalid).
//
// # Concurrency
//
// Format is a value, safe for concurrent use. A Scanner's callbacks run on
// the goroutine that called Scan; Scan and CutTornTail must not run while
// anything else writes the file.
package recordlog
