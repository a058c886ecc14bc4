#!/usr/bin/env bash
# Build the metric plugin `{{name}}` as a WebAssembly component: ./build.sh -> {{name}}.wasm
#
#   wit-bindgen c wit --world metric-plugin --out-dir build       # bindings: build/metric_plugin.{h,c}
#   clang --target=wasm32-wasi -mexec-model=reactor -O2 -Ibuild metric.c build/metric_plugin.c \
#       build/metric_plugin_component_type.o -o build/core.wasm    # a core module (WASI preview 1)
#   jco new build/core.wasm --wasi-reactor -o {{name}}.wasm      # the component (WASI 0.2)
#
# Needs clang with the wasm32 target, wasm-ld and wasi-libc (Debian/Ubuntu:
# apt-get install clang lld wasi-libc libclang-rt-dev-wasm32; or a wasi-sdk: set
# CC=/path/to/wasi-sdk/bin/clang), node >= 20 with npm, and cargo (once, to install
# wit-bindgen). Pinned tools are installed on the first run into
#   ${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/
#     wit-bindgen-cli-0.63.0/   cargo install --locked wit-bindgen-cli@0.63.0 --no-default-features --features c
#     npm-<lock hash>/           npm ci of package-lock.json (jco 1.35.0)
# and shared by every project with the same pins.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

WIT_BINDGEN_VERSION=0.63.0
TOOLCHAINS=${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}
CC=${CC:-clang}

say() { printf 'build.sh: %s\n' "$*"; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

# --- the C compiler for wasm32-wasi ---------------------------------------------------------
command -v "$CC" >/dev/null 2>&1 ||
    die "$CC not found (Debian/Ubuntu: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)"
CFLAGS=(--target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra)
[ -n "${WASI_SYSROOT:-}" ] && CFLAGS+=(--sysroot="$WASI_SYSROOT")
probe=$(mktemp -d "${TMPDIR:-/tmp}/{{name}}-probe.XXXXXX")
trap 'rm -rf "$probe"' EXIT
printf '#include <stdlib.h>\nvoid *f(size_t n) { return malloc(n); }\n' >"$probe/p.c"
"$CC" "${CFLAGS[@]}" "$probe/p.c" -o "$probe/p.wasm" 2>"$probe/err" ||
    die "$CC cannot build for wasm32-wasi: $(tail -n 3 "$probe/err")
  Debian/Ubuntu: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 (or set CC to a wasi-sdk clang, WASI_SYSROOT to its sysroot)"

mkdir -p "$TOOLCHAINS"
# Builds sharing the toolchain folder install each tool once (flock where it exists).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLCHAINS/.lock"
    flock 9
fi

# --- wit-bindgen (the C bindings) -----------------------------------------------------------
WIT_BINDGEN="$TOOLCHAINS/wit-bindgen-cli-$WIT_BINDGEN_VERSION/bin/wit-bindgen"
if command -v wit-bindgen >/dev/null 2>&1 &&
    [ "$(wit-bindgen --version | cut -d' ' -f2)" = "$WIT_BINDGEN_VERSION" ]; then
    WIT_BINDGEN=$(command -v wit-bindgen)
elif [ ! -x "$WIT_BINDGEN" ]; then
    command -v cargo >/dev/null 2>&1 ||
        die "wit-bindgen $WIT_BINDGEN_VERSION is needed and cargo is not on PATH to install it (https://rustup.rs)"
    say "installing wit-bindgen-cli $WIT_BINDGEN_VERSION into $TOOLCHAINS (cargo install, a few minutes once)"
    # Its own target folder: a CARGO_TARGET_DIR set for another project must not be shared.
    # Only the C generator: the default features compile eight other languages' generators.
    CARGO_TARGET_DIR="$TOOLCHAINS/.wit-bindgen-build" cargo install --locked --quiet \
        --no-default-features --features c \
        --root "$TOOLCHAINS/wit-bindgen-cli-$WIT_BINDGEN_VERSION" "wit-bindgen-cli@$WIT_BINDGEN_VERSION" ||
        die "cargo install wit-bindgen-cli@$WIT_BINDGEN_VERSION failed (no access to crates.io?)"
    rm -rf "$TOOLCHAINS/.wit-bindgen-build"
fi

# --- jco (core module -> component) ---------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node not found on PATH (need Node.js >= 20, for jco)"
command -v npm >/dev/null 2>&1 || die "npm not found on PATH (it comes with Node.js; Debian: apt-get install npm)"
if [ -x node_modules/.bin/jco ]; then
    JCO=node_modules/.bin/jco
else
    # Keyed by the pinned packages, not by the project's name, so that projects share it.
    key=$(node -e '
        const lock = require("./package-lock.json");
        const packages = { ...lock.packages };
        delete packages[""];
        const hash = require("crypto").createHash("sha256");
        console.log(hash.update(JSON.stringify(packages)).digest("hex").slice(0, 16));')
    prefix="$TOOLCHAINS/npm-$key"
    if [ ! -f "$prefix/.adapterlab-ready" ]; then
        say "installing the tools pinned by package-lock.json into $prefix (npm ci)"
        rm -rf "$prefix"
        mkdir -p "$prefix"
        cp package.json package-lock.json "$prefix/"
        # --ignore-scripts: no package in the lock needs an install script.
        (cd "$prefix" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) ||
            die "npm ci failed in $prefix (no access to the npm registry?)"
        touch "$prefix/.adapterlab-ready"
    fi
    JCO="$prefix/node_modules/.bin/jco"
fi
exec 9>&-

# --- build ----------------------------------------------------------------------------------
mkdir -p build
"$WIT_BINDGEN" c wit --world metric-plugin --out-dir build >/dev/null
"$CC" "${CFLAGS[@]}" -Ibuild metric.c build/metric_plugin.c build/metric_plugin_component_type.o \
    -o build/core.wasm
node "$JCO" new build/core.wasm --wasi-reactor -o "{{name}}.wasm" >/dev/null
say "wrote $PWD/{{name}}.wasm ($(wc -c <"{{name}}.wasm" | tr -d ' ') bytes)"
