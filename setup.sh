#!/usr/bin/env bash
# nixspace setup for a Debian machine with Rust.
#
#   ./setup.sh        install what is missing, build, and run the demo:
#                     a dataspace, two workers and a real Nix build of
#                     examples/demo/default.nix, all on this machine
#   ./setup.sh test   install what is missing and run the whole test suite
#
# Installs Debian's Nix (nix-bin) when `nix-store` is not on PATH; that step
# needs root (or sudo). Builds need a writable Nix store: run as root, or have
# a nix-daemon running and NIX_REMOTE=daemon set.
set -euo pipefail
cd "$(dirname "$0")"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_nix() {
    if ! command -v nix-store >/dev/null 2>&1; then
        echo "setup: installing Nix (Debian package nix-bin)..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin
    fi
    if [ "$(id -u)" -ne 0 ] && [ -z "${NIX_REMOTE:-}" ]; then
        echo "setup: note: not root and NIX_REMOTE is unset; builds need a writable /nix/store" >&2
        echo "setup:       (run as root, or start nix-daemon and export NIX_REMOTE=daemon)" >&2
    fi
}

# tests/bench.rs runs a private sshd (an ssh-ng remote builder, the baseline of
# `nixspace bench dag --columns ssh`).
ensure_sshd() {
    if [ ! -x /usr/sbin/sshd ]; then
        echo "setup: installing openssh-server (for the ssh-ng benchmark test)..." >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server
    fi
}

case "${1:-demo}" in
    demo)
        ensure_nix
        cargo build --release --bin nixspace
        # The demo needs no binary cache; skip it so offline machines do not
        # wait for cache.nixos.org on every build step.
        NIX_CONFIG="substituters =" ./target/release/nixspace demo
        ;;
    test)
        ensure_nix
        ensure_sshd
        # The examples run as separate programs in the tests: build every binary first.
        cargo build --workspace --bins
        cargo test --workspace
        ;;
    *)
        echo "usage: ./setup.sh [demo|test]" >&2
        exit 2
        ;;
esac
