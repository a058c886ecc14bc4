#!/usr/bin/env bash
# Install the system packages that `adapterlab plugins new` projects need to build, where
# they are missing: the test set-up runs it before building the projects (tests/e2e/plugins_new.rs).
#
#   scripts/plugin-toolchains.sh [rust] [python] [js] [c]     (default: all four)
#
#   rust    the wasm32-wasip2 target (rustup target add)
#   python  python3 >= 3.9 with venv or pip (checked; apt-get install python3-venv if root)
#   js      node >= 20 and npm (checked only: Debian 12's nodejs is 18, too old)
#   c       clang, wasm-ld and wasi-libc for wasm32-wasi: on Debian/Ubuntu, as root,
#           apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 (prebuilt packages)
#
# The per-project tools (componentize-py, componentize-js, jco, wit-bindgen) are not system
# packages: each project's build.sh installs its pins into
# ${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains} on first use.
# Exits non-zero, saying what is missing and how to install it, when it cannot help.
set -Eeuo pipefail

say() { printf 'plugin-toolchains.sh: %s\n' "$*"; }
die() {
    printf 'plugin-toolchains.sh: error: %s\n' "$*" >&2
    exit 1
}

APT_UPDATED=0
# apt_install PACKAGE...: as root on a Debian-like system, or die naming the packages.
apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing: $* (Debian/Ubuntu: sudo apt-get install $*)"
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    # Another apt may hold the lock for a while (a machine's own updates): wait for it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "$@" >/dev/null || die "apt-get install $* failed"
}

rust() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install Rust with rustup)"
    if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
        say "rustup target add wasm32-wasip2"
        rustup target add wasm32-wasip2 || die "rustup target add wasm32-wasip2 failed"
    fi
}

python() {
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
        die "python3 is $(python3 --version 2>&1); componentize-py needs Python >= 3.9"
    # componentize-py goes into a venv: needs the venv module with ensurepip, or pip.
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-venv
    fi
}

js() {
    command -v node >/dev/null 2>&1 || die "node not found on PATH (need Node.js >= 20 with npm)"
    command -v npm >/dev/null 2>&1 || die "npm not found on PATH (it comes with Node.js)"
    [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ||
        die "node is $(node --version); componentize-js needs Node.js >= 20"
}

# Can clang build and link a wasm32-wasi reactor that uses libc?
c_works() {
    local dir rc=0
    dir=$(mktemp -d "${TMPDIR:-/tmp}/plugin-toolchains.XXXXXX")
    printf '#include <stdlib.h>\n#include <string.h>\nvoid *f(size_t n) { return memset(malloc(n), 0, n); }\n' >"$dir/p.c"
    clang --target=wasm32-wasi -mexec-model=reactor -O2 "$dir/p.c" -o "$dir/p.wasm" >"$dir/log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || sed 's/^/  /' "$dir/log" >&2
    rm -rf "$dir"
    return "$rc"
}

c() {
    js # jco turns the core module into a component
    command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (needed once, to install wit-bindgen)"
    if command -v clang >/dev/null 2>&1 && c_works 2>/dev/null; then
        return
    fi
    # clang: the compiler; lld: wasm-ld; wasi-libc: the C library; libclang-rt-dev-wasm32:
    # compiler-rt's builtins, which clang links into every wasm32 binary.
    apt_install clang lld wasi-libc libclang-rt-dev-wasm32
    c_works || die "clang still cannot build for wasm32-wasi after installing clang lld wasi-libc libclang-rt-dev-wasm32"
}

[ $# -gt 0 ] || set -- rust python js c
for lang in "$@"; do
    case "$lang" in
    rust | python | js | c) "$lang" ;;
    *) die "unknown language $lang (expected rust, python, js or c)" ;;
    esac
    say "$lang: ready"
done
