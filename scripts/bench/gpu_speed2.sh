#!/usr/bin/env bash
# Issue 17's levers measured in one device call, on a Falcon-7B-shaped random bf16 checkpoint:
#   golden   the AFTER build's golden tests on CUDA, including
#            `nf4_quantize_kernel_equals_the_cpu_path` (the load kernel against the CPU path,
#            bit for bit), `flash_attention_kernels_equal_the_cpu_twin` and the HF-parity tests
#            (each case also with flash attention)
#   load     loading into NF4 (double quantization), two builds: BEFORE (quantizes on the CPU)
#            and AFTER (uploads the 16-bit weights, quantizes with the nf4_quantize kernels);
#            interleaved rounds (before, after, before, after) on the same checkpoint, which
#            stays in the page cache after it is written, so both read it warm
#   packing  `bench train` (AFTER build) at batch 8 x 512 on examples of 100-400 tokens
#            (uniform, seeded, as DialogSum-like rows): padded in random order, padded grouped
#            by length (the trainer's default sampler), and packed (`packing = true`); useful
#            (non-pad) tokens/s is the figure to compare
#
# Built here, carried there (see ../shared/gpu/README.md): `bash scripts/gpu/build-carry.sh
# [BEFORE_COMMIT]` does all of the following, the Python reference's wheels included:
#   source ../shared/gpu/cuda-env.sh
#   (old commit, in a worktree)  cargo build --release --features cuda -p adapterlab
#   (new commit)                 cargo build --release --features cuda -p adapterlab
#                                cargo test --release -p adapterlab-model --features cuda --test golden --no-run
#   strip + xz into .carry/before/adapterlab.xz, .carry/after/adapterlab.xz, .carry/golden.xz
# Device call: carry [".carry/before", ".carry/after", ".carry/golden.xz", ".whl3"],
# command `OUT=$OUT bash scripts/bench/gpu_speed2.sh` (STAGES=golden,load,reference,train,packing,
# flash,generate by default; more than one call's 10 minutes at 32 layers: split it, e.g.
# STAGES=golden,load,train,flash ROUNDS=1, then reference,packing,generate).
# Each load line is `bench generate`'s `"what":"load"` JSON (ADAPTERLAB_PROFILE=1 adds the
# phases: read, quantize, download, nested, upload) followed by a tiny generation as a check
# that the loaded model runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
# The device returns at most 8 files from $OUT: the raw files go to $RAW and come back as one
# tarball, $OUT/raw.tar.gz, beside the summary ($OUT/summary.txt).
FINAL=${OUT:-/tmp/gpu-speed2}
RAW=/tmp/gpu-speed2-raw
OUT=$RAW
STAGES=${STAGES:-golden,load,reference,train,packing,flash,generate,profile,sft}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
mkdir -p "$OUT" "$FINAL" /tmp/gl
LAYERS=${LAYERS:-32}
ROUNDS=${ROUNDS:-2}
CKPT=/tmp/falcon7b-${LAYERS}l
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$1" "$2" && chmod +x "$2"; }
for side in before after; do unxz .carry/$side/adapterlab.xz /tmp/gl/$side; done
date -u +%FT%TZ | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.csv"
nproc | sed 's/^/cores: /' | tee -a "$OUT/gpu.csv"

if stage golden; then
  unxz .carry/golden.xz /tmp/gl/golden
  echo "== golden tests of the after build on cuda"
  ADAPTERLAB_TEST_DEVICE=cuda ADAPTERLAB_GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden timeout 240 /tmp/gl/golden --test-threads 1 --include-ignored --nocapture 2>&1 \
    | tee "$OUT/golden-cuda.txt" | grep -E "^test |test result|panicked|bit-equal|cases" | head -40
fi

[ -f "$CKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" \
  --make-ckpt-only > "$OUT/make-ckpt.log" 2>&1 || { tail -20 "$OUT/make-ckpt.log"; exit 1; }
tail -1 "$OUT/make-ckpt.log"

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
stage load && for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    echo "== round $round, $side: load + a 2-token generation"
    # The GPU path is opt-in (ADAPTERLAB_NF4_QUANTIZE=gpu) until this call has shown it bit-exact.
    q=cpu; [ $side = after ] && q=gpu
    ADAPTERLAB_NF4_QUANTIZE=$q ADAPTERLAB_PROFILE=1 timeout 180 /tmp/gl/$side bench generate --model "$CKPT" --batch 1 --prompt-tokens 16 --new-tokens 2 \
      2>"$OUT/load-$side-$round.err" | tee "$OUT/load-$side-$round.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$side\",\"round\":$round,${line#\{}" >> "$RESULTS"; done
    tail -3 "$OUT/load-$side-$round.err"
  done
done
# train   `bench train` at batch 8 x 512 (fixed lengths), BEFORE then AFTER, each with its
#         nvidia-smi peak (polled every 100 ms; it includes the CUDA context), for the LoRA
#         dropout folded into the A product (activation memory) and the other changes between
#         the two builds; then batch 32 x 256 (the reference notebook's) with AFTER alone
watch_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$1.txt" & MEMPID=$!; }
stop_mem() {
  kill $MEMPID 2>/dev/null; wait $MEMPID 2>/dev/null
  echo "{\"side\":\"$1\",\"what\":\"nvidia_smi_peak\",\"mib\":$(sort -n "$OUT/mem-$1.txt" | tail -1)}" | tee -a "$RESULTS"
}
# reference  (with .whl3 carried: bitsandbytes 0.50.2 with its CUDA 13 libraries only, peft
#            0.21.2) the Python stack's QLoRA step at batch 8 x 512 on the same checkpoint
#            (hf_qlora_baseline.py, no generation), with its nvidia-smi peak: the other side of
#            the train stage's figures, in the same call
install_wheels() {
  [ -d /tmp/site/peft ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl3/*.whl 2>&1 | grep -v "WARNING: Running pip as" | tail -2
}
if stage reference; then
  if ls .whl3/*.whl >/dev/null 2>&1; then
    install_wheels
    echo "== reference: transformers + PEFT + bitsandbytes, batch 8 x 512"
    watch_mem python
    PYTHONPATH=/tmp/site timeout 300 python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" \
      2>"$OUT/python.err" | tee "$OUT/python.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"python\",${line#\{}" >> "$RESULTS"; done
    stop_mem python
    tail -3 "$OUT/python.err"
  else
    echo "== reference stage skipped: no .whl3/ wheels carried"
  fi
fi
if stage train; then
  # Without a BEFORE_COMMIT the before binary is the after binary: train it once.
  sides="before after"
  cmp -s .carry/before/COMMIT .carry/after/COMMIT && sides=after
  for side in $sides; do
    echo "== train stage: $side, batch 8 x 512"
    watch_mem train-$side
    timeout 240 /tmp/gl/$side bench train --model "$CKPT" --batch 8 --seq 512 --steps 8 --warmup 3 \
      2>"$OUT/train8x512-$side.err" | tee "$OUT/train8x512-$side.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$side\",\"mode\":\"8x512\",${line#\{}" >> "$RESULTS"; done
    stop_mem train-$side
    tail -2 "$OUT/train8x512-$side.err"
  done
  # The reference notebook's per-device batch, 32 x 256, without checkpointing (AFTER only).
  echo "== train stage: after, batch 32 x 256"
  watch_mem train32-after
  timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch 32 --seq 256 --steps 6 --warmup 2 \
    2>"$OUT/train32x256-after.err" | tee "$OUT/train32x256-after.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after\",\"mode\":\"32x256\",${line#\{}" >> "$RESULTS"; done
  stop_mem train32-after
  tail -2 "$OUT/train32x256-after.err"
fi
if stage packing; then
  # packing: eager attention regrouping the packed examples one a row (the default);
  # packing-mask: the packed rows under their block-diagonal mask (ADAPTERLAB_PACKED_ATTENTION)
  for mode in random group-by-length packing packing-mask; do
    packed=regroup
    case $mode in random) flag= ;; group-by-length) flag=--group-by-length ;; packing) flag=--packing ;;
      packing-mask) flag=--packing; packed=mask ;; esac
    echo "== packing stage: $mode"
    ADAPTERLAB_PACKED_ATTENTION=$packed timeout 200 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --lengths 100..400 $flag --steps 10 --warmup 3 \
      2>"$OUT/train-$mode.err" | tee "$OUT/train-$mode.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after\",\"mode\":\"$mode\",${line#\{}" >> "$RESULTS"; done
    tail -2 "$OUT/train-$mode.err"
  done
fi
# flash    the AFTER build with `--attn-implementation flash_attention_2` (ops/flash.rs: no
#          [b, h, s, t] scores, forward or backward): batch 8 x 512 and 32 x 256 with their
#          nvidia-smi peaks and packed DialogSum-like rows (the same commands as the train and
#          packing rows above, so each pair compares)
if stage flash; then
  for shape in 8x512 32x256; do
    b=${shape%x*}; s=${shape#*x}
    echo "== flash stage: after, batch $b x $s, flash_attention_2"
    watch_mem flash$shape
    timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch "$b" --seq "$s" --steps 6 --warmup 2 \
      --attn-implementation flash_attention_2 2>"$OUT/flash$shape.err" | tee "$OUT/flash$shape.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"flash\",\"mode\":\"$shape\",${line#\{}" >> "$RESULTS"; done
    stop_mem flash$shape
    tail -2 "$OUT/flash$shape.err"
  done
  echo "== flash stage: packing, flash_attention_2"
  timeout 200 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --lengths 100..400 --packing --steps 10 --warmup 3 \
    --attn-implementation flash_attention_2 2>"$OUT/flash-packing.err" | tee "$OUT/flash-packing.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"flash\",\"mode\":\"packing\",${line#\{}" >> "$RESULTS"; done
fi
# generate  decoding at batch 1 and 16 (200-token prompts, 50 new tokens) with a LoRA adapter on
#           all four linear kinds (issue 17's workload; one training step makes it, since its
#           values do not change the work), for each of GEN_VARIANTS: eager (unmerged, then
#           merged), flash_attention_2 (unmerged), eager+tiled (unmerged, batch 16's projections
#           straight from NF4 with ADAPTERLAB_NF4_SMALL_BATCH=tiled instead of dequantize +
#           cuBLAS), and base (eager, no adapter)
if stage generate; then
  timeout 120 /tmp/gl/after bench train --model "$CKPT" --batch 1 --seq 16 --steps 1 --warmup 0 \
    --save /tmp/gen-adapter > "$OUT/gen-adapter.json" 2>&1 || tail -3 "$OUT/gen-adapter.json"
  for variant in ${GEN_VARIANTS:-eager flash_attention_2 eager+tiled base}; do
    attn=${variant%+tiled}; small=dequantize; [ "$variant" = eager+tiled ] && small=tiled
    adapter=(--adapter /tmp/gen-adapter); merged=()
    case $variant in base) attn=eager; adapter=() ;; eager) merged=(--merged) ;; esac
    echo "== generate stage: batch 1 and 16, $variant"
    ADAPTERLAB_NF4_SMALL_BATCH=$small timeout 200 /tmp/gl/after bench generate --model "$CKPT" --batch 1,16 \
      "${adapter[@]}" "${merged[@]}" --prompt-tokens 200 --new-tokens 50 --attn-implementation "$attn" \
      2>"$OUT/generate-$variant.err" | tee "$OUT/generate-$variant.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$variant\",${line#\{}" >> "$RESULTS"; done
    tail -2 "$OUT/generate-$variant.err"
  done
fi
# profile  seconds per phase (ADAPTERLAB_PROFILE=1: the device synchronised around each, so the
#          sum exceeds an unprofiled step) of a training step at batch 8 x 512 (eager) and of
#          batch-1 decoding (200-token prompt): where the time goes
if stage profile; then
  echo "== profile: train 8 x 512, generate batch 1"
  ADAPTERLAB_PROFILE=1 timeout 200 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --steps 3 --warmup 1 \
    2>"$OUT/profile-train.err" | tee "$OUT/profile-train.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-train\",${line#\{}" >> "$RESULTS"; done
  ADAPTERLAB_PROFILE=1 timeout 200 /tmp/gl/after bench generate --model "$CKPT" --batch 1 --prompt-tokens 200 --new-tokens 20 \
    2>"$OUT/profile-generate.err" | tee "$OUT/profile-generate.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-generate\",${line#\{}" >> "$RESULTS"; done
fi
# sft      `adapterlab train`, 50 steps at batch 8 x 512 on text (the bundled dialogues joined
#          into long rows, MiniLM's tokenizer from .carry/tokenizer.json), then HF PEFT loads the
#          adapter it wrote (peft_load_check.py): issue 17's "same loss curve" check
if stage sft; then
  install_wheels
  echo "== sft: adapterlab train, 50 steps, batch 8 x 512, then HF PEFT loads the adapter"
  python3 - <<'EOF'
import json, random, os
random.seed(0)
def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]
os.makedirs("/tmp/sft-data", exist_ok=True)
for split, n, src in (("train", 400, "train"), ("validation", 16, "validation")):
    base = rows(f"data/dialogsum-mini/{src}.jsonl")
    with open(f"/tmp/sft-data/{split}.jsonl", "w") as f:
        for i in range(n):
            pick = random.sample(base, 12)
            f.write(json.dumps({"id": f"{split}-{i}", "dialogue": "\n".join(r["dialogue"] for r in pick),
                                "summary": " ".join(r["summary"] for r in pick)}) + "\n")
EOF
  rm -rf /tmp/sft-out
  watch_mem sft
  timeout 300 /tmp/gl/after --data-dir /tmp/al-data train --set model_name_or_path="$CKPT" \
    --set tokenizer_name=.carry/tokenizer.json --set dataset=/tmp/sft-data --set output_dir=/tmp/sft-out \
    --set max_steps=50 --set per_device_train_batch_size=8 --set per_device_eval_batch_size=8 \
    --set gradient_accumulation_steps=1 --set completion_only_loss=false --set group_by_length=false \
    --set max_seq_length=512 --set logging_steps=5 --set save_steps=50 --set gradient_checkpointing=false \
    > "$OUT/sft.log" 2>&1; echo "sft exit $?"; tail -5 "$OUT/sft.log"
  stop_mem sft
  python3 -c "
import json; s = json.load(open('/tmp/sft-out/trainer_state.json'))
for e in s['log_history']: print(json.dumps(e))
" 2>&1 | tee "$OUT/sft-log-history.jsonl" | tail -4
  PYTHONPATH=/tmp/site python3 scripts/bench/peft_load_check.py --base "$CKPT" --adapter /tmp/sft-out 2>"$OUT/peft.err" \
    | tee "$OUT/peft.json"; tail -3 "$OUT/peft.err"
fi
python3 - "$RESULTS" > "$FINAL/summary.txt" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r.get("what") == "load":
        phases = r.get("phases") or {}
        top = ", ".join(f"{k} {v['s'] if isinstance(v, dict) else v}" for k, v in phases.items())
        print(f"{r['side']:>6} round {r.get('round')}: load {r['s']} s  {top}")
    if r.get("what") == "nvidia_smi_peak":
        print(f"{r['side']:>16}: nvidia-smi peak {r['mib']} MiB")
    if r.get("what") == "train_step" and r.get("side") == "python":
        print(f"train 8x512 python: {r.get('tokens_per_s')} tok/s, median step {r.get('median_s')} s, torch peak {r.get('peak_gib', '')}")
    elif r.get("what") == "generate":
        how = "merged" if r.get("merged") else ("unmerged" if r.get("adapter") else "no adapter")
        print(f"generate {r['side']:>17} batch {r['batch']} ({how}): {r.get('tokens_per_s')} tok/s (prefill {r.get('prefill_s')} s)")
    elif r.get("what") == "train_step" and r.get("mode") in ("8x512", "32x256"):
        print(f"train {r['mode']} {r['side']:>6}: {r.get('tokens_per_s')} tok/s, median step {r.get('median_s')} s")
    elif r.get("what") == "profile":
        print(f"{r['side']:>16}: {r['phase']:<28} {r['s_per_step']} s/step, {r['calls_per_step']} calls")
    elif r.get("what") == "train_step" and r.get("side") == "profile-train":
        print(f"profile-train: {r.get('tokens_per_s')} tok/s (profiled, synchronised)")
    elif r.get("what") == "train_step":
        print(f"train {r['mode']:>16}: useful {r.get('useful_tokens_per_s')} tok/s, padded {r.get('padded_tokens_per_s')} tok/s, pad {r.get('pad_fraction')}, peak {r.get('peak_gib', '')}")
PY
cat "$FINAL/summary.txt"
tar -C "$RAW" -czf "$FINAL/raw.tar.gz" .
