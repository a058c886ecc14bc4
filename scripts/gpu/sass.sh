#!/usr/bin/env bash
# Counts the work of the crate's CUDA kernels on the build machine (no GPU): compiles one
# kernel module's text, exactly as NVRTC gets it, to sm_90 machine code with nvcc, then prints
# each kernel's registers and spills and, for the kernels named (or all), how many SASS
# instructions of each kind it has. Use it to check what a kernel change costs before a device
# call: e.g. the NF4 decoding kernels went from ~12 to ~5 instructions a weight (2026-12-06).
#   bash scripts/gpu/sass.sh                      the modules' names
#   bash scripts/gpu/sass.sh MODULE [KERNEL...]   e.g. adapterlab_nf4 nf4_gemv32_1_bf16
# The source comes from `cargo run --example kernel_source --features cuda`; nvcc from
# ../shared/gpu/cuda-env.sh; cuobjdump and nvdisasm from NVIDIA's PyPI wheels (13.2.86, the
# oldest there; they read 13.0's cubins), fetched once into the CUDA toolchain's cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source ../shared/gpu/cuda-env.sh > /dev/null
home=${ADAPTERLAB_CUDA_HOME:-$HOME/.cache/adapterlab-cuda}
tools=$home/sass-tools
if [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$wheels" nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$tools"; done
  chmod +x "$tools"/nvidia/cu13/bin/*
  rm -rf "$wheels"
fi
export PATH=$tools/nvidia/cu13/bin:$PATH
# The example links the CUDA libraries; the stub libcuda (cuda-env.sh) stands in for the
# driver, which it never calls.
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
ln -s "$home/link/libcuda.so" "$stub/libcuda.so.1"
run_example() {
  cargo build -q --release -p adapterlab-model --features cuda --example kernel_source
  LD_LIBRARY_PATH="$(dirname "$(command -v nvcc)")/../lib:$stub" \
    "$CARGO_TARGET_DIR/release/examples/kernel_source" "$@"
}
if [ $# -eq 0 ]; then
  run_example
  exit 0
fi
module=$1; shift
work=$stub
run_example "$module" > "$work/$module.cu"
nvcc -cubin -arch=sm_90 -O3 --resource-usage "$work/$module.cu" -o "$work/$module.cubin" > "$work/ptxas.txt" 2>&1 \
  || { cat "$work/ptxas.txt"; exit 1; }
awk '/Compiling entry function/ {name=$7; gsub(/\047/, "", name)}
     /Used [0-9]+ registers/ {sub(/.*Used /, ""); print name ": " $0}
     /spill stores/ && !/ 0 bytes spill stores/ {print name ": " $0}' "$work/ptxas.txt"
kernels=("$@")
if [ ${#kernels[@]} -eq 0 ]; then
  mapfile -t kernels < <(grep -o "entry function '[^']*'" "$work/ptxas.txt" | cut -d"'" -f2)
fi
for k in "${kernels[@]}"; do
  cuobjdump -sass -fun "$k" "$work/$module.cubin" \
    | grep -E '^\s+/\*[0-9a-f]{4}\*/' \
    | sed -E 's/^\s+\/\*[0-9a-f]+\*\/\s+//; s/^@!?U?P[0-9T]+\s+//; s/[ ;].*//' \
    | sort | uniq -c | sort -rn > "$work/ops.txt"
  echo "== $k: $(awk '{n+=$1} END {print n+0}' "$work/ops.txt") instructions; the most frequent:"
  head -16 "$work/ops.txt"
done
