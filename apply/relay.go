package apply

import (
	"fmt"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// Relay receives what apply writes to a replica VM's images, to pass it on
// to a third host (extended replication). Apply calls Begin, then the
// changes of every stream it applies, in order, then End; a whole cycle
// (or a resync with the cycles that make it exact) lies between one Begin
// and its End, so a relay that cuts its own cycles only outside them never
// holds half a cycle. End is called after the images are synced and before
// the apply is recorded: a crash in between applies, and relays, the same
// content again, which is harmless (every frame holds final content). An
// error from the relay fails the apply, which is then redone.
type Relay interface {
	Begin()
	WriteAt(disk int, p []byte, off int64) error
	// Zero makes [off, off+n) of disk read as zeroes: typ is the frame's
	// (wire.FrameTrim, FrameZero or FrameZeroAlloc).
	Zero(disk int, off, n int64, typ wire.FrameType) error
	// End makes what was relayed since Begin durable; err is the apply's
	// own error, if it failed.
	End(err error) error
}

// SetRelay starts (r != nil) or stops passing a replica VM's applied
// changes to r.
func (s *Server) SetRelay(name string, r Relay) error {
	v, err := s.lookup(name)
	if err != nil {
		return err
	}
	v.apply.Lock()
	defer v.apply.Unlock()
	v.relay = r
	return nil
}

// relayStreams passes the frames of applied streams to the VM's relay.
// Caller holds v.apply.
func (v *vm) relayStreams(names []string) error {
	for _, name := range names {
		f, r, err := v.openStream(name)
		if err != nil {
			return err
		}
		// A frame that no longer reads is wrapped like the relay's own
		// errors, not classified by streamErr: the apply has just read
		// and checked this stream, so a failure now is the relay's, not
		// a corrupt upload for the primary to send again.
		err = forEachFrame(r, nil, func(fr wire.Frame) error {
			if fr.Type == wire.FrameData {
				return v.relay.WriteAt(fr.Disk, fr.Data, fr.Offset)
			}
			return v.relay.Zero(fr.Disk, fr.Offset, fr.Length, fr.Type)
		})
		f.Close()
		if err != nil {
			return fmt.Errorf("apply: relay %s: %w", name, err)
		}
	}
	return nil
}
