package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/ship"
)

// Verify scrubs a VM this host replicates against its replica
// (ship.Shipper.Verify); its progress shows in the VM's replication status
// while it runs.
func (d *Daemon) Verify(ctx context.Context, name string, req control.VerifyRequest, progress func(ship.VerifyProgress)) (ship.VerifyResult, error) {
	s, err := d.shipper(name)
	if err != nil {
		return ship.VerifyResult{}, err
	}
	spec := req.Rate
	if spec == "" {
		spec = ship.DefaultVerifyRate
	}
	lim, err := ship.ParseBandwidth(spec)
	if err != nil {
		return ship.VerifyResult{}, fmt.Errorf("%w: --rate: %v", control.ErrInvalid, err)
	}
	res, err := s.Verify(ctx, ship.VerifyOptions{Rate: lim, DryRun: req.DryRun, Progress: progress})
	switch {
	case errors.Is(err, ship.ErrVerifyRunning), errors.Is(err, ship.ErrSyncRunning):
		err = fmt.Errorf("%w: %v", control.ErrInUse, err)
	case errors.Is(err, ship.ErrBadConfig):
		err = fmt.Errorf("%w: %v", control.ErrInvalid, err)
	}
	return res, err
}

// verifyMetrics exports the last verify of a VM, once it had one.
func verifyMetrics(gauge func(name string, v float64, labels ...string), p control.ReplicationStatus) {
	if l := p.Status.LastVerify; l != nil {
		gauge("vdrepl_verify_last_timestamp_seconds", float64(l.At.UnixNano())/1e9, p.VM)
		gauge("vdrepl_verify_last_mismatch_blocks", float64(l.MismatchBlocks), p.VM)
	}
}
