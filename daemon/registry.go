package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/statefile"
	"github.com/vdrepl/vdrepl/internal/vfs"
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func checkName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: %s name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", control.ErrInvalid, kind, name)
	}
	return nil
}

// ParseDiskSpec parses the CLI form [NAME=]PATH[:SIZE]. SIZE takes K, M, G, T
// suffixes (powers of 1024). Without NAME the disk is named after the file
// without its extension.
func ParseDiskSpec(s string) (control.DiskSpec, error) {
	var d control.DiskSpec
	if name, rest, ok := strings.Cut(s, "="); ok {
		d.Name, s = name, rest
	}
	if i := strings.LastIndexByte(s, ':'); i >= 0 {
		size, err := ParseSize(s[i+1:])
		if err != nil {
			return d, fmt.Errorf("%w: disk %q: %v", control.ErrInvalid, s, err)
		}
		d.Size, d.Create, s = size, true, s[:i]
	}
	if s == "" {
		return d, fmt.Errorf("%w: disk needs a path: [NAME=]PATH[:SIZE]", control.ErrInvalid)
	}
	d.Path = s
	if d.Name == "" {
		base := filepath.Base(s)
		d.Name = strings.TrimSuffix(base, filepath.Ext(base))
	}
	return d, checkName("disk", d.Name)
}

// ParseSize parses "1024", "64K", "512M", "2G", "1T" (powers of 1024; an
// optional trailing "iB" or "B" is accepted).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q (want e.g. 4096, 512M, 20G)", s)
	}
	return v * mult, nil
}

// registry is the persisted list of VMs: state/vms.json, replaced
// atomically (vfs.WriteFileAtomic), in the internal/statefile envelope:
//
//	{"format":"vdrepl-vms","version":2,"crc32c":"...","body":{"vms":[VMSpec...]}}
//
// Version 1 was the same list without the envelope, {"version":1,"vms":[...]};
// load reads it and rewrites it as version 2 (migrate).
type registry struct {
	fs   vfs.FS
	path string
}

type registryFile struct {
	VMs []control.VMSpec `json:"vms"`
}

// plainRegistry is version 1: no envelope, no checksum.
type plainRegistry struct {
	Version int              `json:"version"`
	VMs     []control.VMSpec `json:"vms"`
}

const (
	registryFormat  = "vdrepl-vms"
	registryVersion = 2
)

// errRegistry: vms.json is neither the enveloped registry nor version 1.
var errRegistry = errors.New("daemon: registry file unreadable")

func (r registry) load() ([]control.VMSpec, error) {
	b, err := vfs.ReadFile(r.fs, r.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var probe struct {
		Format *string `json:"format"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", errRegistry, r.path, err)
	}
	if probe.Format == nil {
		return r.migrate(b)
	}
	var f registryFile
	if err := statefile.Decode(registryFormat, registryVersion, b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", r.path, err)
	}
	return f.VMs, nil
}

// migrate reads a version 1 registry and writes it again as version 2.
func (r registry) migrate(b []byte) ([]control.VMSpec, error) {
	var f plainRegistry
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", errRegistry, r.path, err)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("%w: %s: version %d not supported (want %d, or 1 to migrate)", errRegistry, r.path, f.Version, registryVersion)
	}
	if err := r.save(f.VMs); err != nil {
		return nil, fmt.Errorf("%s: rewrite the version 1 registry with a checksum: %w", r.path, err)
	}
	return f.VMs, nil
}

func (r registry) save(vms []control.VMSpec) error {
	b, err := statefile.Encode(registryFormat, registryVersion, registryFile{VMs: vms})
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(r.fs, r.path, b, 0o600)
}
