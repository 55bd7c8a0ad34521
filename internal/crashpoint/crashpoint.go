// Package crashpoint lets end-to-end tests kill the daemon with SIGKILL at a
// named step of a multi-step operation (a failover, a handover), the way a
// crash would, to prove every step can be finished or explained after a
// restart. The environment variable VDREPL_CRASHPOINT names the step; it is
// read once, at start-up. Unset (always, outside such tests) Hit does
// nothing but compare a string.
package crashpoint

import (
	"os"
	"syscall"
)

// Env is the variable that names the step to crash at.
const Env = "VDREPL_CRASHPOINT"

var armed = os.Getenv(Env)

// Hit kills the process with SIGKILL if name is the armed step.
func Hit(name string) {
	if armed != "" && armed == name {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not delivered synchronously everywhere
	}
}
