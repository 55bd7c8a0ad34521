#!/usr/bin/env bash
# Checks that package dependencies point the way DESIGN.md says:
# cmd -> (daemon, blockdev, ship, apply, snapshot) -> journal -> internal;
# the control API sits between cmd/doctor and the daemon.
# Front ends know nothing of replication; apply never imports ship; no
# package imports cmd; leaf packages import nothing of ours.
set -euo pipefail
mod=$(go list -m)
fail=0
deps() { go list -f '{{join .Imports "\n"}}' "$mod/$1" 2>/dev/null | grep "^$mod/" | sed "s#^$mod/##" || true; }
forbid() { # package, forbidden import prefixes...
  local pkg=$1; shift
  [ -d "$pkg" ] || return 0
  for d in $(deps "$pkg"); do
    for f in "$@"; do
      case "$d" in "$f"|"$f"/*) echo "dependency rule broken: $pkg imports $d"; fail=1;; esac
    done
  done
}
forbid blockdev journal ship apply snapshot daemon cmd control
forbid journal blockdev ship apply snapshot daemon cmd control
forbid apply ship cmd daemon control
forbid ship apply cmd daemon control
forbid snapshot cmd daemon control
# Guest freeze/thaw is a leaf the primary's seal calls: it imports nothing
# of ours but, should it come to persist anything, the filesystem seam.
forbid quiesce journal blockdev ship apply snapshot daemon doctor cmd control internal/wire internal/pki internal/statefile internal/crashpoint internal/fakedisk
forbid internal/vfs journal blockdev ship apply snapshot daemon cmd control
# The wire format is a leaf: both sides of replication import it, it imports
# nothing of ours.
forbid internal/wire journal blockdev ship apply snapshot daemon cmd internal/vfs internal/pki control
forbid internal/statefile journal blockdev ship apply snapshot daemon cmd internal/vfs internal/wire internal/pki control
forbid internal/pki journal blockdev ship apply snapshot daemon cmd internal/wire control
# The control API (types, handler, client) knows the daemon only as the
# Host interface it defines; it carries the types of journal, ship, apply,
# snapshot and wire that its answers embed, and serves nothing itself.
forbid control daemon cmd doctor blockdev internal/vfs internal/pki internal/statefile
# The daemon serves the control API.
forbid daemon cmd doctor
# The failover state machine and the relay of extended replication are
# used by the daemon; they know nothing of it, the control API or cmd.
# failover imports no replication package at all: the daemon adapts apply.
forbid failover cmd daemon control apply ship journal snapshot blockdev relay doctor
forbid relay cmd daemon control failover doctor blockdev
# doctor reads the daemon through the control API and probes replicas;
# nothing below cmd uses it.
forbid doctor cmd daemon
exit $fail
