#!/usr/bin/env bash
# compare.sh [--require-parity] [--nixspace BINARY] [--output FILE]: runs Nix's functional
# tests (run.sh) with the real nix-daemon and with nixspace installed as a package's
# bin/nix-daemon (a copy of BINARY, default target/debug/nixspace: no wrapper), then writes
# FILE (default docs/COMPATIBILITY.md): every test, its result with each daemon, and for every
# difference the reason given in reasons.txt ("not yet analysed" where it gives none). The
# table is printed too.
#
# Exit status: 1 if the real nix-daemon fails a test (or times out, or does not start):
# it passes or skips every test on a machine prepare.sh prepared, so the runner is broken;
# with --require-parity, 1 also if nixspace's result differs from nix-daemon's for any test;
# 2 for a usage error. Runs as root, after prepare.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root

NIXSPACE=$CONFORMANCE_REPO/target/debug/nixspace
OUTPUT=$CONFORMANCE_REPO/docs/COMPATIBILITY.md
REQUIRE_PARITY=
while [ $# -gt 0 ]; do
    case $1 in
        --require-parity) REQUIRE_PARITY=1 ;;
        --nixspace) NIXSPACE=$2; shift ;;
        --output) OUTPUT=$2; shift ;;
        *) echo "usage: $0 [--require-parity] [--nixspace BINARY] [--output FILE]" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$NIXSPACE" ] || { echo "$NIXSPACE is not an executable: build it first" >&2; exit 2; }

# make_package NAME DAEMON: a package directory whose bin/nix-daemon is DAEMON: a symlink to
# it when it is on PATH already (the real one), else a copy the test user can run wherever the
# checkout is.
make_package() {
    local bin=$CONFORMANCE_DIR/pkg-$1/bin
    mkdir -p "$bin"
    rm -f "$bin/nix-daemon"
    case $2 in
        /usr/*) ln -s "$2" "$bin/nix-daemon" ;;
        *) install -m 755 "$2" "$bin/nix-daemon" ;;
    esac
    echo "$CONFORMANCE_DIR/pkg-$1"
}

RESULTS=$CONFORMANCE_DIR/results
mkdir -p "$RESULTS"
"$CONFORMANCE_HERE/run.sh" "$(make_package nix-daemon "$(command -v nix-daemon)")" "$RESULTS/nix-daemon.txt"
"$CONFORMANCE_HERE/run.sh" "$(make_package nixspace "$(realpath "$NIXSPACE")")" "$RESULTS/nixspace.txt"

# reasons.txt: `test-name reason...` lines; # comments and blank lines ignored.
declare -A REASON
while read -r name reason; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] || REASON[$name]=$reason
done <"$CONFORMANCE_HERE/reasons.txt"

# count FILE RESULT: how many tests in FILE have RESULT.
count() { awk -v r="$2" '$2 == r { n++ } END { print n + 0 }' "$1"; }

render() {
    local real nixspace name r n reason differences=0
    echo "# Compatibility: Nix 2.8's functional tests with nixspace as nix-daemon"
    echo
    echo "Written by \`tests/nix-conformance/compare.sh\` (\`./setup.sh conformance\`); do not edit:"
    echo "the reasons come from \`tests/nix-conformance/reasons.txt\`. Each test of Nix"
    echo "$(dpkg-query -W -f='${source:Version}' nix-bin)'s \`tests/local.mk\` ran in daemon mode (as upstream's"
    echo "\`make installcheck\` runs it), once with the real \`nix-daemon\` and once with the nixspace"
    echo "binary as the package's \`bin/nix-daemon\` (nixspace $(git -C "$CONFORMANCE_REPO" describe --always --dirty)). How the runner works and"
    echo "why tests skip: \`tests/nix-conformance/README.md\`."
    echo
    echo "| daemon | pass | skip | fail | timeout | not run |"
    echo "|---|---|---|---|---|---|"
    for r in nix-daemon nixspace; do
        echo "| \`$r\` | $(count "$RESULTS/$r.txt" pass) | $(count "$RESULTS/$r.txt" skip)" \
            "| $(count "$RESULTS/$r.txt" fail) | $(count "$RESULTS/$r.txt" timeout)" \
            "| $(count "$RESULTS/$r.txt" not-run) |"
    done
    echo
    for r in nix-daemon nixspace; do
        if [ "$(count "$RESULTS/$r.txt" not-run)" -gt 0 ]; then
            echo "\`$r\` did not start as the tests start it (\`nix-daemon\`, no arguments):"
            echo "$(tail -n 1 "$RESULTS/$r.txt.logs/daemon-start.log"), so no test ran."
            echo
        fi
    done
    echo "| test | nix-daemon | nixspace | reason for the difference |"
    echo "|---|---|---|---|"
    while read -r name real && read -r n nixspace <&3; do
        [ "$name" = "$n" ] || { echo "the two runs list different tests ($name, $n)" >&2; exit 1; }
        reason=
        if [ "$real" != "$nixspace" ]; then
            differences=$((differences + 1))
            if [ "$nixspace" = not-run ]; then
                reason="the daemon did not start as the tests start it"
            else
                reason=${REASON[$name]:-not yet analysed}
            fi
        elif [ -n "${REASON[$name]:-}" ]; then
            echo "compare: reasons.txt explains $name, which no longer differs" >&2
        fi
        echo "| $name | $real | $nixspace | $reason |"
    done <"$RESULTS/nix-daemon.txt" 3<"$RESULTS/nixspace.txt"
    echo
    echo "$differences of $(wc -l <"$RESULTS/nix-daemon.txt") tests differ."
}

render | tee "$OUTPUT"

broken=$(awk '$2 != "pass" && $2 != "skip" { print $1 }' "$RESULTS/nix-daemon.txt" | tr '\n' ' ')
if [ -n "$broken" ]; then
    echo "compare: the real nix-daemon did not pass: $broken- the runner is broken" \
        "(logs: $RESULTS/nix-daemon.txt.logs)" >&2
    exit 1
fi
if [ -n "$REQUIRE_PARITY" ] && ! cmp -s "$RESULTS/nix-daemon.txt" "$RESULTS/nixspace.txt"; then
    echo "compare: nixspace's results differ from nix-daemon's (logs: $RESULTS/nixspace.txt.logs)" >&2
    exit 1
fi
