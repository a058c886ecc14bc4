#!/usr/bin/env bash
# QLoRA on the GPU against the Python stack (transformers + PEFT + bitsandbytes), both sides in
# one device call on a Falcon-7B-shaped random bf16 checkpoint made there
# (hf_qlora_baseline.py --make-ckpt-only, LAYERS=32), and issue 17's targets checked at the end
# (gpu_table.py: each target met, not met, or not measured in this call). Stages (STAGES):
#   fixtures   regenerate the golden fixtures (make_golden.py, transformers + PEFT on the CPU
#              there) into $RAW/golden; the golden stage then tests against these
#   golden     the AFTER build's golden tests on CUDA (GOLDEN_CPU=1: on the CPU too; GOLDEN_FILTER:
#              only those matching one of its names; GOLDEN_ENVS: again with each VAR=value;
#              GOLDEN_TIMEOUT: seconds a test, default 240), including
#              `nf4_quantize_kernel_equals_the_cpu_path` (the load kernel against the CPU path,
#              bit for bit), `flash_attention_kernels_equal_the_cpu_twin`, the NF4 GEMV and
#              small-batch GEMM, and the HF-parity tests (each case also with flash attention)
#   load       loading into NF4 (double quantization), quantizing on the CPU (BEFORE build,
#              ADAPTERLAB_NF4_QUANTIZE=cpu) and on the GPU (AFTER build, the default) in
#              interleaved rounds (ROUNDS) on the same checkpoint, which stays in the page cache,
#              with the load's phases (read, quantize, download, nested, upload)
#   reference  the Python stack: a QLoRA step at batch 8 x 512 and greedy decoding at batch 1
#              and 16 (hf_qlora_baseline.py --gen; REF_GEN=0: the step alone), with its
#              nvidia-smi peak
#   train      `bench train` at batch 8 x 512, BEFORE then AFTER (once when they are one
#              build), then 32 x 256 (the reference notebook's batch), each with its peak;
#              TRAIN_ATTN picks the attn_implementation (default eager; flash_attention_2 compares
#              the flash path's builds) and TRAIN_ROUNDS repeats the 8 x 512 pair (default 1);
#              TRAIN_ENVS (VAR=value ...) adds the AFTER build with each setting
#   train-ckpt the same at 8 x 512 with gradient checkpointing, for each CKPT_EVERY (1,2: every
#              layer, every other layer)
#   packing    `bench train` at batch 8 x 512 on examples of 100-400 tokens (uniform, seeded, as
#              DialogSum-like rows): padded in random order, grouped by length (the trainer's
#              default sampler), packed with the examples regrouped and packed under a
#              block-diagonal mask (ADAPTERLAB_PACKED_ATTENTION); useful tokens/s compares
#   flash      the same 8 x 512, 32 x 256 and packed rows with flash_attention_2
#   generate   decoding with a LoRA adapter (eager unmerged and merged, flash, the small-batch
#              NF4 GEMM, and the NF4 base alone)
#   kernels    `bench kernels`: each NF4 decoding kernel alone at Falcon-7B's linear shapes,
#              batch 1 and 16 (microseconds a call, GB/s of 4-bit codes), each shape's calls
#              cycling through copies of its weight, 256 MiB of codes, so none finds its weight
#              in the L2 (before 2026-12-07 20:45 every call read the same weight)
#   attention  `bench attention`: one layer's attention alone at batch 8 x 512 (Falcon-7B's 71
#              query heads, one KV head, 64 dimensions), eager and flash_attention_2, forward and
#              forward + backward (microseconds, GFLOP/s); ATTN_ARGS adds options (e.g.
#              "--seq 2048 --batch 2")
#   lora       `bench lora`: the LoRA training node alone at Falcon-7B's four linear shapes, 4096
#              rows, rank 16, dropout 0.1 (forward, forward + backward, and the h and dA kernels
#              alone); LORA_ARGS adds options
#   profile    seconds per phase of a training step and of batch-1 decoding (ADAPTERLAB_PROFILE);
#              PROFILE_PYTHON=1 adds the reference's step under torch.profiler
#   ncu        Nsight Compute: each kernel of batch-1 decoding (and with NCU_TRAIN=1 of a training
#              step) timed alone, and the batch-1 NF4 product's full sections
#   sft        `adapterlab train`, 50 steps at batch 8 x 512 on the bundled dialogues, then HF
#              PEFT loads the adapter it wrote
#
# Built here, carried there (see ../shared/gpu/README.md): `bash scripts/gpu/build-carry.sh
# [BEFORE_COMMIT]` builds the CUDA release binary and the golden test binary at HEAD (and the
# binary at BEFORE_COMMIT, else a copy of HEAD's), xz-compressed under .carry/, MiniLM's
# tokenizer for the sft stage, and the reference's wheels in .whl3/.
# Device call: carry [".carry/before", ".carry/after", ".carry/golden.xz",
# ".carry/tokenizer.json", ".whl3"], command `OUT=$OUT bash scripts/bench/gpu_qlora.sh`.
# All stages take more than one call's 10 minutes at 32 layers: split them, e.g.
# STAGES=golden,load,train,flash ROUNDS=1, then reference,packing,generate (REF_SHAPES=16x256 for
# the reference's best batch that fits), then profile,sft
# (the checkpoint is made again in each call unless the machine is still warm).
set -uo pipefail
cd "$(dirname "$0")/../.."
# The device returns at most 8 files from $OUT: the raw files go to $RAW and come back as one
# tarball, $OUT/raw.tar.gz, beside the summary ($OUT/summary.txt).
FINAL=${OUT:-/tmp/gpu-qlora}
RAW=/tmp/gpu-qlora-raw
OUT=$RAW
STAGES=${STAGES:-golden,attention,lora,load,reference,train,packing,flash,generate,kernels,profile,sft}
GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden
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

# The reference's wheels (.whl3), installed once into /tmp/site, read through PYTHONPATH.
install_wheels() {
  [ -d /tmp/site/peft ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl3/*.whl 2>&1 | grep -v "WARNING: Running pip as" | tail -2
}
if stage fixtures; then
  install_wheels
  echo "== golden fixtures (make_golden.py)"
  PYTHONPATH=/tmp/site python3 host/model/tests/fixtures/make_golden.py "$OUT/golden" > "$OUT/make-golden.log" 2>&1 \
    && GOLDEN_DIR=$OUT/golden && tail -1 "$OUT/make-golden.log" || tail -20 "$OUT/make-golden.log"
fi
if stage golden; then
  unxz .carry/golden.xz /tmp/gl/golden
  devices=cuda; [ "${GOLDEN_CPU:-0}" = 1 ] && devices="cuda cpu"
  # GOLDEN_ENVS (space-separated VAR=value) runs the CUDA tests again with each setting.
  for run in $devices ${GOLDEN_ENVS:-}; do
    dev=cuda setting=
    case $run in cpu|cuda) dev=$run ;; *) setting=$run ;; esac
    echo "== golden tests of the after build on $dev ${setting:+with $setting }against $GOLDEN_DIR"
    # GOLDEN_FILTER (names, space-separated) runs the tests matching any of them only. Each test
    # runs in a process of its own: a CUDA fault poisons its process's context, and in one
    # process the next test then hung until the timeout (2026-12-07: ~300 s of device time).
    log=$OUT/golden-$dev${setting:+-${setting//[^A-Za-z0-9]/_}}.txt
    : > "$log"
    # shellcheck disable=SC2086
    names=$(/tmp/gl/golden ${GOLDEN_FILTER:-} --list --include-ignored 2>/dev/null | sed -n 's/: test$//p')
    passed=0 failed=0
    for name in $names; do
      # shellcheck disable=SC2086
      if env $setting ADAPTERLAB_TEST_DEVICE=$dev ADAPTERLAB_GOLDEN_DIR=$GOLDEN_DIR timeout "${GOLDEN_TIMEOUT:-240}" /tmp/gl/golden "$name" --exact \
        --test-threads 1 --include-ignored --nocapture >> "$log" 2>&1; then
        passed=$((passed + 1)); echo "test $name ... ok"
      else
        failed=$((failed + 1)); echo "test $name ... FAILED"
      fi
    done
    grep -E "panicked|bit-equal|cases" "$log" | head -20
    echo "golden: $passed passed, $failed failed"
  done
fi

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
# `bench attention` / `bench lora` (no checkpoint): BEFORE then AFTER (once when they are one
# build), each twice, interleaved; ATTN_ENVS (space-separated VAR=value) adds a run of the
# AFTER build with each setting.
bench_alone() { # subcommand, its extra arguments
  local what=$1 args=$2 sides="before after before after" side bin setting
  cmp -s .carry/before/COMMIT .carry/after/COMMIT && sides=after
  for env in ${ATTN_ENVS:-}; do sides="$sides after:$env"; done
  for side in $sides; do
    bin=${side%%:*} setting=
    [[ $side == *:* ]] && setting=${side#*:}
    echo "== $what alone, $side ($(cat .carry/$bin/COMMIT))"
    # shellcheck disable=SC2086
    env $setting timeout 300 /tmp/gl/$bin bench $what $args 2>>"$OUT/$what-$bin.err" \
      | tee -a "$OUT/$what-$bin.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$side\",${line#\{}" >> "$RESULTS"; done
    tail -2 "$OUT/$what-$bin.err"
  done
}
stage attention && bench_alone attention "${ATTN_ARGS:-}"
stage lora && bench_alone lora "${LORA_ARGS:-}"

# The checkpoint, for every stage but the golden tests, the kernels and attention alone.
if [[ ",$STAGES," =~ ,(load|reference|train|train-ckpt|packing|flash|generate|profile|sft|decode-profile|ncu), ]]; then
  [ -f "$CKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" \
    --make-ckpt-only > "$OUT/make-ckpt.log" 2>&1 || { tail -20 "$OUT/make-ckpt.log"; exit 1; }
  tail -1 "$OUT/make-ckpt.log"
fi
stage load && for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    echo "== round $round, $side: load + a 2-token generation"
    q=cpu; [ $side = after ] && q=gpu
    ADAPTERLAB_NF4_QUANTIZE=$q ADAPTERLAB_PROFILE=1 timeout 180 /tmp/gl/$side bench generate --model "$CKPT" --batch 1 --prompt-tokens 16 --new-tokens 2 \
      2>"$OUT/load-$side-$round.err" | tee "$OUT/load-$side-$round.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$side\",\"round\":$round,${line#\{}" >> "$RESULTS"; done
    tail -3 "$OUT/load-$side-$round.err"
  done
done
watch_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$1.txt" & MEMPID=$!; }
stop_mem() {
  kill $MEMPID 2>/dev/null; wait $MEMPID 2>/dev/null
  echo "{\"side\":\"$1\",\"what\":\"nvidia_smi_peak\",\"mib\":$(sort -n "$OUT/mem-$1.txt" | tail -1)}" | tee -a "$RESULTS"
}
if stage reference; then
  if ls .whl3/*.whl >/dev/null 2>&1; then
    install_wheels
    echo "== reference: transformers + PEFT + bitsandbytes, train 8 x 512, generate batch 1 and 16"
    watch_mem python
    # REF_GEN=0: the reference's training step alone (no decoding), for calls about training.
    gen=--gen; [[ ${REF_GEN:-1} == 0 ]] && gen=
    PYTHONPATH=/tmp/site timeout 400 python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" $gen \
      2>"$OUT/python.err" | tee "$OUT/python.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"python\",${line#\{}" >> "$RESULTS"; done
    stop_mem python
    tail -3 "$OUT/python.err"
    # REF_SHAPES (e.g. 16x256): more reference training shapes, for "the Python stack's best
    # batch that fits" beside the train stage's 32 x 256 (on 80 GB 32 x 256 does not fit there).
    for shape in ${REF_SHAPES:-}; do
      echo "== reference: train $shape"
      PYTHONPATH=/tmp/site timeout 300 python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --layers "$LAYERS" \
        --batch "${shape%x*}" --seq "${shape#*x}" 2>"$OUT/python-$shape.err" | tee "$OUT/python-$shape.json" \
        | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"python\",\"mode\":\"$shape\",${line#\{}" >> "$RESULTS"; done
      tail -3 "$OUT/python-$shape.err"
    done
  else
    echo "== reference stage skipped: no .whl3/ wheels carried"
  fi
fi
if stage train; then
  # Without a BEFORE_COMMIT the before binary is the after binary: train it once.
  sides="before after"
  cmp -s .carry/before/COMMIT .carry/after/COMMIT && sides=after
  attn=${TRAIN_ATTN:-eager}
  for round in $(seq 1 "${TRAIN_ROUNDS:-1}"); do
  for side in $sides; do
    echo "== train stage: $side, batch 8 x 512, $attn (round $round)"
    watch_mem train-$side
    timeout 240 /tmp/gl/$side bench train --model "$CKPT" --batch 8 --seq 512 --steps 8 --warmup 3 \
      --attn-implementation "$attn" \
      2>>"$OUT/train8x512-$side.err" | tee -a "$OUT/train8x512-$side.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$side\",\"mode\":\"8x512\",\"attn\":\"$attn\",${line#\{}" >> "$RESULTS"; done
    stop_mem train-$side
    tail -2 "$OUT/train8x512-$side.err"
  done
  # TRAIN_ENVS (space-separated VAR=value): the AFTER build again with each setting, side
  # "after+VAR=value", for a speed switch's A/B within one build and one call.
  for env in ${TRAIN_ENVS:-}; do
    tag=after-${env//[^A-Za-z0-9]/_}
    echo "== train stage: after with $env, batch 8 x 512, $attn (round $round)"
    watch_mem "train-$tag"
    env "$env" timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --steps 8 --warmup 3 \
      --attn-implementation "$attn" \
      2>>"$OUT/train8x512-$tag.err" | tee -a "$OUT/train8x512-$tag.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after+$env\",\"mode\":\"8x512\",\"attn\":\"$attn\",${line#\{}" >> "$RESULTS"; done
    stop_mem "train-$tag"
    tail -2 "$OUT/train8x512-$tag.err"
  done
  done
  # The reference notebook's per-device batch, 32 x 256, without checkpointing (AFTER only;
  # TRAIN_32=0 skips it).
  [ "${TRAIN_32:-1}" = 1 ] && {
  echo "== train stage: after, batch 32 x 256"
  watch_mem train32-after
  timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch 32 --seq 256 --steps 6 --warmup 2 \
    2>"$OUT/train32x256-after.err" | tee "$OUT/train32x256-after.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after\",\"mode\":\"32x256\",${line#\{}" >> "$RESULTS"; done
  stop_mem train32-after
  tail -2 "$OUT/train32x256-after.err"
  }
fi
if stage train-ckpt; then
  every_list=${CKPT_EVERY:-1,2}
  for every in ${every_list//,/ }; do
    echo "== train-ckpt stage: after, batch 8 x 512, checkpointing every $every layers"
    watch_mem train-ckpt-$every
    timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --steps 8 --warmup 3 \
      --gradient-checkpointing --checkpoint-every "$every" 2>"$OUT/train-ckpt-$every.err" | tee "$OUT/train-ckpt-$every.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after\",\"mode\":\"ckpt-$every\",${line#\{}" >> "$RESULTS"; done
    stop_mem train-ckpt-$every
    tail -2 "$OUT/train-ckpt-$every.err"
  done
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
#          packing rows above, so each pair compares); FLASH_SHAPES (default "8x512 32x256") and
#          FLASH_PACKING=0 narrow it
if stage flash; then
  for shape in ${FLASH_SHAPES:-8x512 32x256}; do
    b=${shape%x*}; s=${shape#*x}
    echo "== flash stage: after, batch $b x $s, flash_attention_2"
    watch_mem flash$shape
    timeout 240 /tmp/gl/after bench train --model "$CKPT" --batch "$b" --seq "$s" --steps 6 --warmup 2 \
      --attn-implementation flash_attention_2 2>"$OUT/flash$shape.err" | tee "$OUT/flash$shape.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"flash\",\"mode\":\"$shape\",${line#\{}" >> "$RESULTS"; done
    stop_mem flash$shape
    tail -2 "$OUT/flash$shape.err"
  done
  [ "${FLASH_PACKING:-1}" = 1 ] && echo "== flash stage: packing, flash_attention_2" && timeout 200 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --lengths 100..400 --packing --steps 10 --warmup 3 \
    --attn-implementation flash_attention_2 2>"$OUT/flash-packing.err" | tee "$OUT/flash-packing.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"flash\",\"mode\":\"packing\",${line#\{}" >> "$RESULTS"; done
fi
# generate  decoding at batch 1 and 16 (200-token prompts, 50 new tokens) with a LoRA adapter on
#           all four linear kinds (issue 17's workload; one training step makes it, since its
#           values do not change the work), for each of GEN_VARIANTS: eager (unmerged, then
#           merged), flash_attention_2 (unmerged), base (eager, no adapter), with the default
#           NF4 decoding kernels or +KERNEL (quant/kernels.rs): +wide (batch 1's GEMV with
#           16-byte loads, ADAPTERLAB_NF4_GEMV=wide), +mma (the tensor-core GEMM for batch 1 and
#           16, ADAPTERLAB_NF4_GEMV=mma ADAPTERLAB_NF4_SMALL_BATCH=mma), +dequantize or +tiled
#           (batch 16 through dequantize + cuBLAS or the tiled GEMM), +unfused (decoding
#           attention on the eager path, ADAPTERLAB_DECODE_ATTENTION=eager), +split (decoding's
#           head split, rotation and cache writes op by op, ADAPTERLAB_DECODE_ROPE=split),
#           +gelu (the MLP's GELU in a kernel of its own, ADAPTERLAB_DECODE_GELU=separate),
#           +lorah (an adapter's h in a launch of its own, ADAPTERLAB_DECODE_LORA_H=separate),
#           +residual (a layer's residual in a kernel of its own, ADAPTERLAB_DECODE_RESIDUAL=separate),
#           +fused1 (GELU, h and residual as before any was fused), +nopdl (the tensor-core
#           kernel launched without programmatic dependent launch, ADAPTERLAB_DECODE_PDL=off),
#           +earlypdl (its blocks letting the next one start early, ADAPTERLAB_DECODE_PDL=early),
#           +onpdl (PDL without that, ADAPTERLAB_DECODE_PDL=on), +productspdl (early PDL for the
#           NF4 products alone, layer norm, rope_append and attention launched plainly, as
#           before 2026-12-08: ADAPTERLAB_DECODE_PDL=products), +TILING
#           (the tensor-core kernel's tiling up to 8 rows, ADAPTERLAB_NF4_MMA_TILING=TILING, e.g.
#           +s16u1), +dequant1 (one row's weights as the dequantize kernel forms them, not as
#           bitsandbytes' batch-1 GEMV does, ADAPTERLAB_NF4_ONE_ROW=dequantize), +nosplit (one
#           row's products never split over k, ADAPTERLAB_NF4_PAIRS_SPLIT=off); for each build
#           of GEN_SIDES (default
#           after; "before after" measures a change in one call; other builds than after run
#           only the variants without +KERNEL)
if stage generate; then
  timeout 120 /tmp/gl/after bench train --model "$CKPT" --batch 1 --seq 16 --steps 1 --warmup 0 \
    --save /tmp/gen-adapter > "$OUT/gen-adapter.json" 2>&1 || tail -3 "$OUT/gen-adapter.json"
  for side in ${GEN_SIDES:-after}; do
    for variant in ${GEN_VARIANTS:-eager flash_attention_2 eager+tiled base}; do
      # attention[+kernel]: the NF4 decoding kernels the switches pick (quant/kernels.rs)
      attn=${variant%%+*}; switches=()
      case $variant in
        *+tiled) switches=(ADAPTERLAB_NF4_SMALL_BATCH=tiled) ;;
        *+dequantize) switches=(ADAPTERLAB_NF4_SMALL_BATCH=dequantize) ;;
        *+wide) switches=(ADAPTERLAB_NF4_GEMV=wide) ;;
        *+mma) switches=(ADAPTERLAB_NF4_GEMV=mma ADAPTERLAB_NF4_SMALL_BATCH=mma) ;;
        *+unfused) switches=(ADAPTERLAB_DECODE_ATTENTION=eager) ;;
        *+split) switches=(ADAPTERLAB_DECODE_ROPE=split) ;;
        *+gelu) switches=(ADAPTERLAB_DECODE_GELU=separate) ;;
        *+lorah) switches=(ADAPTERLAB_DECODE_LORA_H=separate) ;;
        *+residual) switches=(ADAPTERLAB_DECODE_RESIDUAL=separate) ;;
        *+nopdl) switches=(ADAPTERLAB_DECODE_PDL=off) ;;
        *+onpdl) switches=(ADAPTERLAB_DECODE_PDL=on) ;;
        *+earlypdl) switches=(ADAPTERLAB_DECODE_PDL=early) ;;
        *+productspdl) switches=(ADAPTERLAB_DECODE_PDL=products) ;;
        *+fused1) switches=(ADAPTERLAB_DECODE_GELU=separate ADAPTERLAB_DECODE_LORA_H=separate ADAPTERLAB_DECODE_RESIDUAL=separate) ;;
        *+s[0-9]*) switches=(ADAPTERLAB_NF4_MMA_TILING=${variant#*+}) ;;
        *+dequant1) switches=(ADAPTERLAB_NF4_ONE_ROW=dequantize) ;;
        *+nosplit) switches=(ADAPTERLAB_NF4_PAIRS_SPLIT=off) ;;
        *+*) echo "unknown generate variant $variant"; continue ;;
      esac
      # Only the after build knows the kernel switches: other builds run the plain variants.
      [ "$side" != after ] && [[ $variant == *+* ]] && continue
      adapter=(--adapter /tmp/gen-adapter); merged=()
      [ "$attn" = base ] && { attn=eager; adapter=(); }
      [ "$variant" = eager ] && merged=(--merged)
      # The after build's rows keep the variant's name; the others are prefixed with their side.
      name=$variant; [ "$side" = after ] || name=$side-$variant
      echo "== generate stage: $side, batch 1 and 16, $variant"
      env "${switches[@]}" timeout 200 /tmp/gl/$side bench generate --model "$CKPT" --batch 1,16 \
        "${adapter[@]}" "${merged[@]}" --prompt-tokens 200 --new-tokens 50 --attn-implementation "$attn" \
        2>"$OUT/generate-$name.err" | tee "$OUT/generate-$name.json" \
        | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"$name\",${line#\{}" >> "$RESULTS"; done
      tail -2 "$OUT/generate-$name.err"
    done
  done
fi
# profile  seconds per phase (ADAPTERLAB_PROFILE=1: the device synchronised around each, so the
#          sum exceeds an unprofiled step) of a training step at batch 8 x 512 (eager) and of
#          batch-1 decoding (200-token prompt): where the time goes
if stage profile; then
  # PROFILE_ATTN: the training step's attn_implementation (eager, flash_attention_2; default
  # eager); PROFILE_GENERATE=0 profiles the training step alone.
  echo "== profile: train 8 x 512 (${PROFILE_ATTN:-eager}), generate batch 1"
  ADAPTERLAB_PROFILE=1 timeout 200 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --steps 3 --warmup 1 \
    --attn-implementation "${PROFILE_ATTN:-eager}" \
    2>"$OUT/profile-train.err" | tee "$OUT/profile-train.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-train\",${line#\{}" >> "$RESULTS"; done
  [ "${PROFILE_GENERATE:-1}" = 1 ] && ADAPTERLAB_PROFILE=1 timeout 200 /tmp/gl/after bench generate --model "$CKPT" --batch 1 --prompt-tokens 200 --new-tokens 20 \
    2>"$OUT/profile-generate.err" | tee "$OUT/profile-generate.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-generate\",${line#\{}" >> "$RESULTS"; done
  # The same with the generate stage's adapter unmerged, when that stage made one.
  [ "${PROFILE_GENERATE:-1}" = 1 ] && [ -d /tmp/gen-adapter ] && ADAPTERLAB_PROFILE=1 timeout 200 /tmp/gl/after bench generate --model "$CKPT" --batch 1 \
    --adapter /tmp/gen-adapter --prompt-tokens 200 --new-tokens 20 \
    2>"$OUT/profile-generate-adapter.err" | tee "$OUT/profile-generate-adapter.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-generate-adapter\",${line#\{}" >> "$RESULTS"; done
  if [ "${PROFILE_PYTHON:-0}" = 1 ]; then
    install_wheels
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 300 python3 scripts/bench/hf_qlora_profile.py --ckpt "$CKPT" \
      > "$OUT/profile-python.log" 2>&1; tail -45 "$OUT/profile-python.log"
  fi
fi
if stage kernels; then
  echo "== kernels: each NF4 decoding product alone"
  timeout 200 /tmp/gl/after bench kernels 2>"$OUT/kernels.err" | tee "$OUT/kernels.json" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"after\",${line#\{}" >> "$RESULTS"; done
  tail -2 "$OUT/kernels.err"
fi
# decode-profile  decoding at batch DECODE_BATCH (default 1) with the generate stage's adapter
#          (unmerged), profiled once per DECODE_PROFILES (default "events host"): events
#          (ADAPTERLAB_PROFILE=events: each phase's device time from CUDA events, nothing
#          synchronized; where the host is the bound, the device's waits for it count too),
#          1 (synchronized around each phase, which adds the synchronizations' cost to each),
#          host (what each phase costs the host to queue)
if stage decode-profile; then
  [ -d /tmp/gen-adapter ] || timeout 120 /tmp/gl/after bench train --model "$CKPT" --batch 1 --seq 16 --steps 1 \
    --warmup 0 --save /tmp/gen-adapter > "$OUT/gen-adapter.json" 2>&1
  for mode in ${DECODE_PROFILES:-events host}; do
    echo "== decode-profile: ADAPTERLAB_PROFILE=$mode"
    ADAPTERLAB_PROFILE=$mode timeout 200 /tmp/gl/after bench generate --model "$CKPT" --batch "${DECODE_BATCH:-1}" \
      --adapter /tmp/gen-adapter --prompt-tokens 200 --new-tokens 50 \
      2>"$OUT/decode-profile-$mode.err" | tee "$OUT/decode-profile-$mode.json" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"profile-decode-$mode\",${line#\{}" >> "$RESULTS"; done
  done
fi
# ncu      Nsight Compute (the device has ncu, not nsys), each kernel timed alone (one metric,
#          gpu__time_duration; clocks and caches as they run), so a small launch weighs what it
#          costs the device, not what a synchronised profile adds to it: batch-1 decoding
#          (200-token prompt, NCU_TOKENS new tokens, default 8; the generate stage's adapter,
#          unmerged; with NCU_BASE=1 again without the adapter), summed per kernel over one
#          decoding step (ncu_kernels.py --cycle argmax);
#          with NCU_TRAIN=1 one training step at 8 x 512 (flash_attention_2) per kernel name; and
#          the full section set of the batch-1 NF4 product at Falcon-7B's four shapes (ncu-gemv.txt;
#          NCU_GEMV: the kernel's name, a regex, default the swapped tensor-core form's; none: not run)
if stage ncu; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  ncu_run() { # name, timeout, command...
    local name=$1 limit=$2; shift 2
    echo "== ncu: $name"
    timeout "$limit" "$NCU" --csv --print-units base --metrics gpu__time_duration.sum --clock-control none \
      --cache-control none --log-file "$OUT/ncu-$name.csv" "$@" > "$OUT/ncu-$name.out" 2>&1
    echo "ncu $name exit $? ($(grep -c gpu__time_duration "$OUT/ncu-$name.csv" 2>/dev/null) launches)"
    tail -3 "$OUT/ncu-$name.out"
  }
  [ -d /tmp/gen-adapter ] || timeout 120 /tmp/gl/after bench train --model "$CKPT" --batch 1 --seq 16 --steps 1 \
    --warmup 0 --save /tmp/gen-adapter > "$OUT/gen-adapter.json" 2>&1
  ncu_run decode 240 /tmp/gl/after bench generate --model "$CKPT" --batch 1 --adapter /tmp/gen-adapter \
    --prompt-tokens 200 --new-tokens "${NCU_TOKENS:-8}"
  python3 scripts/bench/ncu_kernels.py "$OUT/ncu-decode.csv" --cycle argmax | tee "$OUT/ncu-decode-step.jsonl" \
    | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"ncu-decode\",${line#\{}" >> "$RESULTS"; done
  if [ "${NCU_BASE:-0}" = 1 ]; then
    ncu_run decode-base 240 /tmp/gl/after bench generate --model "$CKPT" --batch 1 \
      --prompt-tokens 200 --new-tokens "${NCU_TOKENS:-8}"
    python3 scripts/bench/ncu_kernels.py "$OUT/ncu-decode-base.csv" --cycle argmax | tee "$OUT/ncu-decode-base-step.jsonl" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"ncu-decode-base\",${line#\{}" >> "$RESULTS"; done
  fi
  if [ "${NCU_TRAIN:-0}" = 1 ]; then
    ncu_run train 300 /tmp/gl/after bench train --model "$CKPT" --batch 8 --seq 512 --steps 1 --warmup 0 \
      --attn-implementation flash_attention_2
    python3 scripts/bench/ncu_kernels.py "$OUT/ncu-train.csv" --top 60 | tee "$OUT/ncu-train-kernels.jsonl" \
      | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"ncu-train\",${line#\{}" >> "$RESULTS"; done
  fi
  if [ "${NCU_GEMV:-}" != none ]; then
    echo "== ncu: the batch-1 NF4 product, full sections"
    timeout 200 "$NCU" --set full --clock-control none -k "regex:${NCU_GEMV:-nf4_mma_bf16_s8u2}" \
      --launch-count 16 --print-details all /tmp/gl/after bench kernels --rows 1 --repeats 1 \
      > "$OUT/ncu-gemv.txt" 2>&1
    echo "ncu gemv exit $?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy" "$OUT/ncu-gemv.txt" | head -40
  fi
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
  sed 's/^{/{"side":"sft",/' "$OUT/sft-log-history.jsonl" | grep '^{' >> "$RESULTS"
  PYTHONPATH=/tmp/site python3 scripts/bench/peft_load_check.py --base "$CKPT" --adapter /tmp/sft-out 2>"$OUT/peft.err" \
    | tee "$OUT/peft.json" | while IFS= read -r line; do [[ $line == '{'* ]] && echo "{\"side\":\"peft\",${line#\{}" >> "$RESULTS"; done
  cat "$OUT/peft.json"; tail -3 "$OUT/peft.err"
fi
python3 scripts/bench/gpu_table.py "$RESULTS" "$OUT/gpu.csv" "$OUT/date.txt" > "$FINAL/summary.txt"
cat "$FINAL/summary.txt"
tar -C "$RAW" -czf "$FINAL/raw.tar.gz" .
