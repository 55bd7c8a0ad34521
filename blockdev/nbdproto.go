package blockdev

// NBD wire format, as spoken by the server in nbd.go. The protocol is
// NetworkBlockDevice/nbd doc/proto.md; every integer is big-endian. The
// constants that github.com/pojntfx/go-nbd/pkg/protocol defines are taken from
// there; the rest (FLUSH, TRIM, WRITE_ZEROES, command and transmission flags,
// most error codes) are defined here.
//
// Handshake (fixed newstyle only; oldstyle is not offered):
//
//	S: | "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16 |
//	C: | client flags u32 |
//	then repeatedly
//	C: | "IHAVEOPT" u64 | option u32 | length u32 | data (length bytes) |
//	S: | 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data |
//
// NBD_OPT_INFO and NBD_OPT_GO carry
//
//	| name length u32 | name | n u16 | n x info type u16 |
//
// and are answered with NBD_REP_INFO replies, each data starting with the
// info type u16:
//
//	EXPORT      | 0 u16 | size u64 | transmission flags u16 |
//	NAME        | 1 u16 | name |
//	DESCRIPTION | 2 u16 | description |
//	BLOCK_SIZE  | 3 u16 | minimum u32 | preferred u32 | maximum u32 |
//
// followed by NBD_REP_ACK (or one error reply). NBD_OPT_EXPORT_NAME is
// answered, without a reply header, by
//
//	| size u64 | transmission flags u16 | 124 zero bytes unless NO_ZEROES |
//
// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT carry
//
//	| name length u32 | name | n u32 | n x (query length u32 | query) |
//
// and are answered with one NBD_REP_META_CONTEXT per context, then ACK:
//
//	| context id u32 | context name |
//
// Transmission:
//
//	C: | 0x25609513 u32 | command flags u16 | type u16 | handle u64 | offset u64 | length u32 | payload (WRITE only) |
//	S: | 0x67446698 u32 | error u32 | handle u64 | payload (successful READ only) |
//
// or, once NBD_OPT_STRUCTURED_REPLY was acknowledged, for READ, BLOCK_STATUS
// and errors, one or more chunks, the last with flag DONE:
//
//	S: | 0x668e33ef u32 | flags u16 | type u16 | handle u64 | length u32 | payload |
//
// whose payload by type is
//
//	OFFSET_DATA  (1)      | offset u64 | data |
//	OFFSET_HOLE  (2)      | offset u64 | hole length u32 |
//	BLOCK_STATUS (5)      | context id u32 | n x (extent length u32 | status flags u32) |
//	ERROR        (0x8001) | error u32 | message length u16 | message |
//	ERROR_OFFSET (0x8002) | error u32 | message length u16 | message | offset u64 |

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Handshake.
const (
	nbdMagic      = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	nbdOptMagic   = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	nbdReplyMagic = protocol.NEGOTIATION_MAGIC_REPLY

	// Handshake flags (server) and client flags.
	nbdFlagFixedNewstyle  = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	nbdFlagNoZeroes       = uint16(1 << 1)
	nbdFlagCFixedNewstyle = uint32(1 << 0)
	nbdFlagCNoZeroes      = uint32(1 << 1)

	// Options.
	nbdOptExportName      = uint32(1)
	nbdOptAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	nbdOptList            = protocol.NEGOTIATION_ID_OPTION_LIST
	nbdOptStartTLS        = uint32(5)
	nbdOptInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	nbdOptGo              = protocol.NEGOTIATION_ID_OPTION_GO
	nbdOptStructuredReply = uint32(8)
	nbdOptListMetaContext = uint32(9)
	nbdOptSetMetaContext  = uint32(10)

	// Option reply types.
	nbdRepAck         = protocol.NEGOTIATION_TYPE_REPLY_ACK
	nbdRepServer      = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	nbdRepInfo        = protocol.NEGOTIATION_TYPE_REPLY_INFO
	nbdRepMetaContext = uint32(4)
	nbdRepFlagError   = uint32(1 << 31)
	nbdRepErrUnsup    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	nbdRepErrPolicy   = nbdRepFlagError | 2
	nbdRepErrInvalid  = nbdRepFlagError | 3
	nbdRepErrUnknown  = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	nbdRepErrTLSReqd  = nbdRepFlagError | 5
	nbdRepErrShutdown = nbdRepFlagError | 7
	nbdRepErrTooBig   = nbdRepFlagError | 9

	// NBD_REP_INFO types.
	nbdInfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	nbdInfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	nbdInfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	nbdInfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags, sent with the export size.
const (
	nbdFlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	nbdFlagReadOnly        = uint16(1 << 1)
	nbdFlagSendFlush       = uint16(1 << 2)
	nbdFlagSendFUA         = uint16(1 << 3)
	nbdFlagSendTrim        = uint16(1 << 5)
	nbdFlagSendWriteZeroes = uint16(1 << 6)
	nbdFlagSendDF          = uint16(1 << 7)
	nbdFlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
)

// Metadata contexts. base:allocation is the only one offered; its id is the
// one this server hands out for it (ids are per connection and opaque).
const (
	nbdContextAllocation   = "base:allocation"
	nbdContextAllocationID = uint32(1)
	// Status flags of base:allocation.
	nbdStateHole = uint32(1 << 0)
	nbdStateZero = uint32(1 << 1)
	// nbdMaxExtents bounds the descriptors of one BLOCK_STATUS reply (the
	// spec's advice: 2^20).
	nbdMaxExtents = 1 << 20
)

// Transmission phase.
const (
	nbdRequestMagic = protocol.TRANSMISSION_MAGIC_REQUEST
	nbdSimpleMagic  = protocol.TRANSMISSION_MAGIC_REPLY
	nbdChunkMagic   = uint32(0x668e33ef)

	nbdCmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	nbdCmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	nbdCmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	nbdCmdFlush       = uint16(3)
	nbdCmdTrim        = uint16(4)
	nbdCmdWriteZeroes = uint16(6)
	nbdCmdBlockStatus = uint16(7)

	// Command flags.
	nbdCmdFlagFUA    = uint16(1 << 0)
	nbdCmdFlagNoHole = uint16(1 << 1)
	nbdCmdFlagDF     = uint16(1 << 2)
	nbdCmdFlagReqOne = uint16(1 << 3)

	// Structured reply chunks: the flag and the types.
	nbdReplyFlagDone       = uint16(1 << 0)
	nbdReplyTypeOffsetData = uint16(1)
	nbdReplyTypeOffsetHole = uint16(2)
	nbdReplyTypeBlockStat  = uint16(5)
	nbdReplyTypeError      = uint16(1<<15 | 1)
	nbdReplyTypeErrorOff   = uint16(1<<15 | 2)

	// Error values of the simple reply (errno numbers on Linux, fixed by the
	// protocol rather than by the platform).
	nbdEPERM     = protocol.TRANSMISSION_ERROR_EPERM
	nbdEIO       = uint32(5)
	nbdENOMEM    = uint32(12)
	nbdEINVAL    = protocol.TRANSMISSION_ERROR_EINVAL
	nbdENOSPC    = uint32(28)
	nbdEOVERFLOW = uint32(75)
	nbdENOTSUP   = uint32(95)
	nbdESHUTDOWN = uint32(108)
)

// Sizes of fixed wire structures.
const (
	nbdRequestSize     = 28 // magic, flags, type, handle, offset, length
	nbdReplySize       = 16 // magic, error, handle
	nbdChunkSize       = 20 // magic, flags, type, handle, length
	nbdOptHeaderSize   = 16 // magic, option, length
	nbdMaxStringLength = 4096
)

// Block sizes advertised in NBD_INFO_BLOCK_SIZE. The maximum is the server's
// MaxRequest.
const (
	nbdMinBlock       = 512
	nbdPreferredBlock = 4096
)

// ErrBadRequestMagic is returned by the request decoder when a request does not
// start with the NBD request magic: the stream is out of step and the
// connection is closed.
var ErrBadRequestMagic = errors.New("blockdev: bad NBD request magic")

// errShortRequest is for a request header shorter than 28 bytes.
var errShortRequest = errors.New("blockdev: short NBD request header")

// request is a decoded transmission request header.
type request protocol.TransmissionRequestHeader

// decodeRequest decodes a 28-byte request header. It checks the magic only;
// whether the request makes sense for an export is checkRequest's job.
func decodeRequest(b []byte) (request, error) {
	if len(b) < nbdRequestSize {
		return request{}, errShortRequest
	}
	r := request{
		RequestMagic: binary.BigEndian.Uint32(b[0:]),
		CommandFlags: binary.BigEndian.Uint16(b[4:]),
		Type:         binary.BigEndian.Uint16(b[6:]),
		Handle:       binary.BigEndian.Uint64(b[8:]),
		Offset:       binary.BigEndian.Uint64(b[16:]),
		Length:       binary.BigEndian.Uint32(b[24:]),
	}
	if r.RequestMagic != nbdRequestMagic {
		return r, fmt.Errorf("%w %#08x", ErrBadRequestMagic, r.RequestMagic)
	}
	return r, nil
}

// encodeRequest is decodeRequest's inverse (used by tests and the fuzzer).
func encodeRequest(b []byte, r request) []byte {
	b = binary.BigEndian.AppendUint32(b, r.RequestMagic)
	b = binary.BigEndian.AppendUint16(b, r.CommandFlags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Handle)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	return binary.BigEndian.AppendUint32(b, r.Length)
}

// appendReply appends a simple reply header.
func appendReply(b []byte, errno uint32, handle uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, nbdSimpleMagic)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, handle)
}

// appendChunk appends a structured reply chunk header for a payload of n
// bytes.
func appendChunk(b []byte, flags, typ uint16, handle uint64, n int) []byte {
	b = binary.BigEndian.AppendUint32(b, nbdChunkMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	return binary.BigEndian.AppendUint32(b, uint32(n))
}

// appendErrorChunk appends a final ERROR chunk, or an ERROR_OFFSET one if
// off is not negative. The message is cut to the spec's string limit.
func appendErrorChunk(b []byte, handle uint64, errno uint32, msg string, off int64) []byte {
	if len(msg) > nbdMaxStringLength {
		msg = msg[:nbdMaxStringLength]
	}
	typ, n := nbdReplyTypeError, 6+len(msg)
	if off >= 0 {
		typ, n = nbdReplyTypeErrorOff, n+8
	}
	b = appendChunk(b, nbdReplyFlagDone, typ, handle, n)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if off >= 0 {
		b = binary.BigEndian.AppendUint64(b, uint64(off))
	}
	return b
}

// exportLimits is what checkRequest needs to know about the export and
// server, and what the connection negotiated.
type exportLimits struct {
	size       int64
	readOnly   bool
	maxRequest uint32
	// structured: NBD_OPT_STRUCTURED_REPLY was acknowledged (READ takes DF).
	structured bool
	// blockStatus: base:allocation was selected for this export.
	blockStatus bool
}

// checkRequest validates a decoded request against the export and returns 0
// or the NBD error to reply with. The choices, following the spec's SHOULDs:
//
//   - unknown command, a flag not valid for the command (DF without
//     structured replies), zero length on a data command, nonzero offset or
//     length on FLUSH, BLOCK_STATUS without a selected context: EINVAL;
//   - WRITE, TRIM or WRITE_ZEROES on a read-only export: EPERM (FUA is accepted
//     on every command, as qemu-nbd does, since clients are known to set it);
//   - READ or WRITE longer than maxRequest: EOVERFLOW;
//   - range past the end of the disk (or wrapping): ENOSPC for WRITE and
//     WRITE_ZEROES ("a write request including sectors beyond the size of the
//     device"), EINVAL for READ, TRIM and BLOCK_STATUS.
//
// BLOCK_STATUS's length is a hint, not a payload: maxRequest does not bound it.
//
// Requests need not be aligned to the advertised minimum block size: the Disk
// works at byte granularity.
func checkRequest(r request, e exportLimits) uint32 {
	var valid uint16 = nbdCmdFlagFUA
	write := false
	switch r.Type {
	case nbdCmdRead:
		if e.structured {
			valid |= nbdCmdFlagDF
		}
	case nbdCmdBlockStatus:
		if !e.blockStatus {
			return nbdEINVAL
		}
		valid |= nbdCmdFlagReqOne
	case nbdCmdWrite, nbdCmdTrim:
		write = true
	case nbdCmdWriteZeroes:
		write = true
		valid |= nbdCmdFlagNoHole
	case nbdCmdFlush:
		if r.CommandFlags&^valid != 0 || r.Offset != 0 || r.Length != 0 {
			return nbdEINVAL
		}
		return 0
	case nbdCmdDisc:
		return 0
	default:
		return nbdEINVAL
	}
	if r.CommandFlags&^valid != 0 {
		return nbdEINVAL
	}
	if write && e.readOnly {
		return nbdEPERM
	}
	if r.Length == 0 {
		return nbdEINVAL
	}
	if (r.Type == nbdCmdRead || r.Type == nbdCmdWrite) && r.Length > e.maxRequest {
		return nbdEOVERFLOW
	}
	if r.Offset > uint64(e.size) || uint64(r.Length) > uint64(e.size)-r.Offset {
		if r.Type == nbdCmdWrite || r.Type == nbdCmdWriteZeroes {
			return nbdENOSPC
		}
		return nbdEINVAL
	}
	return 0
}

// transmissionFlags are the flags advertised for an export; structured says
// the client negotiated structured replies, which DF needs.
func transmissionFlags(readOnly, structured bool) uint16 {
	f := nbdFlagHasFlags | nbdFlagCanMultiConn
	if structured {
		f |= nbdFlagSendDF
	}
	if readOnly {
		return f | nbdFlagReadOnly
	}
	return f | nbdFlagSendFlush | nbdFlagSendFUA | nbdFlagSendTrim | nbdFlagSendWriteZeroes
}

// minBlockSize is 512 unless the disk size is not a multiple of it, in which
// case advertising 512 would make the tail unreachable.
func minBlockSize(size int64) uint32 {
	if size%nbdMinBlock != 0 {
		return 1
	}
	return nbdMinBlock
}

// appendOptReply appends a fixed-newstyle option reply header and its data.
func appendOptReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, nbdReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// infoRequest is the decoded data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// errBadOption is for option data whose lengths do not add up.
var errBadOption = errors.New("blockdev: malformed NBD option data")

// decodeInfoRequest decodes NBD_OPT_INFO / NBD_OPT_GO data:
// | name length u32 | name | n u16 | n x info u16 |.
func decodeInfoRequest(b []byte) (infoRequest, error) {
	if len(b) < 4 {
		return infoRequest{}, errBadOption
	}
	n := binary.BigEndian.Uint32(b)
	b = b[4:]
	if n > nbdMaxStringLength || uint64(n)+2 > uint64(len(b)) {
		return infoRequest{}, errBadOption
	}
	r := infoRequest{name: string(b[:n])}
	b = b[n:]
	count := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if len(b) != 2*count {
		return infoRequest{}, errBadOption
	}
	for i := 0; i < count; i++ {
		r.infos = append(r.infos, binary.BigEndian.Uint16(b[2*i:]))
	}
	return r, nil
}

// metaRequest is the decoded data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type metaRequest struct {
	name    string
	queries []string
}

// decodeMetaRequest decodes meta context option data:
// | name length u32 | name | n u32 | n x (length u32 | query) |.
func decodeMetaRequest(b []byte) (metaRequest, error) {
	str := func() (string, bool) {
		if len(b) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(b)
		if n > nbdMaxStringLength || uint64(n) > uint64(len(b)-4) {
			return "", false
		}
		s := string(b[4 : 4+n])
		b = b[4+n:]
		return s, true
	}
	var r metaRequest
	var ok bool
	if r.name, ok = str(); !ok || len(b) < 4 {
		return metaRequest{}, errBadOption
	}
	count := binary.BigEndian.Uint32(b)
	b = b[4:]
	if uint64(count)*4 > uint64(len(b)) {
		return metaRequest{}, errBadOption
	}
	for range count {
		q, ok := str()
		if !ok {
			return metaRequest{}, errBadOption
		}
		r.queries = append(r.queries, q)
	}
	if len(b) != 0 {
		return metaRequest{}, errBadOption
	}
	return r, nil
}

// nbdErrName names an NBD error value for logs.
func nbdErrName(errno uint32) string {
	switch errno {
	case 0:
		return "OK"
	case nbdEPERM:
		return "EPERM"
	case nbdEIO:
		return "EIO"
	case nbdENOMEM:
		return "ENOMEM"
	case nbdEINVAL:
		return "EINVAL"
	case nbdENOSPC:
		return "ENOSPC"
	case nbdEOVERFLOW:
		return "EOVERFLOW"
	case nbdENOTSUP:
		return "ENOTSUP"
	case nbdESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("errno %d", errno)
}

// nbdCmdName names a command type for logs.
func nbdCmdName(t uint16) string {
	switch t {
	case nbdCmdRead:
		return "READ"
	case nbdCmdWrite:
		return "WRITE"
	case nbdCmdDisc:
		return "DISC"
	case nbdCmdFlush:
		return "FLUSH"
	case nbdCmdTrim:
		return "TRIM"
	case nbdCmdWriteZeroes:
		return "WRITE_ZEROES"
	case nbdCmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("cmd %d", t)
}
