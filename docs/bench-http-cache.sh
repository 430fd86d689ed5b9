#!/bin/bash
# Binary caches over HTTP (docs/BENCHMARKS.md, issue 24): N paths of SIZE random bytes copied
# with `nix copy --from` into a fresh store from (a) a plain file server of the zstd cache
# `nix copy --to` wrote, (b) `nixspace cache serve` with that cache behind `nixspace substitute`
# in the dataspace, (c) `nixspace cache serve` with a worker serving the local store. Needs root
# (it adds to and deletes from /nix/store), Nix, python3 and bc. Ports 18080 and 18081.
set -euo pipefail
D=${BENCH_DIR:-${TMPDIR:-/tmp}/nixspace-http-cache-bench};  rm -rf $D; mkdir -p $D/conf
printf 'build-users-group =\nsandbox = false\nexperimental-features = nix-command ca-derivations\nsubstituters =\n' > $D/conf/nix.conf
export NIX_CONF_DIR=$D/conf
NS=${NIXSPACE:-target/debug/nixspace}; NS=$(realpath "$NS")
N=${N:-100}; SIZE=${SIZE:-1048576}; REPS=${REPS:-3}
mkdir -p $D/files
for i in $(seq 1 $N); do head -c $SIZE /dev/urandom > $D/files/f$i; done
paths=$(nix-store --add $D/files/f*)
nix-store --generate-binary-cache-key bench-1 $D/sk $D/pk
nix copy --to "file://$D/cache?compression=zstd&secret-key=$D/sk" $paths
nix-store --delete $paths >/dev/null 2>&1
python3 -m http.server --directory $D/cache 18080 --bind 127.0.0.1 >/dev/null 2>&1 &
PY=$!
pids=($PY)
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT
sleep 1
fetch() { # fetch URL LABEL
  for r in $(seq 1 $REPS); do
    rm -rf $D/fresh
    s=$(date +%s.%N)
    nix copy --from "$1" --to "local?root=$D/fresh" --option trusted-public-keys "$(cat $D/pk)" $paths
    e=$(date +%s.%N)
    echo "$2 rep $r: $(echo "$e - $s" | bc) s"
  done
}
fetch http://127.0.0.1:18080 "(a) nix copy --from python http.server (zstd files)"
$NS up --dir $D/ns --state-dir $D/state >$D/up.log 2>&1 & pids+=($!)
while [ ! -e $D/ns/worker.route ]; do sleep 0.2; done
$NS substitute --dir $D/ns --name cache http://127.0.0.1:18080 --trusted-public-key "$(cat $D/pk)" >$D/sub.log 2>&1 & SUB=$!; pids+=($SUB)
$NS cache serve --dir $D/ns --name serve 127.0.0.1:18081 --secret-key $D/sk --trusted-public-key "$(cat $D/pk)" --wait 10 >$D/serve.log 2>&1 & pids+=($!)
sleep 2
fetch http://127.0.0.1:18081 "(b) nix copy --from cache serve <- dataspace <- substitute http (zstd)"
kill $SUB; sleep 1
nix-store --add $D/files/f* >/dev/null
$NS worker --dir $D/ns >$D/worker.log 2>&1 & pids+=($!)
sleep 3
fetch http://127.0.0.1:18081 "(c) nix copy --from cache serve <- dataspace <- worker's store"
