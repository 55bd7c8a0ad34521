package ship

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// Conversations with a VM's replica outside a Shipper's loop, for a planned
// failover (wire.Handover): the daemon stops the VM's shipper first.

// Replica describes a VM's replica host: its certificate (whom to allow
// replicating back) and its state of the VM.
func Replica(ctx context.Context, replica string, tlsConf *tls.Config, bypassProxy bool, vm string) (*x509.Certificate, wire.Replica, error) {
	c := newClient(replica, vm, tlsConf, bypassProxy)
	defer c.close()
	r, err := c.get(ctx)
	return c.peer.Load(), r, err
}

// Handover asks the replica to become the VM's primary (a planned
// failover) and to replicate back as h says.
func Handover(ctx context.Context, replica string, tlsConf *tls.Config, bypassProxy bool, vm string, h wire.Handover) (wire.Replica, error) {
	c := newClient(replica, vm, tlsConf, bypassProxy)
	defer c.close()
	var r wire.Replica
	body, n, hdr := c.jsonBody(h)
	err := c.do(ctx, "planned failover", http.MethodPost, "/failover", body, n, hdr, commitTimeout, &r)
	return r, err
}

// Retryable says whether an error of Handover may go away by trying
// again (the network, a busy or restarting replica) rather than needing an
// admin (refused, the replica not holding the last cycle).
func Retryable(err error) bool {
	return retryable(err)
}
