package apply

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vdrepl/vdrepl/internal/pki"
	"github.com/vdrepl/vdrepl/internal/vfs"
	"github.com/vdrepl/vdrepl/internal/wire"
)

// AllowEntry lets the primaries whose certificate matches Primary (a
// pki.Match pattern) replicate VMs into Storage. VMs created under an entry
// with a TrustGroup may later be written by any primary whose entry has the
// same trust group (the VM moved between primaries of one cluster).
type AllowEntry struct {
	Primary    string `json:"primary"`
	Storage    string `json:"storage"`
	TrustGroup string `json:"trust_group,omitempty"`
}

func loadAllow(fsys vfs.FS, name string) ([]AllowEntry, error) {
	var list []AllowEntry
	if _, err := readState(fsys, name, formatAllow, &list); err != nil {
		return nil, err
	}
	for _, e := range list {
		if err := checkEntry(e); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrState, name, err)
		}
	}
	return list, nil
}

func checkEntry(e AllowEntry) error {
	if err := pki.ValidPattern(e.Primary); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if !filepath.IsAbs(e.Storage) {
		return fmt.Errorf("%w: storage %q must be an absolute path", ErrInvalid, e.Storage)
	}
	if e.TrustGroup != "" && !wire.ValidName(e.TrustGroup) {
		return fmt.Errorf("%w: trust group %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, e.TrustGroup)
	}
	return nil
}

// Allow adds an entry to the end of the allow-list (entries are tried in
// order; the first whose pattern matches a primary decides). The storage
// directory is created, mode 0700, if missing. A pattern already on the
// list is ErrExists.
func (s *Server) Allow(e AllowEntry) error {
	e.Storage = filepath.Clean(e.Storage)
	if err := checkEntry(e); err != nil {
		return err
	}
	s.regMu.Lock()
	defer s.regMu.Unlock()
	s.mu.Lock()
	list := slices.Clone(s.allow)
	s.mu.Unlock()
	for _, old := range list {
		if strings.EqualFold(old.Primary, e.Primary) {
			return fmt.Errorf("%w: allow-list entry for %q (storage %s)", ErrExists, old.Primary, old.Storage)
		}
	}
	if fi, err := s.fs.Stat(e.Storage); errors.Is(err, fs.ErrNotExist) {
		if _, err := mkdirDurable(s.fs, e.Storage); err != nil {
			return fmt.Errorf("apply: create storage %s: %w", e.Storage, err)
		}
	} else if err != nil {
		return fmt.Errorf("apply: storage %s: %w", e.Storage, err)
	} else if !fi.IsDir() {
		return fmt.Errorf("%w: storage %s is not a directory", ErrInvalid, e.Storage)
	}
	list = append(list, e)
	if err := writeState(s.fs, s.allowPath, formatAllow, list); err != nil {
		return err
	}
	s.mu.Lock()
	s.allow = list
	s.mu.Unlock()
	s.log.Info("allow-list entry added", "peer", e.Primary, "storage", e.Storage, "trust_group", e.TrustGroup)
	return nil
}

// Disallow removes the entry for pattern (ErrNotFound if there is none).
// Replica VMs created under it stay, but its primaries can no longer write
// them.
func (s *Server) Disallow(pattern string) error {
	s.regMu.Lock()
	defer s.regMu.Unlock()
	s.mu.Lock()
	list := slices.Clone(s.allow)
	s.mu.Unlock()
	i := slices.IndexFunc(list, func(e AllowEntry) bool { return strings.EqualFold(e.Primary, pattern) })
	if i < 0 {
		return fmt.Errorf("%w: no allow-list entry for %q", ErrNotFound, pattern)
	}
	list = slices.Delete(list, i, i+1)
	if err := writeState(s.fs, s.allowPath, formatAllow, list); err != nil {
		return err
	}
	s.mu.Lock()
	s.allow = list
	s.mu.Unlock()
	s.log.Info("allow-list entry removed", "peer", pattern)
	return nil
}

// AllowList returns the allow-list in order.
func (s *Server) AllowList() []AllowEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.allow)
}

// entryFor is the first allow-list entry matching a verified peer
// certificate.
func (s *Server) entryFor(cert *x509.Certificate) (AllowEntry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.allow {
		if pki.Match(e.Primary, cert) {
			return e, true
		}
	}
	return AllowEntry{}, false
}

// entryForName is the first allow-list entry matching a primary given by
// name (an offline copy has a manifest, not a TLS peer). It follows
// pki.Match's rules for one name.
func (s *Server) entryForName(name string) (AllowEntry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.allow {
		if matchName(e.Primary, name) {
			return e, true
		}
	}
	return AllowEntry{}, false
}

func matchName(pattern, name string) bool {
	if name == "" || pki.ValidPattern(pattern) != nil {
		return false
	}
	if pattern == "*" {
		return true
	}
	pattern, name = strings.ToLower(pattern), strings.ToLower(name)
	if suffix, wild := strings.CutPrefix(pattern, "*"); wild {
		return len(name) > len(suffix) && strings.HasSuffix(name, suffix)
	}
	return name == pattern
}

// Allows reports whether a primary with this certificate is on the
// allow-list.
func (s *Server) Allows(cert *x509.Certificate) bool {
	_, ok := s.entryFor(cert)
	return ok
}
