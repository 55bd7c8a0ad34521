#!/usr/bin/env bash
# Checks that package dependencies point the way docs/design.md says:
#   cmd -> (daemon, control, doctor) -> (blockdev, ship, apply, snapshot,
#   failover, relay, quiesce) -> journal -> internal/*
# Front ends know nothing of replication; apply never imports ship; no
# package imports cmd; leaf packages import nothing of ours, or only what
# their rule names.
set -euo pipefail
mod=$(go list -m)
fail=0
deps() { go list -f '{{join .Imports "\n"}}' "$mod/$1" 2>/dev/null | grep "^$mod/" | sed "s#^$mod/##" || true; }
forbid() { # package, forbidden import prefixes...
  local pkg=$1; shift
  [ -d "$pkg" ] || { echo "check-deps: no package $pkg"; fail=1; return 0; }
  for d in $(deps "$pkg"); do
    for f in "$@"; do
      case "$d" in "$f"|"$f"/*) echo "dependency rule broken: $pkg imports $d"; fail=1;; esac
    done
  done
}
only() { # package, the only packages of ours it may import...
  local pkg=$1; shift
  [ -d "$pkg" ] || { echo "check-deps: no package $pkg"; fail=1; return 0; }
  for d in $(deps "$pkg"); do
    local ok=0
    for a in "$@"; do [ "$d" = "$a" ] && ok=1; done
    [ $ok = 1 ] || { echo "dependency rule broken: $pkg imports $d (it may import only: ${*:-nothing of ours})"; fail=1; }
  done
}

# Leaves: formats and seams that every layer shares import nothing of ours.
only internal/wire
only internal/recordlog   # the record framing every log shares (journal, snapshot)
only internal/statefile
only internal/units       # sizes rendered for people (doctor and the CLI)
only internal/pki internal/vfs
only internal/vfs
only internal/crashpoint
only internal/fakedisk blockdev   # a test disk behind the front ends
# Guest freeze/thaw is a leaf the primary's seal calls.
only quiesce
# The failover state machine knows no replication package: the daemon adapts
# apply to its interfaces. It persists through the seam.
only failover internal/vfs internal/statefile internal/crashpoint internal/wire

# The write path and the front ends.
forbid journal blockdev ship apply snapshot relay failover control daemon doctor cmd
forbid blockdev journal ship apply snapshot relay failover control daemon doctor cmd
# Both sides of replication; apply never imports ship, and back.
forbid apply ship relay failover control daemon doctor cmd
forbid ship apply relay failover control daemon doctor cmd
forbid snapshot ship apply relay failover control daemon doctor cmd
# The relay of extended replication joins a journal and a shipper over the
# replica images; it knows nothing of the host around it.
forbid relay failover control daemon doctor cmd blockdev
# The control API (types, handler, client) knows the daemon only as the
# Host interface it defines; it carries the types of journal, ship, apply,
# snapshot and wire that its answers embed, and serves nothing itself.
forbid control daemon doctor cmd blockdev relay failover internal/vfs internal/pki internal/statefile
# The daemon serves the control API; nothing imports the daemon but cmd.
forbid daemon doctor cmd
# doctor reads the daemon through the control API and probes replicas;
# nothing below cmd uses it.
forbid doctor daemon cmd
exit $fail
