#!/usr/bin/env bash
# Training activation memory on the CPU (the build machine), two builds on one checkpoint:
# peak resident memory (GNU time's maxrss) of `adapterlab bench train --batch 8 --seq 256
# --steps 1` on a 2-layer Falcon-7B-shaped random bf16 checkpoint (real widths: hidden 4544,
# MLP 18176, 71 heads; the CPU computes in f32). The load's own peak is ~3.2 GB, so a batch of
# 2,048 tokens is needed for the step's activations to set the peak.
#   BEFORE=path/to/old/adapterlab AFTER=path/to/new/adapterlab \
#   PYTHON=python-with-transformers bash scripts/bench/cpu_lora_memory.sh
set -euo pipefail
cd "$(dirname "$0")"
CKPT=${CKPT:-/tmp/falcon7b-2l}
if [ ! -f "$CKPT/config.json" ]; then
  "${PYTHON:-python3}" -c "
import sys, torch, hf_qlora_baseline as h
from transformers import FalconForCausalLM
torch.manual_seed(0)
FalconForCausalLM(h.falcon7b_config(2)).to(torch.bfloat16).save_pretrained(sys.argv[1], safe_serialization=True)
" "$CKPT"
fi
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
for side in BEFORE AFTER; do
  bin=${!side}
  /usr/bin/time -f "$side maxrss %M KB, wall %e s" "$bin" --data-dir "$DATA" bench train --model "$CKPT" \
    --batch 8 --seq 256 --steps 1 --warmup 0 2>&1 | grep -E '"train_step"|maxrss' | sed 's/,"lengths.*"loss"/ ... "loss"/'
done
