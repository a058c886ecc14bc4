#!/usr/bin/env bash
# Build the metric plugin `{{name}}` as a WebAssembly component: ./build.sh -> {{name}}.wasm
#
# Needs Rust (rustup + cargo, the Rust version in adapterlab-sdk/Cargo.toml or newer) and the
# wasm32-wasip2 target, which this script adds with rustup when it is missing. The first
# build downloads wit-bindgen and its dependencies from crates.io.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install Rust with rustup: https://rustup.rs)"
# wasm32-wasip2 produces a component directly; rustup does not always add it on its own.
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2 || die "rustup target add wasm32-wasip2 failed"
fi

cargo build --release --target wasm32-wasip2
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cp "$TARGET_DIR/wasm32-wasip2/release/{{crate}}.wasm" "{{name}}.wasm"
printf 'build.sh: wrote %s (%s bytes)\n' "$PWD/{{name}}.wasm" "$(wc -c <"{{name}}.wasm" | tr -d ' ')"
