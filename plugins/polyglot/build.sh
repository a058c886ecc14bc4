#!/usr/bin/env bash
# Build the Python and JavaScript versions of the `length` metric as WebAssembly components:
#
#   plugins/polyglot/build.sh OUT_DIR    ->  OUT_DIR/length-py.wasm, OUT_DIR/length-js.wasm
#
# Needs only python3 (with pip) and node (with npm) on PATH, and access to PyPI and the npm
# registry the first time. It installs the pinned toolchains into a cache directory and reuses
# them on later runs:
#
#   ${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/
#     componentize-py-0.25.1/        a Python venv with componentize-py==0.25.1 (PyPI)
#     js-<lock hash>/node_modules/   `npm ci` of js/package-lock.json: componentize-js 0.23.0,
#                                    jco 1.35.0, preview2-shim 0.17.9 (npm)
#     built/<input hash>/            components already built from identical inputs
#
# Toolchains of older lock files and cached builds unused for 30 days are deleted. Two runs
# that share the cache directory wait for each other (flock, where available).
#
# A component is rebuilt only when its inputs change: the source, the WIT contract, this
# script and the toolchain pins are hashed, and a build with the same hash is copied from
# built/. ADAPTERLAB_POLYGLOT_REBUILD=1 ignores that cache (the toolchains are still reused).
#
# Never passes --aot to componentize-js: AOT compilation downloads a weval binary from
# outside the package registries.
set -Eeuo pipefail

COMPONENTIZE_PY_VERSION=0.25.1
WORLD=metric-plugin

say() { printf 'build.sh: %s\n' "$*"; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

if [ $# -ne 1 ] || [ -z "$1" ]; then
    die "usage: $0 OUT_DIR"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WIT="$ROOT/sdk/wit/since_v0.1.0"
PY_SRC="$HERE/python"
JS_SRC="$HERE/js"
TOOLCHAINS=${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}

[ -d "$WIT" ] || die "WIT contract not found at $WIT"
[ -f "$PY_SRC/app.py" ] || die "Python source not found at $PY_SRC/app.py"
[ -f "$JS_SRC/length.js" ] || die "JavaScript source not found at $JS_SRC/length.js"
[ -f "$JS_SRC/package-lock.json" ] || die "$JS_SRC/package-lock.json is missing: the JS toolchain must come from the lock file"

# --- required tools -------------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH (need Python >= 3.9 with pip)"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
    die "python3 is $(python3 --version 2>&1); componentize-py $COMPONENTIZE_PY_VERSION needs Python >= 3.9"
command -v node >/dev/null 2>&1 || die "node not found on PATH (need Node.js >= 20)"
command -v npm >/dev/null 2>&1 || die "npm not found on PATH (it comes with Node.js; Debian: apt-get install npm)"
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
[ "$NODE_MAJOR" -ge 20 ] || die "node is $(node --version); componentize-js needs Node.js >= 20"

mkdir -p "$1" "$TOOLCHAINS"
OUT=$(cd "$1" && pwd)

# One build.sh at a time per toolchain directory (where flock exists: Linux, not macOS).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLCHAINS/.lock"
    if ! flock -n 9; then
        say "waiting for another build.sh that uses $TOOLCHAINS"
        flock 9
    fi
fi

# sha256 over the named files (path relative to $ROOT, then content), plus extra strings.
hash_inputs() {
    python3 - "$ROOT" "$@" <<'PY'
import hashlib, os, sys
root, items = sys.argv[1], sys.argv[2:]
h = hashlib.sha256()
for item in items:
    if os.path.isfile(item):
        h.update(os.path.relpath(item, root).encode() + b"\0")
        with open(item, "rb") as f:
            h.update(f.read())
    else:
        h.update(b"arg:" + item.encode())
    h.update(b"\0")
print(h.hexdigest())
PY
}

WIT_FILES=$(find "$WIT" -type f -name '*.wit' | LC_ALL=C sort)

# --- Python toolchain: a venv with componentize-py ------------------------------------------
PY_VENV="$TOOLCHAINS/componentize-py-$COMPONENTIZE_PY_VERSION"
COMPONENTIZE_PY="$PY_VENV/bin/componentize-py"

install_componentize_py() {
    say "installing componentize-py==$COMPONENTIZE_PY_VERSION into $PY_VENV"
    rm -rf "$PY_VENV"
    if python3 -m venv "$PY_VENV" >/dev/null 2>&1 && [ -x "$PY_VENV/bin/pip" ]; then
        "$PY_VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
            --only-binary=:all: "componentize-py==$COMPONENTIZE_PY_VERSION" ||
            die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION from PyPI (no network, or no wheel for this platform?)"
    else
        # Debian/Ubuntu ship python3 without ensurepip unless python3-venv is installed: make
        # the venv without pip and install into it with python3's own pip (needs pip >= 22.3).
        say "python3 -m venv cannot bootstrap pip here; using python3's own pip for the venv"
        rm -rf "$PY_VENV"
        python3 -m venv --without-pip "$PY_VENV" ||
            die "python3 -m venv failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        python3 -m pip --version >/dev/null 2>&1 ||
            die "python3 has no pip (Debian/Ubuntu: apt-get install python3-pip python3-venv)"
        python3 -m pip --python "$PY_VENV/bin/python" install --disable-pip-version-check --no-input \
            --quiet --only-binary=:all: "componentize-py==$COMPONENTIZE_PY_VERSION" ||
            die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION (pip >= 22.3 is needed for --python; or install python3-venv)"
    fi
    [ "$("$COMPONENTIZE_PY" --version 2>/dev/null)" = "componentize-py $COMPONENTIZE_PY_VERSION" ] ||
        die "componentize-py was installed but '$COMPONENTIZE_PY --version' does not report $COMPONENTIZE_PY_VERSION"
    printf '%s\n' "$COMPONENTIZE_PY_VERSION" >"$PY_VENV/.adapterlab-ready"
}

if [ -f "$PY_VENV/.adapterlab-ready" ] &&
    [ "$("$COMPONENTIZE_PY" --version 2>/dev/null || true)" = "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
    say "reusing componentize-py $COMPONENTIZE_PY_VERSION from $PY_VENV"
else
    install_componentize_py
fi

# --- JavaScript toolchain: npm ci of the committed lock file --------------------------------
JS_LOCK_HASH=$(hash_inputs "$JS_SRC/package.json" "$JS_SRC/package-lock.json")
JS_PREFIX="$TOOLCHAINS/js-${JS_LOCK_HASH:0:16}"
COMPONENTIZE_JS="$JS_PREFIX/node_modules/.bin/componentize-js"

install_js_tools() {
    say "installing the JS toolchain from $JS_SRC/package-lock.json into $JS_PREFIX (npm ci)"
    rm -rf "$JS_PREFIX"
    mkdir -p "$JS_PREFIX"
    cp "$JS_SRC/package.json" "$JS_SRC/package-lock.json" "$JS_PREFIX/"
    # --ignore-scripts: no package in the lock needs an install script; this keeps it so.
    (cd "$JS_PREFIX" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) ||
        die "npm ci failed in $JS_PREFIX (no access to the npm registry?)"
    [ -x "$COMPONENTIZE_JS" ] || die "npm ci succeeded but $COMPONENTIZE_JS is missing"
    printf '%s\n' "$JS_LOCK_HASH" >"$JS_PREFIX/.adapterlab-ready"
}

if [ -f "$JS_PREFIX/.adapterlab-ready" ] && [ -x "$COMPONENTIZE_JS" ]; then
    say "reusing the JS toolchain in $JS_PREFIX"
else
    install_js_tools
fi
JS_VERSIONS=$(cd "$JS_PREFIX" && node -p '["componentize-js","jco","preview2-shim"].map(n => n + " " + require("./node_modules/@bytecodealliance/" + n + "/package.json").version).join(", ")')
say "JS toolchain: $JS_VERSIONS"

# --- builds ---------------------------------------------------------------------------------
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/adapterlab-polyglot.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# in_dir DIR COMMAND...: run COMMAND in DIR.
in_dir() {
    local dir=$1
    shift
    (cd "$dir" && "$@")
}

# build NAME HASH COMMAND...: run COMMAND (which writes $STAGE/NAME.wasm) unless a build with
# the same input HASH is cached, then install the result as $OUT/NAME.wasm.
build() {
    local name=$1 hash=$2
    shift 2
    local cached="$TOOLCHAINS/built/$hash/$name.wasm"
    if [ -f "$cached" ] && [ "${ADAPTERLAB_POLYGLOT_REBUILD:-0}" != 1 ]; then
        say "$name.wasm: inputs unchanged, copying the cached build $cached"
    else
        say "building $name.wasm: $*"
        local start=$SECONDS
        "$@" || die "building $name.wasm failed (command: $*)"
        [ -s "$STAGE/$name.wasm" ] || die "building $name.wasm produced no output"
        mkdir -p "$TOOLCHAINS/built/$hash"
        cp "$STAGE/$name.wasm" "$cached.tmp"
        mv "$cached.tmp" "$cached"
        say "built $name.wasm in $((SECONDS - start)) s"
    fi
    cp "$cached" "$OUT/.$name.wasm.tmp"
    mv "$OUT/.$name.wasm.tmp" "$OUT/$name.wasm"
    say "wrote $OUT/$name.wasm ($(wc -c <"$OUT/$name.wasm" | tr -d ' ') bytes)"
}

# Python: componentize-py runs the app at build time (pre-initialisation) and snapshots it.
# The app is copied to a staging directory so that the build writes nothing (e.g.
# __pycache__) into the source tree and bundles nothing else that lies around there.
mkdir -p "$STAGE/python"
cp "$PY_SRC"/*.py "$STAGE/python/"
# shellcheck disable=SC2086 # WIT_FILES is a newline-separated list of paths without spaces
PY_HASH=$(hash_inputs "$PY_SRC"/*.py $WIT_FILES "$HERE/build.sh" "componentize-py $COMPONENTIZE_PY_VERSION" "$WORLD")
build length-py "py-$PY_HASH" \
    env -u VIRTUAL_ENV "$COMPONENTIZE_PY" --quiet -d "$WIT" -w "$WORLD" \
    componentize -p "$STAGE/python" -o "$STAGE/length-py.wasm" app

# JavaScript: -d http fetch-event, or the component imports wasi:http, which a WASI-only host
# cannot link.
# shellcheck disable=SC2086
JS_HASH=$(hash_inputs "$JS_SRC/length.js" "$JS_SRC/package-lock.json" $WIT_FILES "$HERE/build.sh" "$WORLD")
# It runs from js/ with a relative source path, so that no absolute path ends up in the output.
build length-js "js-$JS_HASH" \
    in_dir "$JS_SRC" node "$COMPONENTIZE_JS" length.js --wit "$WIT" --world-name "$WORLD" \
    --disable http fetch-event -o "$STAGE/length-js.wasm"

# Forget toolchains of older lock files and builds that have not been used for 30 days.
touch "$JS_PREFIX" "$TOOLCHAINS/built/py-$PY_HASH" "$TOOLCHAINS/built/js-$JS_HASH"
find "$TOOLCHAINS" -mindepth 1 -maxdepth 1 -type d -name 'js-*' -mtime +30 -exec rm -rf {} +
find "$TOOLCHAINS/built" -mindepth 1 -maxdepth 1 -type d -mtime +30 -exec rm -rf {} +

say "done: $OUT/length-py.wasm $OUT/length-js.wasm"
