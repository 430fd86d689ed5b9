#!/usr/bin/env bash
# run.sh DAEMON_PACKAGE_DIR OUTFILE: runs Nix's functional tests (the `nix_tests` list of
# tests/local.mk in the tree prepare.sh made) the way upstream's `make installcheck` does in
# daemon mode, and writes OUTFILE: one line per test, `name pass|skip|fail|timeout|not-run`,
# in local.mk's order; OUTFILE.logs/<name>.log holds each test's output.
#
# Daemon mode: NIX_DAEMON_PACKAGE=DAEMON_PACKAGE_DIR, whose bin/nix-daemon is the daemon under
# test; each test starts it itself. Each test runs as the test user: `cd tests && bash -e
# init.sh` (its result ignored, as mk/run_test.sh does), then `bash -e <test>.sh` in the test's
# directory. Exit 0 is pass, 99 skip, a timeout (TIMEOUT seconds, default 300) timeout,
# anything else fail. JOBS (default 2) tests at once, each in a cgroup of its own: whatever a
# test leaves behind (its daemon's children, builders) is killed when it ends.
#
# Before the tests, the daemon is started once as the tests start it (no arguments, the test
# user, a private store); if its socket does not appear within 10 s, no test is run and all
# are `not-run` (each would wait 30 s for that socket). ONLY="a.sh ca/b.sh" runs a subset.
# Runs as root; the tree, DAEMON_PACKAGE_DIR and its daemon must be reachable by the test user.
set -u
source "$(dirname "$0")/lib.sh"
require_root

if [ $# -ne 2 ]; then
    echo "usage: $0 DAEMON_PACKAGE_DIR OUTFILE" >&2
    exit 2
fi
PKG=$(realpath "$1")
OUT=$(realpath -m "$2")
SRC=$CONFORMANCE_DIR/src
JOBS=${JOBS:-2}
TIMEOUT=${TIMEOUT:-300}
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

[ -f "$SRC/.prepared" ] || { echo "$SRC is not prepared: run prepare.sh first" >&2; exit 2; }
if ! runuser -u "$TEST_USER" -- test -x "$PKG/bin/nix-daemon"; then
    echo "$PKG/bin/nix-daemon is not executable by $TEST_USER (is every directory above it" \
        "searchable by others?)" >&2
    exit 2
fi

# A cgroup hierarchy to put each test in: the v1 pids controller where it is mounted, else v2.
if [ -d /sys/fs/cgroup/pids ]; then
    CGROOT=/sys/fs/cgroup/pids/nix-conformance
else
    CGROOT=/sys/fs/cgroup/nix-conformance
fi
mkdir -p "$CGROOT" || { echo "cannot create the cgroup $CGROOT" >&2; exit 2; }

# A fresh copy of the tree per run (tests write next to themselves), owned by the test user,
# its common.sh pointing at the copy's sandbox shell; a private TMPDIR (TEST_ROOT is
# $TMPDIR/nix-test/$TEST_NAME).
RUN=$(mktemp -d /tmp/nix-conformance.XXXXXX)
chmod 755 "$RUN"
cp -a "$SRC" "$RUN/src"
sed -i "s|$SRC/sandbox-shell/|$RUN/src/sandbox-shell/|" "$RUN/src/tests/common.sh"
mkdir -p "$RUN/tmp"
chown -R "$TEST_USER:" "$RUN/src" "$RUN/tmp"
# Interrupted, leave nothing behind: the tests' processes and the copy.
cleanup() {
    local cg
    for cg in "$CGROOT"/*."$$"; do
        [ ! -d "$cg" ] || kill_cgroup "$cg"
    done
    rm -rf "$RUN"
}
trap 'trap - EXIT; cleanup; exit 130' INT TERM
LOGS="$OUT.logs"
rm -rf "$LOGS"
mkdir -p "$LOGS" "$RUN/results"

mapfile -t TESTS < <(sed -n '/^nix_tests = \\/,/^$/p' "$SRC/tests/local.mk" |
                     sed -n 's/^[[:space:]]*\([^[:space:]\\]*\.sh\).*/\1/p')
if [ -n "${ONLY:-}" ]; then read -ra TESTS <<< "$ONLY"; fi
echo "$(date +%T) ${#TESTS[@]} tests, daemon package: $PKG, run dir: $RUN" >&2

# Kills what is left in the cgroup $1 and removes it.
kill_cgroup() {
    local cg=$1 i pids
    for i in $(seq 1 50); do
        pids=$(cat "$cg/cgroup.procs" 2>/dev/null)
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086 # one pid per word
        kill -9 $pids 2>/dev/null
        sleep 0.1
    done
    rmdir "$cg" 2>/dev/null || echo "warning: could not remove $cg" >&2
}

# in_cgroup NAME COMMAND...: runs COMMAND as the test user, with a clean environment of
# the extra VAR=value words in the array ENV, in the cgroup NAME, then kills what it left.
# Returns COMMAND's exit status.
in_cgroup() {
    local cg=$CGROOT/$1.$$ rc
    shift
    mkdir -p "$cg"
    (
        echo $BASHPID >"$cg/cgroup.procs"
        exec runuser -u "$TEST_USER" -- env -i PATH="$SYSTEM_PATH" HOME="$(getent passwd "$TEST_USER" | cut -d: -f6)" \
            USER="$TEST_USER" LOGNAME="$TEST_USER" "${ENV[@]}" "$@"
    ) </dev/null
    rc=$?
    kill_cgroup "$cg"
    return $rc
}

# Starts the daemon as common.sh's startDaemon does; true once its socket exists.
daemon_starts() {
    local d=$RUN/tmp/daemon-start
    mkdir -p "$d/etc"
    echo "build-users-group =" >"$d/etc/nix.conf"
    chown -R "$TEST_USER:" "$d"
    local ENV=(NIX_STORE_DIR="$d/store" NIX_LOCALSTATE_DIR="$d/var" NIX_LOG_DIR="$d/var/log/nix"
        NIX_STATE_DIR="$d/var/nix" NIX_CONF_DIR="$d/etc" NIX_DAEMON_SOCKET_PATH="$d/dSocket")
    in_cgroup daemon-start timeout 20 bash -c '
        PATH=$1/bin:$PATH nix-daemon &
        for _ in $(seq 100); do
            [ -S "$NIX_DAEMON_SOCKET_PATH" ] && exit 0
            kill -0 $! 2>/dev/null || { wait $!; echo "the daemon exited with status $?"; exit 1; }
            sleep 0.1
        done
        echo "no socket after 10 s"; exit 1' _ "$PKG"
}

run_one() {
    local t=$1 name=${1%.sh}
    local key=${name//\//_}
    local log="$LOGS/$key.log"
    local ENV=(TMPDIR="$RUN/tmp" TEST_NAME="tests/$name" NIX_REMOTE= NIX_DAEMON_PACKAGE="$PKG"
        GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=protocol.file.allow GIT_CONFIG_VALUE_0=always)
    local dir base start=$SECONDS rc res
    dir=$RUN/src/tests/$(dirname "$t")
    base=$(basename "$t")
    in_cgroup "$key" timeout -k 10 "$TIMEOUT" bash -c '
        (cd "$1/tests" && bash -e init.sh >/dev/null 2>&1)
        cd "$2" && exec bash -e "$3"' _ "$RUN/src" "$dir" "$base" >"$log" 2>&1
    rc=$?
    case $rc in
        0) res=pass ;;
        99) res=skip ;;
        124|137) res=timeout ;;
        *) res=fail ;;
    esac
    echo "exit $rc after $((SECONDS - start)) s" >>"$log"
    echo "$name $res" >"$RUN/results/$key"
    echo "$(date +%T) $name $res ($((SECONDS - start)) s)" >&2
}

if daemon_starts >"$LOGS/daemon-start.log" 2>&1; then
    running=0
    for t in "${TESTS[@]}"; do
        if [ $running -ge "$JOBS" ]; then
            wait -n
            running=$((running - 1))
        fi
        run_one "$t" &
        running=$((running + 1))
    done
    wait
else
    echo "$(date +%T) the daemon does not start as the tests start it (see $LOGS/daemon-start.log):" \
        "no test run" >&2
fi

: >"$OUT"
for t in "${TESTS[@]}"; do
    name=${t%.sh}
    key=${name//\//_}
    if [ -f "$RUN/results/$key" ]; then cat "$RUN/results/$key" >>"$OUT"; else echo "$name not-run" >>"$OUT"; fi
done
rm -rf "$RUN"
echo "$(date +%T) done: $(awk '{print $2}' "$OUT" | sort | uniq -c | tr '\n' ' ')" >&2
