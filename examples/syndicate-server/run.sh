#!/usr/bin/env bash
# nixspace on a standalone syndicate-server, all on this machine: the server on
# 127.0.0.1, the planner (`nixspace up --external`) and two workers as its
# clients, then a build of examples/demo. Everything is stopped at the end.
#
#   examples/syndicate-server/run.sh        (NIXSPACE=path/to/nixspace, PORT=7420)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
nixspace=${NIXSPACE:-nixspace}
port=${PORT:-7420}
if ! command -v syndicate-server >/dev/null; then
    echo "run.sh: syndicate-server is not on PATH; install it with" >&2
    echo "  RUSTC_BOOTSTRAP=1 cargo install syndicate-server --version =0.51.0-rc.4 --locked" >&2
    exit 1
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export NIXSPACE_DIR=$work/run NIXSPACE_STATE_DIR=$work/state
export NIX_CONFIG="substituters ="   # the demo needs no binary cache

"$nixspace" server-config --tcp "127.0.0.1:$port"
syndicate-server --no-banner -c "$NIXSPACE_DIR/syndicate-server.pr" 2>"$work/server.log" &
pids+=($!)
"$nixspace" up --external 2>"$work/up.log" &
pids+=($!)
for _ in $(seq 100); do
    grep -q "planner joined" "$work/up.log" && break
    sleep 0.2
done
grep "planner joined" "$work/up.log" || { cat "$work/up.log" >&2; exit 1; }
for w in w1 w2; do
    "$nixspace" worker --id "$w" 2>"$work/$w.log" &
    pids+=($!)
done
# A fresh nonce, so the demo's steps are built (not found valid from an earlier run).
echo "import $here/../demo/default.nix { nonce = \"$(date +%s%N)\"; }" >"$work/demo.nix"
"$nixspace" build "$work/demo.nix"
