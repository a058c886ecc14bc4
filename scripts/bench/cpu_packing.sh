#!/usr/bin/env bash
# Packing on the CPU (the build machine): `adapterlab bench train` on the tiny Falcon-7B-style
# golden checkpoint, batch 8 x SEQ (128), examples of LENGTHS (25..100) tokens (uniform, seeded), three
# ways, ROUNDS (2) interleaved rounds: padded in random order, padded grouped by length (the
# trainer's default sampler) and packed (`packing = true`, best-fit decreasing). Useful
# (non-pad) tokens/s is the figure to compare. ATTN (eager) is the attn_implementation, e.g.
# flash_attention_2. Release build:
#   cargo build --release -p adapterlab && bash scripts/bench/cpu_packing.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AL=${AL:-${CARGO_TARGET_DIR:-target}/release/adapterlab}
[ -x "$AL" ] || { echo "no adapterlab binary at $AL: build it or set AL" >&2; exit 1; }
MODEL=host/model/tests/fixtures/golden/falcon_7b_style
SEQ=${SEQ:-128}
LENGTHS=${LENGTHS:-25..100}
ROUNDS=${ROUNDS:-2}
ATTN=${ATTN:-eager}
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
printf '| round | mode | useful tokens/s | padded tokens/s | padding |\n| --- | --- | --- | --- | --- |\n'
for round in $(seq 1 "$ROUNDS"); do
  for mode in random group-by-length packing; do
    case $mode in random) flag= ;; group-by-length) flag=--group-by-length ;; packing) flag=--packing ;; esac
    "$AL" --data-dir "$DATA" bench train --model "$MODEL" --batch 8 --seq "$SEQ" --lengths "$LENGTHS" $flag \
      --attn-implementation "$ATTN" --steps 10 --warmup 2 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if r.get("what") == "train_step":
        useful, padded, pad = r["useful_tokens_per_s"], r["padded_tokens_per_s"], r["pad_fraction"]
        print(f"| {sys.argv[1]} | {sys.argv[2]} | {useful:,.0f} | {padded:,.0f} | {100 * pad:.1f}% |")
' "$round" "$mode"
  done
done
