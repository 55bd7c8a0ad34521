package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/wire"
	"github.com/vdrepl/vdrepl/ship"
)

// Asking a replica about a VM before the daemon acts on it: `replication
// enable` (is it there, does it take this primary for the VM?), `replication
// set --replica` (is the new address the same replica?), a planned failover
// (who is it?, primaryRole.AskReplica) and the fence of a VM failed over
// there (fence.go). All ask the one question the shipper asks first, GET
// /v1/replicas/{vm} (ship.Replica), over the shipper's TLS and proxy
// settings, so the answer is the one replication would get.

// replicaCheckTimeout bounds the question.
const replicaCheckTimeout = 15 * time.Second

// askReplica asks the replica at addr about vm. unknown is set when the
// replica answered and holds no such VM (a new replication); err is any
// other failure, as ship returns it.
func (d *Daemon) askReplica(ctx context.Context, addr string, bypassProxy bool, vm string) (cert *x509.Certificate, rep wire.Replica, unknown bool, err error) {
	if d.identity == nil {
		return nil, rep, false, fmt.Errorf("%w: %v", control.ErrInvalid, errNoIdentity)
	}
	ctx, cancel := context.WithTimeout(ctx, replicaCheckTimeout)
	defer cancel()
	host, _, _ := net.SplitHostPort(addr)
	cert, rep, err = ship.Replica(ctx, addr, d.identity.ClientConfig(host), bypassProxy, vm)
	var re *ship.ReplicaError
	if errors.As(err, &re) && re.Wire.Code == wire.CodeUnknownVM {
		return cert, wire.Replica{}, true, nil
	}
	return cert, rep, false, err
}

// checkReplica is the pre-check of `replication enable`: the replica at
// r.Replica must answer over TLS, let this host in for vm, and not hold vm
// failed over. The error says the cause and the fix; it wraps
// control.ErrInvalid when the replica answered and said no.
func (d *Daemon) checkReplica(ctx context.Context, vm string, r control.ReplicationSpec) error {
	cert, rep, unknown, err := d.askReplica(ctx, r.Replica, r.BypassProxy, vm)
	if err != nil {
		return d.replicaRefusal(r.Replica, vm, err)
	}
	if unknown {
		return nil
	}
	if f := rep.FailedOver; f != nil {
		return fmt.Errorf("%w: the replica %s (%s) holds VM %s failed over there (%s failover at %s): it takes no more data from this host; replicate back from there (`vdrepl replication reverse %s --replica THIS_HOST:PORT` on %s)",
			control.ErrInvalid, r.Replica, pki.CertName(cert), vm, f.Kind, f.At.UTC().Format(time.RFC3339), vm, pki.CertName(cert))
	}
	return nil
}

// replicaRefusal explains why asking the replica at addr about vm failed,
// with the fix.
func (d *Daemon) replicaRefusal(addr, vm string, err error) error {
	me := d.identity.Name()
	doctor := fmt.Sprintf("`vdrepl doctor --replica %s` checks the way step by step", addr)
	var re *ship.ReplicaError
	var verr *tls.CertificateVerificationError
	var alert tls.AlertError
	var opErr *net.OpError
	switch {
	case errors.As(err, &re) && re.Wire.Code == wire.CodeForbidden:
		return fmt.Errorf("%w: the replica %s refuses this primary %q for VM %s (%s): add it there with `vdrepl replica allow add --primary %s --storage DIR` (or, if VM %s there belongs to another primary, replicate under another name)",
			control.ErrInvalid, addr, me, vm, re.Wire.Message, me, vm)
	case errors.As(err, &re) && re.Wire.Code == wire.CodeFailedOver:
		return fmt.Errorf("%w: the replica %s holds VM %s failed over there: %s", control.ErrInvalid, addr, vm, re.Wire.Message)
	case errors.As(err, &re) && re.Wire.Code != "":
		return fmt.Errorf("%w: the replica %s answered about VM %s: %s; %s", control.ErrInvalid, addr, vm, re.Wire.Message, doctor)
	case errors.As(err, &re):
		return fmt.Errorf("%w: %s answered HTTP %d, not as a vdrepl replica: is it the replica's --replica-listen address (or a proxy on the way)? %s", control.ErrInvalid, addr, re.Status, doctor)
	case errors.As(err, &verr):
		return fmt.Errorf("%w: TLS handshake with the replica %s failed: this host does not accept its certificate (%v): both hosts need certificates from one CA, the replica's valid for the address; %s", control.ErrInvalid, addr, verr.Err, doctor)
	case errors.As(err, &alert), errors.As(err, &opErr) && opErr.Op == "remote error":
		return fmt.Errorf("%w: TLS handshake with the replica %s failed: it refused this host's certificate %q (%v): both hosts need certificates from one CA, with clientAuth and serverAuth; %s", control.ErrInvalid, addr, me, err, doctor)
	}
	return unreachableError{fmt.Errorf("%w: the replica %s does not answer (%v): start its daemon with --replica-listen, check the address and the firewall, or enable with --no-check to start anyway (an --initial offline:DIR copy needs no replica until it is imported); %s",
		control.ErrInvalid, addr, unwrapURL(err), doctor)}
}

// unreachableError: the replica did not answer at all (no TCP connection,
// a timeout), as opposed to answering no.
type unreachableError struct{ error }

func (e unreachableError) Unwrap() error { return e.error }

// unwrapURL drops net/http's *url.Error, which only repeats the URL.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
