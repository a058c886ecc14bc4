#!/usr/bin/env bash
# Build the metric plugin `{{name}}` as a WebAssembly component: ./build.sh -> {{name}}.wasm
#
# Needs python3 (3.9 or newer, with pip or the venv module). The first run installs
# componentize-py (pinned below; it bundles its own CPython) from PyPI into
#   ${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/componentize-py-VERSION/
# and later runs reuse it. The build itself is:
#   componentize-py -d wit -w metric-plugin componentize -p . app -o {{name}}.wasm
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

COMPONENTIZE_PY_VERSION=0.25.1
TOOLCHAINS=${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}
VENV="$TOOLCHAINS/componentize-py-$COMPONENTIZE_PY_VERSION"
COMPONENTIZE_PY="$VENV/bin/componentize-py"

say() { printf 'build.sh: %s\n' "$*"; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

ready() {
    [ -f "$VENV/.adapterlab-ready" ] &&
        [ "$("$COMPONENTIZE_PY" --version 2>/dev/null || true)" = "componentize-py $COMPONENTIZE_PY_VERSION" ]
}

install_componentize_py() {
    command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH (need Python >= 3.9)"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
        die "python3 is $(python3 --version 2>&1); componentize-py needs Python >= 3.9"
    say "installing componentize-py==$COMPONENTIZE_PY_VERSION into $VENV"
    rm -rf "$VENV"
    mkdir -p "$TOOLCHAINS"
    if python3 -m venv "$VENV" >/dev/null 2>&1 && [ -x "$VENV/bin/pip" ]; then
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
            --only-binary=:all: "componentize-py==$COMPONENTIZE_PY_VERSION" ||
            die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION from PyPI"
    else
        # Debian's python3 has no ensurepip without python3-venv: use python3's own pip.
        rm -rf "$VENV"
        python3 -m venv --without-pip "$VENV" ||
            die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
        python3 -m pip --python "$VENV/bin/python" install --disable-pip-version-check \
            --no-input --quiet --only-binary=:all: "componentize-py==$COMPONENTIZE_PY_VERSION" ||
            die "pip could not install componentize-py (needs pip >= 22.3, or apt-get install python3-venv)"
    fi
    [ "$("$COMPONENTIZE_PY" --version 2>/dev/null)" = "componentize-py $COMPONENTIZE_PY_VERSION" ] ||
        die "componentize-py was installed but does not report version $COMPONENTIZE_PY_VERSION"
    printf '%s\n' "$COMPONENTIZE_PY_VERSION" >"$VENV/.adapterlab-ready"
}

mkdir -p "$TOOLCHAINS"
# Builds sharing the toolchain folder install it once (flock where it exists).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLCHAINS/.lock"
    flock 9
fi
ready || install_componentize_py
exec 9>&-

# componentize-py runs the module at build time and snapshots it; the output is a component.
env -u VIRTUAL_ENV "$COMPONENTIZE_PY" -d wit -w metric-plugin componentize -p . app -o "{{name}}.wasm"
say "wrote $PWD/{{name}}.wasm ($(wc -c <"{{name}}.wasm" | tr -d ' ') bytes)"
