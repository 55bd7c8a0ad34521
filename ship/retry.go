package ship

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"reflect"
	"time"

	"github.com/vdrepl/vdrepl/journal"
)

// Errors of the shipper.
var (
	ErrBadConfig = errors.New("ship: bad config")
	ErrClosed    = errors.New("ship: closed")
	ErrPaused    = errors.New("ship: replication is paused")
	// ErrStopped wraps the non-recoverable error that stopped replication;
	// nothing is retried until Resume (or a new Shipper with a new config).
	ErrStopped = errors.New("ship: replication stopped")
	// ErrResyncRequired: the replica cannot be proven complete from the
	// journal; a resync has to run (see Status for when).
	ErrResyncRequired = errors.New("ship: resync required")
	// ErrProtocol is an answer of the replica that breaks the protocol.
	ErrProtocol = errors.New("ship: protocol error")
	// ErrState is a state file that cannot be trusted.
	ErrState = errors.New("ship: bad state file")
)

// retrySchedule is the back-off between attempts: 1, 2, 4, 8 and 10
// minutes, then every 30 minutes, as Hyper-V Replica does.
var retrySchedule = []time.Duration{
	1 * time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 10 * time.Minute,
}

const retryEvery = 30 * time.Minute

// backoff is the wait before retry n (1 is the first retry), times scale
// (0 means 1).
func backoff(n int, scale float64) time.Duration {
	if scale <= 0 {
		scale = 1
	}
	d := retryEvery
	if n >= 1 && n <= len(retrySchedule) {
		d = retrySchedule[n-1]
	} else if n < 1 {
		d = retrySchedule[0]
	}
	return time.Duration(float64(d) * scale)
}

// retryable says whether err may go away by itself (network trouble, a busy
// or full replica, a corrupted transfer) or needs an admin (authorization,
// certificates, a replica that does not know the VM or disagrees about its
// disks, a journal that failed or does not keep cycles).
func retryable(err error) bool {
	if err == nil {
		return true
	}
	if errors.Is(err, journal.ErrFailed) || errors.Is(err, journal.ErrNotRetaining) ||
		errors.Is(err, ErrBadConfig) || errors.Is(err, ErrState) {
		return false
	}
	var re *ReplicaError
	if errors.As(err, &re) {
		if re.Wire.Code != "" {
			return re.Wire.Retryable()
		}
		switch {
		case re.Status >= 500, re.Status == http.StatusRequestTimeout, re.Status == http.StatusTooManyRequests:
			return true
		}
		return false
	}
	if certificateError(err) {
		return false
	}
	return true
}

// certificateError recognises a TLS failure that retrying cannot fix: the
// replica's certificate failed our verification, or the replica refused
// ours (a TLS alert about certificates).
func certificateError(err error) bool {
	var cve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var he x509.HostnameError
	if errors.As(err, &cve) || errors.As(err, &ua) || errors.As(err, &ci) || errors.As(err, &he) {
		return true
	}
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return certificateAlert(uint8(ae))
	}
	// An alert received from the peer comes as a net.OpError "remote error"
	// wrapping crypto/tls's unexported alert type, a uint8.
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" && oe.Err != nil {
		if v := reflect.ValueOf(oe.Err); v.Kind() == reflect.Uint8 {
			return certificateAlert(uint8(v.Uint()))
		}
	}
	return false
}

// certificateAlert: bad_certificate, unsupported_certificate,
// certificate_revoked, certificate_expired, certificate_unknown, unknown_ca,
// access_denied, certificate_required (RFC 8446 6.2).
func certificateAlert(a uint8) bool {
	switch a {
	case 42, 43, 44, 45, 46, 48, 49, 116:
		return true
	}
	return false
}

// canceled says whether err is only the end of ctx.
func canceled(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ctx.Err()))
}

// isCode says whether err is the replica's answer with wire code c.
func isCode(err error, c string) bool { return code(err) == c }
