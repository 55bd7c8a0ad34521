package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vdrepl/vdrepl/control"

	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/blockdev"
)

// Mount mounts the VMs' disks as files at mp (a FUSE mount, `vdrepl
// mount`), calls mounted once they are there, and returns when the mount
// has ended: when ctx is done (it unmounts) or something else (fusermount3
// -u, the daemon stopping) unmounted it.
func (d *Daemon) Mount(ctx context.Context, mp string, mounted func()) error {
	m, err := d.mount(mp)
	if err != nil {
		return err
	}
	mp = filepath.Clean(mp)
	mounted()
	select {
	case <-ctx.Done(): // the CLI went away (SIGINT, SIGTERM, killed)
		d.unmount(m)
	case <-m.Done(): // fusermount3 -u, or the daemon is stopping
	}
	d.mu.Lock()
	delete(d.mounts, mp)
	d.mu.Unlock()
	d.log.Info("unmounted", "mountpoint", mp)
	return nil
}

// Unmount ends the mount at mp.
func (d *Daemon) Unmount(mp string) error {
	d.mu.Lock()
	m, ok := d.mounts[filepath.Clean(mp)]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %s is not a vdrepl mount", control.ErrInvalid, mp)
	}
	return d.unmount(m)
}

// unmount ends a mount. When a file is still open (a loop device, say) the
// mount point is detached lazily: it disappears from the namespace now and
// the filesystem goes away when the last file closes.
func (d *Daemon) unmount(m *blockdev.FUSEMount) error {
	err := m.Unmount()
	if err == nil {
		return nil
	}
	if derr := unix.Unmount(m.Mountpoint(), unix.MNT_DETACH); derr != nil {
		return err
	}
	d.log.Warn("mount busy; detached lazily, it ends when the last file closes", "mountpoint", m.Mountpoint(), "err", err)
	return nil
}

func (d *Daemon) mount(mp string) (*blockdev.FUSEMount, error) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !filepath.IsAbs(mp) {
		return nil, fmt.Errorf("%w: mount point %q must be absolute", control.ErrInvalid, mp)
	}
	mp = filepath.Clean(mp)
	// ENOTCONN: a stale FUSE mount (a crashed daemon's, say);
	// MountFUSE detaches it when it is ours and refuses otherwise.
	st, err := os.Stat(mp)
	switch {
	case errors.Is(err, syscall.ENOTCONN):
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: mount point %s does not exist", control.ErrInvalid, mp)
	case err != nil:
		return nil, fmt.Errorf("%w: mount point %s: %v", control.ErrInvalid, mp, err)
	case !st.IsDir():
		return nil, fmt.Errorf("%w: mount point %s is not a directory", control.ErrInvalid, mp)
	}
	d.mu.Lock()
	_, busy := d.mounts[mp]
	closed := d.closed
	d.mu.Unlock()
	if busy {
		return nil, fmt.Errorf("%w: %s is already a vdrepl mount", control.ErrInUse, mp)
	}
	if closed {
		return nil, errors.New("daemon is stopping")
	}
	m, err := blockdev.MountFUSE(mp, blockdev.FUSEConfig{
		Exports: (*exports)(d),
		Logger:  d.log,
		OnOpen: func(export string, _ bool) {
			d.mu.Lock()
			d.fuseOpen[export]++
			d.mu.Unlock()
		},
		OnRelease: func(export string, _ bool) {
			d.mu.Lock()
			if d.fuseOpen[export]--; d.fuseOpen[export] <= 0 {
				delete(d.fuseOpen, export)
			}
			d.mu.Unlock()
		},
	})
	if errors.Is(err, blockdev.ErrStaleMount) {
		return nil, fmt.Errorf("%w: %v", control.ErrInUse, err)
	}
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.mounts[mp] = m
	d.mu.Unlock()
	d.log.Info("mounted", "mountpoint", mp)
	return m, nil
}
