#!/usr/bin/env bash
# Flash attention against eager on the CPU (the build machine), one binary, one checkpoint:
# peak resident memory (GNU time's maxrss) and step time of `adapterlab bench train --steps 1`
# on a 2-layer Falcon-7B-shaped random checkpoint (71 heads of 64, one shared KV head; the CPU
# computes in f32), at batch 8 x 256 and at batch 1 x 2048, where eager's [heads, seq, seq]
# scores (1.2 GB a layer in f32 at 2048) set the peak.
#   BIN=target/release/adapterlab PYTHON=python-with-numpy-and-safetensors \
#   bash scripts/bench/cpu_flash_memory.sh
set -euo pipefail
cd "$(dirname "$0")"
BIN=${BIN:-../../target/release/adapterlab}
CKPT=${CKPT:-/tmp/falcon7b-2l}
[ -f "$CKPT/config.json" ] || "${PYTHON:-python3}" make_falcon_ckpt.py "$CKPT" 2
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
for shape in 8x256 1x2048; do
  for attn in eager flash_attention_2; do
    /usr/bin/time -f "$shape $attn: maxrss %M KB, wall %e s" "$BIN" --data-dir "$DATA" bench train \
      --model "$CKPT" --batch "${shape%x*}" --seq "${shape#*x}" --steps 1 --warmup 0 \
      --attn-implementation "$attn" 2>&1 | grep -E '"train_step"|maxrss' | sed 's/,"checkpoint_every.*"loss"/ ... "loss"/'
  done
done
