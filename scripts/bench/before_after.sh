#!/usr/bin/env bash
# Training and generation speed of two adapterlab builds on the same GPU, in one device call:
# BEFORE and AFTER a change that must not change speed (issue 15's model-crate restructure).
# Both run the very same workloads on the very same checkpoint, interleaved (before, after,
# before, after) so drift in clocks or temperature hits both alike; the golden tests of the
# AFTER build run on CUDA and on the CPU first.
#
# Built here, carried there (see ../shared/gpu/README.md):
#   source ../shared/gpu/cuda-env.sh
#   (at the old commit, in a worktree)  cargo build --release --features cuda -p adapterlab
#   (at the new commit)                 cargo build --release --features cuda -p adapterlab
#                                       cargo test --release -p adapterlab-model --features cuda --test golden --no-run
#   strip + xz into .carry/before/adapterlab.xz, .carry/after/adapterlab.xz, .carry/golden.xz
#   (xz, not gzip: the three must fit the device call's 64 MiB; Python's lzma unpacks them)
# Device call: carry [".carry"], command `bash scripts/bench/before_after.sh`.
# The checkpoint is Falcon-7B's shape with LAYERS (8) layers and random bf16 weights, made there
# with transformers (scripts/bench/hf_qlora_baseline.py --make-ckpt-only).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/before-after}
mkdir -p "$OUT" /tmp/ba
LAYERS=${LAYERS:-8}
ROUNDS=${ROUNDS:-2}
CKPT=/tmp/falcon7b-${LAYERS}l
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$1" "$2" && chmod +x "$2"; }
for side in before after; do
  unxz .carry/$side/adapterlab.xz /tmp/ba/$side
done
date -u +%FT%TZ | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.csv"

if [ -f .carry/golden.xz ]; then
  unxz .carry/golden.xz /tmp/ba/golden
  for dev in cuda cpu; do
    echo "== golden tests of the after build on $dev"
    ADAPTERLAB_TEST_DEVICE=$dev ADAPTERLAB_GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden /tmp/ba/golden --test-threads 1 --include-ignored 2>&1 | tee "$OUT/golden-$dev.txt" \
      | grep -E "^test |test result|panicked" | head -40
  done
fi

[ -f "$CKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" \
  --make-ckpt-only > "$OUT/make-ckpt.log" 2>&1 || { tail -20 "$OUT/make-ckpt.log"; exit 1; }

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    echo "== round $round, $side: bench train (batch 8 x 512, 6 steps, 2 warm-up)"
    timeout 240 /tmp/ba/$side bench train --model "$CKPT" --batch 8 --seq 512 --steps 6 --warmup 2 \
      2>"$OUT/train-$side-$round.err" | tee "$OUT/train-$side-$round.json" \
      | sed "s/^{/{\"side\":\"$side\",\"round\":$round,/" >> "$RESULTS"
    tail -1 "$OUT/train-$side-$round.json"
    echo "== round $round, $side: bench generate (batch 1 and 16, 200-token prompt, 50 new)"
    timeout 240 /tmp/ba/$side bench generate --model "$CKPT" --batch 1,16 --prompt-tokens 200 --new-tokens 50 \
      2>"$OUT/generate-$side-$round.err" | tee "$OUT/generate-$side-$round.json" \
      | sed "s/^{/{\"side\":\"$side\",\"round\":$round,/" >> "$RESULTS"
    tail -2 "$OUT/generate-$side-$round.json"
  done
done
cp "$RESULTS" "$OUT/" 2>/dev/null
echo "== results in $RESULTS"
