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

// The back-off between attempts: retryFirst after the first failure,
// doubling with each failure after it, at most retryMax (Hyper-V Replica's
// ceiling). A replica that restarts is back within seconds, and a busy VM
// must not fill its journal while the primary waits a minute for it; one
// that stays away is asked at most twice an hour. Each wait is shortened
// at random by up to retryJitter of itself, so that the primaries of a
// replica host that comes back do not all call it in the same second.
const (
	retryFirst  = 2 * time.Second
	retryMax    = 30 * time.Minute
	retryJitter = 0.2
)

// backoff is the wait before retry n (1 is the first retry) before
// jitter: 2 s, 4 s, 8 s ... 1024 s, then 30 min, times scale (0 means 1).
func backoff(n int, scale float64) time.Duration {
	if scale <= 0 {
		scale = 1
	}
	d := retryFirst
	for i := 1; i < n && d < retryMax; i++ {
		d *= 2
	}
	return time.Duration(float64(min(d, retryMax)) * scale)
}

// jitter shortens back-off d by r (in [0, 1)) times retryJitter of it: the
// wait stays within (0.8 d, d], so never past the ceiling.
func jitter(d time.Duration, r float64) time.Duration {
	return d - time.Duration(float64(d)*retryJitter*r)
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
