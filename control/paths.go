package control

import "path/filepath"

// Where a daemon keeps its state and listens unless told otherwise; the
// daemon, the CLI and doctor agree on them through these.

// DefaultStateDir is where state lives unless --state or VDREPL_STATE says.
const DefaultStateDir = "/var/lib/vdrepl"

// DefaultControl is the control socket for a state directory.
func DefaultControl(stateDir string) string { return filepath.Join(stateDir, "control.sock") }

// DefaultNBD is the NBD listen list for a state directory: the unix socket
// only. A TCP listener is asked for explicitly, and is TLS-only unless
// named insecure.
func DefaultNBD(stateDir string) []string {
	return []string{"unix:" + filepath.Join(stateDir, "nbd.sock")}
}
