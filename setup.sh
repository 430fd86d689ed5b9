#!/usr/bin/env bash
# nixspace setup for a Debian machine with Rust.
#
#   ./setup.sh        install Nix if missing, build, and run the demo:
#                     a dataspace, two workers and a real Nix build of
#                     examples/demo/default.nix, all on this machine
#   ./setup.sh deps   install what the tests need (the list below) if missing
#   ./setup.sh test   `deps`, then build every binary and run the whole test suite
#   ./setup.sh conformance [--require-parity]
#                     Nix 2.8's own functional tests with the real nix-daemon and
#                     with nixspace (the debug binary, target/debug/nixspace) as
#                     nix-daemon; writes docs/COMPATIBILITY.md (needs root; see
#                     tests/nix-conformance/README.md)
#
# Installing Debian packages needs root (or sudo). Builds need a writable Nix
# store: run as root, or have a nix-daemon running and NIX_REMOTE=daemon set.
# The tests bring their own Nix configuration (crates/test-support): they need
# nothing in /etc/nix.
set -euo pipefail
cd "$(dirname "$0")"

# What the tests need, the one list (.ci/run installs it with `./setup.sh deps`).
# Debian packages, each with the program that shows it is there: Nix 2.8; sshd
# and ssh-keygen for the ssh-ng remote-builder baseline of tests/bench.rs; kill
# for the tests' private nix-daemons; unshare and mount for workers with stores
# of their own; ip for a test's own network namespace (tests/noise.rs); headless
# Chromium for the web view's test in a real browser (tests/web.rs).
TEST_PROGRAMS=(
    "nix-bin nix-store"
    "openssh-server /usr/sbin/sshd"
    "openssh-client ssh-keygen"
    "procps kill"
    "util-linux unshare"
    "mount mount"
    "iproute2 ip"
    "chromium chromium"
)
# And syndicate-server, which tests/scaleout.rs runs, from the crate registry
# (about 5 minutes to build; `syndicate` needs nightly features, hence
# RUSTC_BOOTSTRAP). Kept in cargo's bin directory: cache it between CI runs.
SYNDICATE_SERVER_VERSION=0.51.0-rc.4
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install the Debian package of each "package program" pair in "$@" whose
# program is not on PATH (nor at its absolute path).
ensure_programs() {
    local missing=() package program
    for pair in "$@"; do
        read -r package program <<<"$pair"
        if ! PATH="$PATH:/usr/sbin:/sbin" type -P "$program" >/dev/null; then
            missing+=("$package")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]}..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

ensure_nix() {
    ensure_programs "nix-bin nix-store"
    if [ "$(id -u)" -ne 0 ] && [ -z "${NIX_REMOTE:-}" ]; then
        echo "setup: note: not root and NIX_REMOTE is unset; builds need a writable /nix/store" >&2
        echo "setup:       (run as root, or start nix-daemon and export NIX_REMOTE=daemon)" >&2
    fi
}

ensure_syndicate_server() {
    if ! PATH="$PATH:$CARGO_BIN" syndicate-server --version >/dev/null 2>&1; then
        echo "setup: installing syndicate-server $SYNDICATE_SERVER_VERSION (about 5 minutes)..." >&2
        RUSTC_BOOTSTRAP=1 cargo install syndicate-server \
            --version "=$SYNDICATE_SERVER_VERSION" --locked
    fi
}

test_deps() {
    ensure_programs "${TEST_PROGRAMS[@]}"
    ensure_nix
    ensure_syndicate_server
}

case "${1:-demo}" in
    demo)
        ensure_nix
        cargo build --release --bin nixspace
        # The demo needs no binary cache; skip it so offline machines do not
        # wait for cache.nixos.org on every build step.
        NIX_CONFIG="substituters =" ./target/release/nixspace demo
        ;;
    deps)
        test_deps
        ;;
    test)
        test_deps
        # The examples run as separate programs in the tests: build every binary first.
        cargo build --workspace --bins
        # Every test program runs even when an earlier one fails.
        cargo test --workspace --no-fail-fast
        ;;
    conformance)
        shift
        ensure_nix
        # The debug binary: the one `./setup.sh test` (and so CI) has already built.
        cargo build --bin nixspace
        tests/nix-conformance/prepare.sh
        tests/nix-conformance/compare.sh --nixspace target/debug/nixspace "$@"
        ;;
    *)
        echo "usage: ./setup.sh [demo|deps|test|conformance [--require-parity]]" >&2
        exit 2
        ;;
esac
