# What prepare.sh, run.sh and compare.sh share: where the prepared state lives and who runs
# the tests. Sourced, not run.
#
# CONFORMANCE_DIR: the cache directory (default /var/tmp/nixspace-conformance: the unprivileged
# test user must reach it, and a checkout may sit under a home directory it cannot enter; set
# NIX_CONFORMANCE_DIR to put it elsewhere). It holds:
#   download/   Debian's nix source package (apt-get source --download-only)
#   src/        the unpacked upstream tree, tests/*.in substituted, the plugin built,
#               sandbox-shell/busybox (the stand-in); src/.prepared marks it complete
#   pkg-*/      the daemon packages compare.sh runs the suite with (nixspace's holds a copy
#               of the binary, named nix-daemon, for the same reason)
#   results/    each run's `name result` lines and its logs
# TEST_USER: the unprivileged user the tests run as (root fails simple.sh's read-only check).

CONFORMANCE_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFORMANCE_REPO=$(cd "$CONFORMANCE_HERE/../.." && pwd)
CONFORMANCE_DIR=${NIX_CONFORMANCE_DIR:-/var/tmp/nixspace-conformance}
TEST_USER=${NIX_CONFORMANCE_USER:-nixtester}

# Stops the calling script unless it runs as root.
require_root() {
    [ "$(id -u)" = 0 ] || { echo "$0: run as root (it installs packages and switches to $TEST_USER)" >&2; exit 2; }
}
