#!/usr/bin/env bash
# Build the metric plugin `{{name}}` as a WebAssembly component: ./build.sh -> {{name}}.wasm
#
# Needs node (20 or newer) and npm. The tools are the ones package-lock.json pins
# (componentize-js 0.23.0, jco 1.35.0, preview2-shim 0.17.9): the project's node_modules
# after `npm ci`, or else an `npm ci` of the same lock kept in
#   ${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/npm-<lock hash>/
# and shared by every project with the same pins. The build itself (`npm run build`) is:
#   componentize-js metric.js --wit wit --world-name metric-plugin --disable http fetch-event -o {{name}}.wasm
# `--disable http fetch-event` is required: without it the component imports wasi:http, which
# the adapterlab host does not provide. Do not add --aot: it downloads a compiler binary.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TOOLCHAINS=${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}

say() { printf 'build.sh: %s\n' "$*"; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

command -v node >/dev/null 2>&1 || die "node not found on PATH (need Node.js >= 20)"
command -v npm >/dev/null 2>&1 || die "npm not found on PATH (it comes with Node.js; Debian: apt-get install npm)"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ||
    die "node is $(node --version); componentize-js needs Node.js >= 20"

# The directory whose node_modules holds the pinned tools.
npm_tools() {
    if [ -x node_modules/.bin/componentize-js ]; then
        printf '%s\n' "$PWD"
        return
    fi
    # Keyed by the pinned packages, not by the project's name, so that projects share it.
    local key prefix
    key=$(node -e '
        const lock = require("./package-lock.json");
        const packages = { ...lock.packages };
        delete packages[""];
        const hash = require("crypto").createHash("sha256");
        console.log(hash.update(JSON.stringify(packages)).digest("hex").slice(0, 16));')
    prefix="$TOOLCHAINS/npm-$key"
    mkdir -p "$TOOLCHAINS"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$TOOLCHAINS/.lock"
        flock 9
    fi
    if [ ! -f "$prefix/.adapterlab-ready" ]; then
        say "installing the tools pinned by package-lock.json into $prefix (npm ci)" >&2
        rm -rf "$prefix"
        mkdir -p "$prefix"
        cp package.json package-lock.json "$prefix/"
        # --ignore-scripts: no package in the lock needs an install script.
        (cd "$prefix" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2) ||
            die "npm ci failed in $prefix (no access to the npm registry?)"
        touch "$prefix/.adapterlab-ready"
    fi
    exec 9>&-
    printf '%s\n' "$prefix"
}

TOOLS=$(npm_tools)
node "$TOOLS/node_modules/.bin/componentize-js" metric.js --wit wit --world-name metric-plugin \
    --disable http fetch-event -o "{{name}}.wasm"
say "wrote $PWD/{{name}}.wasm ($(wc -c <"{{name}}.wasm" | tr -d ' ') bytes)"
