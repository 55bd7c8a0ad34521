package daemon

// The NBD allow-list: which TLS clients may open which exports. It is kept
// in STATE/nbd-allow.json, replaced atomically, in the statefile envelope:
//
//	{"format":"vdrepl-nbd-allow","version":1,"crc32c":"...","body":{"entries":[NBDAllowEntry...]}}
//
// The NBD server asks authorizeNBD at every handshake, so a change applies
// to the next connection without a restart; a removal also ends the
// connections that no longer pass (blockdev.NBDServer.Reauthorize). The
// unix socket is not subject to it: its file permissions decide.

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"

	"github.com/vdrepl/vdrepl/blockdev"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

const (
	nbdAllowFormat  = "vdrepl-nbd-allow"
	nbdAllowVersion = 1
)

type nbdAllowFile struct {
	Entries []control.NBDAllowEntry `json:"entries"`
}

// nbdAllowList is the loaded allow-list. mu guards list and is a leaf;
// saveMu serialises changes (held across the file write, never by readers).
type nbdAllowList struct {
	fs     vfs.FS
	path   string
	saveMu sync.Mutex
	mu     sync.Mutex
	list   []control.NBDAllowEntry
}

// load reads the file; a missing file is an empty list.
func (a *nbdAllowList) load() error {
	b, err := vfs.ReadFile(a.fs, a.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var f nbdAllowFile
	if err := statefile.Decode(nbdAllowFormat, nbdAllowVersion, b, &f); err != nil {
		return fmt.Errorf("NBD allow-list %s: %w", a.path, err)
	}
	for _, e := range f.Entries {
		if err := checkNBDAllow(e); err != nil {
			return fmt.Errorf("NBD allow-list %s: %w", a.path, err)
		}
	}
	a.mu.Lock()
	a.list = f.Entries
	a.mu.Unlock()
	return nil
}

// change applies edit to a copy of the list, saves it, then makes it the
// list.
func (a *nbdAllowList) change(edit func([]control.NBDAllowEntry) ([]control.NBDAllowEntry, error)) error {
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	list, err := edit(a.entries())
	if err != nil {
		return err
	}
	b, err := statefile.Encode(nbdAllowFormat, nbdAllowVersion, nbdAllowFile{Entries: list})
	if err != nil {
		return err
	}
	if err := vfs.WriteFileAtomic(a.fs, a.path, b, 0o600); err != nil {
		return fmt.Errorf("save NBD allow-list: %w", err)
	}
	a.mu.Lock()
	a.list = list
	a.mu.Unlock()
	return nil
}

func (a *nbdAllowList) entries() []control.NBDAllowEntry {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.list)
}

// access is what a client with the verified certificate cert may do with
// export: read-write if an entry for it is not read-only, read-only if all
// its entries are, else nothing.
func (a *nbdAllowList) access(cert *x509.Certificate, export string) blockdev.NBDAccess {
	if cert == nil {
		return blockdev.NBDDeny
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	acc := blockdev.NBDDeny
	for _, e := range a.list {
		if !exportMatch(e.Export, export) || !pki.Match(e.Client, cert) {
			continue
		}
		if !e.ReadOnly {
			return blockdev.NBDReadWrite
		}
		acc = blockdev.NBDReadOnly
	}
	return acc
}

// exportMatch reports whether an export name matches an entry's pattern
// (see control.NBDAllowEntry).
func exportMatch(pattern, export string) bool {
	if pattern == "*" {
		return true
	}
	if !strings.Contains(pattern, "/") {
		pattern += "/*"
	}
	ok, err := path.Match(pattern, export)
	return ok && err == nil
}

func checkNBDAllow(e control.NBDAllowEntry) error {
	if err := pki.ValidPattern(e.Client); err != nil {
		return fmt.Errorf("%w: --client: %v", control.ErrInvalid, err)
	}
	p := e.Export
	_, err := path.Match(p, "")
	if p == "" || err != nil || strings.Count(p, "/") > 1 || strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") ||
		strings.ContainsAny(p, "[]\\") {
		return fmt.Errorf("%w: --export %q: want VM/DISK, VM (all its disks) or *, where * in a name matches any characters but '/' (web1/*, */data)", control.ErrInvalid, p)
	}
	return nil
}

func sameNBDEntry(a control.NBDAllowEntry, client, export string) bool {
	return strings.EqualFold(a.Client, client) && a.Export == export
}

// NBDAllowList lists the NBD allow-list in the order entries were added.
func (d *Daemon) NBDAllowList() []control.NBDAllowEntry { return d.nbdAllow.entries() }

// NBDAllow adds an entry; one for the same client and export is
// ErrExists.
func (d *Daemon) NBDAllow(e control.NBDAllowEntry) error {
	if err := checkNBDAllow(e); err != nil {
		return err
	}
	err := d.nbdAllow.change(func(l []control.NBDAllowEntry) ([]control.NBDAllowEntry, error) {
		for _, old := range l {
			if sameNBDEntry(old, e.Client, e.Export) {
				return nil, fmt.Errorf("%w: NBD allow-list entry for client %s, export %s (remove it first to change it)", control.ErrExists, old.Client, old.Export)
			}
		}
		return append(l, e), nil
	})
	if err != nil {
		return err
	}
	d.log.Info("NBD allow-list entry added", "client", e.Client, "export", e.Export, "read_only", e.ReadOnly)
	// A read-write entry beside a read-only one changes nothing for
	// connections already open; they keep what they negotiated.
	return nil
}

// NBDDisallow removes the entry for client and export and ends the
// connections it alone allowed.
func (d *Daemon) NBDDisallow(client, export string) error {
	err := d.nbdAllow.change(func(l []control.NBDAllowEntry) ([]control.NBDAllowEntry, error) {
		i := slices.IndexFunc(l, func(e control.NBDAllowEntry) bool { return sameNBDEntry(e, client, export) })
		if i < 0 {
			return nil, fmt.Errorf("%w: no NBD allow-list entry for client %q, export %q (see `vdrepl nbd allow list`)", control.ErrInvalid, client, export)
		}
		return slices.Delete(l, i, i+1), nil
	})
	if err != nil {
		return err
	}
	n := d.nbd.Reauthorize()
	d.log.Info("NBD allow-list entry removed", "client", client, "export", export, "disconnected", n)
	return nil
}
