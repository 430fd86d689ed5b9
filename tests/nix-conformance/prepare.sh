#!/usr/bin/env bash
# prepare.sh: makes everything Nix's functional test suite needs on a Debian machine, from
# nothing, into the cache directory (see lib.sh); each step is skipped when already done.
#
#   1. the Debian packages of PACKAGES below that are missing
#   2. a deb-src entry, if apt knows no source for nix: the mirror and suite of the machine's
#      own `deb` entries, component main
#   3. the source of the installed nix-bin's version (apt-get source --download-only)
#   4. the upstream tarball unpacked to src/, tests/**/*.in substituted as configure would
#   5. tests/plugins/libplugintest.so, built against the tree's headers
#   6. src/sandbox-shell/busybox, the stand-in for a static busybox (busybox-stand-in.c)
#   7. the unprivileged test user
#
# Runs as root. Usage: prepare.sh (no arguments; NIX_CONFORMANCE_DIR moves the cache).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root

# Debian packages the suite needs beyond nix-bin, and why: g++ and the headers Nix's own
# headers include, for the plugin test's library; busybox-static for the sandbox shell; the
# tools the tests call (git: fetchGit, flakes; jq; xz, bzip2: tarballs and NARs).
PACKAGES=(nix-bin g++ libgc-dev libboost-dev nlohmann-json3-dev busybox-static git jq xz-utils bzip2)

log() { echo "prepare: $*" >&2; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Prints "URI SIGNED-BY" of the machine's first `deb` entry for SUITE (deb822 or one-line
# format); SIGNED-BY may be empty.
machine_mirror() {
    local suite=$1 found
    found=$(awk -v suite="$suite" '
        function emit() {
            if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                split(uris, u, " "); print u[1], signed; done = 1; exit
            }
            types = ""; uris = ""; suites = ""; signed = ""
        }
        FNR == 1 { emit() }
        /^[[:space:]]*$/ { emit(); next }
        /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
        /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
        /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
        /^Signed-By:/ { sub(/^Signed-By:[[:space:]]*/, ""); signed = $0 }
        END { if (!done) emit() }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$found" ]; then
        # One-line format: deb [options] URI SUITE COMPONENTS...
        found=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\)[[:space:]]\+'"$suite"'[[:space:]].*/\2/p' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1)
    fi
    echo "$found"
}

ensure_source_entry() {
    if apt-cache showsrc nix 2>/dev/null | grep -q '^Package: nix$'; then
        return
    fi
    local codename mirror signed
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    read -r mirror signed <<<"$(machine_mirror "$codename")"
    if [ -z "$mirror" ]; then
        log "no deb entry for $codename in the apt sources: add a deb-src entry for nix by hand"
        exit 1
    fi
    log "adding a deb-src entry ($codename main, the machine's mirror)"
    {
        echo "Types: deb-src"
        echo "URIs: $mirror"
        echo "Suites: $codename"
        echo "Components: main"
        [ -z "$signed" ] || echo "Signed-By: $signed"
    } >/etc/apt/sources.list.d/nix-conformance-src.sources
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
}

# The source package of the installed Nix, so the tests match the binaries they test.
download_source() {
    local version=$1
    mkdir -p "$CONFORMANCE_DIR/download"
    # apt downloads as _apt where it can; without this it warns that it cannot.
    ! id _apt >/dev/null 2>&1 || chown _apt: "$CONFORMANCE_DIR/download"
    if ! ls "$CONFORMANCE_DIR"/download/nix_*.orig.tar.* >/dev/null 2>&1; then
        log "downloading the source of nix $version"
        (cd "$CONFORMANCE_DIR/download" && apt-get source -qq --download-only "nix=$version")
    fi
}

# Writes FILE from FILE.in with configure's @name@ values for the tests.
substitute() {
    local in=$1 upstream=$2
    local dot
    dot=$(command -v dot || true)
    sed -e "s|@bindir@|$(dirname "$(command -v nix-store)")|g" \
        -e "s|@coreutils@|$(dirname "$(command -v cat)")|g" \
        -e "s|@bash@|$(command -v bash)|g" \
        -e "s|@dot@|$dot|g" \
        -e "s|@sandbox_shell@|$CONFORMANCE_DIR/src/sandbox-shell/busybox|g" \
        -e "s|@system@|$(uname -m)-linux|g" \
        -e "s|@PACKAGE_VERSION@|$upstream|g" \
        "$in" >"${in%.in}"
    if grep -n '@[a-zA-Z_]*@' "${in%.in}" | grep -v '"\$@"'; then
        log "unsubstituted values left in ${in%.in}"
        exit 1
    fi
}

# Nix's configure defines these for its headers; the Debian build uses the Boehm GC, and the
# plugin must agree with the installed libnixexpr about it.
build_plugin() {
    local tree=$1 upstream=$2
    cat >"$tree/tests/plugins/config.h" <<EOF
#define HAVE_BOEHMGC 1
#define SYSTEM "$(uname -m)-linux"
#define PACKAGE_VERSION "$upstream"
EOF
    g++ -std=c++17 -O1 -shared -fPIC -include "$tree/tests/plugins/config.h" \
        -I "$tree/src/libutil" -I "$tree/src/libstore" -I "$tree/src/libexpr" \
        -I "$tree/src/libfetchers" -I "$tree/src/libmain" \
        -o "$tree/tests/plugins/libplugintest.so" "$tree/tests/plugins/plugintest.cc"
}

prepare_tree() {
    local version upstream tree tarball stamp
    version=$(dpkg-query -W -f='${source:Version}' nix-bin)
    upstream=$(dpkg-query -W -f='${source:Upstream-Version}' nix-bin)
    tree=$CONFORMANCE_DIR/src
    # What the tree is made of: the Nix version and the scripts that make it.
    stamp="$version $(cat "$CONFORMANCE_HERE/prepare.sh" "$CONFORMANCE_HERE/busybox-stand-in.c" | sha256sum | cut -d' ' -f1)"
    if [ -f "$tree/.prepared" ] && [ "$(cat "$tree/.prepared")" = "$stamp" ]; then
        log "$tree is ready (nix $version)"
        return
    fi
    download_source "$version"
    tarball=$(ls "$CONFORMANCE_DIR"/download/nix_"$upstream".orig.tar.*)
    log "unpacking $(basename "$tarball")"
    rm -rf "$tree" "$tree.tmp"
    mkdir -p "$tree.tmp"
    tar -xf "$tarball" -C "$tree.tmp" --strip-components=1
    find "$tree.tmp/tests" -name '*.in' -print0 | while IFS= read -r -d '' f; do
        substitute "$f" "$upstream"
    done
    log "building the plugin test's library"
    build_plugin "$tree.tmp" "$upstream"
    log "building the sandbox shell"
    mkdir -p "$tree.tmp/sandbox-shell"
    gcc -O2 -static -o "$tree.tmp/sandbox-shell/busybox" "$CONFORMANCE_HERE/busybox-stand-in.c"
    echo "$stamp" >"$tree.tmp/.prepared"
    mv "$tree.tmp" "$tree"
}

ensure_test_user() {
    if ! id "$TEST_USER" >/dev/null 2>&1; then
        log "creating the test user $TEST_USER"
        useradd --create-home --shell /bin/bash "$TEST_USER"
    fi
}

install_packages
ensure_source_entry
prepare_tree
ensure_test_user
