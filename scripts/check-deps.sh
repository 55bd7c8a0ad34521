#!/usr/bin/env bash
# Checks that package dependencies point the way DESIGN.md says:
# cmd -> (daemon, blockdev, ship, apply, snapshot) -> journal -> internal.
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
forbid blockdev journal ship apply snapshot daemon cmd
forbid journal blockdev ship apply snapshot daemon cmd
forbid apply ship cmd daemon
forbid ship apply cmd daemon
forbid snapshot cmd daemon
forbid internal/vfs journal blockdev ship apply snapshot daemon cmd
# The wire format is a leaf: both sides of replication import it, it imports
# nothing of ours.
forbid internal/wire journal blockdev ship apply snapshot daemon cmd internal/vfs internal/pki
# The record framing every log shares (journal, snapshot) is a leaf too.
forbid internal/recordlog journal blockdev ship apply snapshot daemon cmd doctor internal/vfs internal/wire internal/statefile internal/pki internal/crashpoint internal/fakedisk
forbid internal/statefile journal blockdev ship apply snapshot daemon cmd internal/vfs internal/wire internal/pki
forbid internal/pki journal blockdev ship apply snapshot daemon cmd internal/wire
forbid daemon cmd doctor
# doctor reads the daemon and probes replicas; nothing below cmd uses it.
forbid doctor cmd
exit $fail
