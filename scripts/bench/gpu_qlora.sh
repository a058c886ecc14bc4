#!/usr/bin/env bash
# The GPU comparison and checks, in one call on the lent H100 (see ../shared/gpu/README.md):
#   fixtures   regenerate the golden fixtures (make_golden.py, transformers + PEFT on the CPU
#              there) into $OUT/golden and PEFT's logits for the trainer's committed adapter
#              into $OUT/peft_roundtrip; the golden stage then tests against these
#   golden     the model core's golden tests and NF4 kernel tests on CUDA (carried test binary)
#   reference  the Python stack (transformers + PEFT + bitsandbytes): hf_qlora_baseline.py on a
#              Falcon-7B-shaped random checkpoint (made here once, ~14 GB in /tmp)
#   train      `adapterlab bench train` on the very same files and workload (batch 8 x 512)
#   train-ckpt the same with gradient checkpointing, for each --checkpoint-every in CKPT_EVERY
#              (default 1: every layer)
#   generate   `adapterlab bench generate`: batch 1 and 16, adapter unmerged and merged
#   profile    `bench train` and `bench generate` with ADAPTERLAB_PROFILE=1 on a Falcon-7B-shaped
#              checkpoint of PROFILE_LAYERS (8) layers: seconds per phase (model/src/profile.rs);
#              the reference's kernels under torch.profiler on the same checkpoint
#   stall      batch-16 decoding on that checkpoint; if it hangs, cuda-gdb names the kernel and
#              the host stack
#   sft        `adapterlab train`, 50 steps at batch 8 x 512 on text (the bundled dialogues,
#              concatenated to 512-token rows), then HF PEFT loads the adapter it wrote
# Peak GPU memory is polled with nvidia-smi for every stage alike (it includes the CUDA context
# and allocator caches); the reference also reports torch's own peak.
#
# Built here, carried there:
#   source ../shared/gpu/cuda-env.sh   (CUDA_TARGET_DIR=/work/cargo-target-cuda)
#   cargo build --release --features cuda -p adapterlab
#   cargo test --release -p adapterlab-model --features cuda --test golden --no-run
#   strip + gzip them into .carry/adapterlab.gz and .carry/golden.gz; copy a tokenizer.json
#   (MiniLM's WordPiece, from `adapterlab` assets) to .carry/tokenizer.json; wheels in .whl3/
#   (bitsandbytes 0.50.2 repacked with only its CUDA 13 libraries, peft 0.21.2).
# Then: device run, carry [".carry", ".whl3"], command `bash scripts/bench/gpu_qlora.sh`.
# All stages take more than one device call's 10 minutes: the comparison is
# `STAGES=reference,train,generate` (both sides in one call), the checks
# `STAGES=golden,train-ckpt,sft` (SFT_GRADIENT_CHECKPOINTING=true to train that way).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
CKPT=${CKPT:-/tmp/falcon7b-rand}
STAGES=${STAGES:-golden,reference,train,generate,sft}
CKPT_EVERY=${CKPT_EVERY:-1}
RESULTS=$OUT/results.jsonl
AL=/tmp/adapterlab
gunzip -c .carry/adapterlab.gz > $AL && chmod +x $AL

stage() { [[ ",$STAGES," == *",$1,"* ]]; }
if [ ! -d .carry ]; then echo "no .carry/: build and carry the binaries (see the top of this script)"; exit 2; fi
log() { while IFS= read -r line; do echo "$line"; [[ $line == '{'* ]] && echo "{\"side\":\"$1\",${line#\{}" >> "$RESULTS"; done; }
watch_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$1.txt" & MEMPID=$!; }
stop_mem() {
  kill $MEMPID 2>/dev/null; wait $MEMPID 2>/dev/null
  echo "{\"side\":\"$1\",\"what\":\"nvidia_smi_peak\",\"mib\":$(sort -n "$OUT/mem-$1.txt" | tail -1)}" | tee -a "$RESULTS"
}

date -u +%FT%TZ | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total --format=csv | tee "$OUT/gpu.csv"
python3 -m pip install --no-deps -q .whl3/*.whl 2>&1 | grep -v "WARNING: Running pip as" | tail -3

GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden
if stage fixtures; then
  echo "== golden fixtures (make_golden.py) and PEFT's logits for the trainer's adapter"
  python3 host/model/tests/fixtures/make_golden.py "$OUT/golden" > "$OUT/make-golden.log" 2>&1 \
    && GOLDEN_DIR=$OUT/golden && tail -1 "$OUT/make-golden.log" || tail -20 "$OUT/make-golden.log"
  mkdir -p "$OUT/peft_roundtrip" && cp -r host/tests/fixtures/peft_roundtrip/adapter "$OUT/peft_roundtrip/"
  python3 host/tests/fixtures/make_peft_roundtrip_fixture.py "$OUT/peft_roundtrip" 2>&1 | tail -3
fi

if stage golden; then
  gunzip -c .carry/golden.gz > /tmp/golden && chmod +x /tmp/golden
  for dev in cpu cuda; do
    echo "== golden tests on $dev against $GOLDEN_DIR"
    ADAPTERLAB_TEST_DEVICE=$dev ADAPTERLAB_GOLDEN_DIR=$GOLDEN_DIR \
      /tmp/golden --test-threads 1 2>&1 | tee "$OUT/golden-$dev.txt" | grep -E "^test |test result|panicked|differ|error" | head -40
  done
fi

if stage profile; then
  PCKPT=/tmp/falcon7b-${PROFILE_LAYERS:-8}l
  [ -f "$PCKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$PCKPT" --layers ${PROFILE_LAYERS:-8} --make-ckpt-only > "$OUT/make-pckpt.log" 2>&1
  echo "== profile: bench train (no checkpointing) with and without ADAPTERLAB_PROFILE, the reference under torch.profiler, merged generation"
  ADAPTERLAB_PROFILE=1 timeout ${STAGE_TIMEOUT:-240} $AL bench train --model "$PCKPT" --batch 8 --seq 512 --steps 3 --warmup 1 --save /tmp/profile-adapter 2>&1 | tee "$OUT/profile-train.log" | log profile-train
  timeout ${STAGE_TIMEOUT:-240} $AL bench train --model "$PCKPT" --batch 8 --seq 512 --steps 5 --warmup 2 2>&1 | tee "$OUT/profile-train-plain.log" | log profile-train-plain
  PYTHONUNBUFFERED=1 timeout ${STAGE_TIMEOUT:-240} python3 scripts/bench/hf_qlora_profile.py --ckpt "$PCKPT" > "$OUT/profile-python.log" 2>&1; tail -45 "$OUT/profile-python.log"
  # The merge traces GPU memory after each layer (RUST_LOG=adapterlab_model=debug).
  RUST_LOG=adapterlab_model=debug ADAPTERLAB_PROFILE=1 timeout ${STAGE_TIMEOUT:-240} $AL bench generate --model "$PCKPT" --adapter /tmp/profile-adapter --merged --batch 1 --new-tokens 10 2>&1 | tee "$OUT/profile-generate.log" | log profile-generate
fi

if stage stall; then
  # Batch-16 decoding on the 7B shape stalled; this names the kernel and the host stack it is
  # stuck in (cuda-gdb attaches to the running process).
  PCKPT=/tmp/falcon7b-${PROFILE_LAYERS:-8}l
  [ -f "$PCKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$PCKPT" --layers ${PROFILE_LAYERS:-8} --make-ckpt-only > "$OUT/make-pckpt.log" 2>&1
  echo "== stall: bench generate --batch ${STALL_BATCH:-16}"
  RUST_LOG=adapterlab_model=trace ADAPTERLAB_PROFILE=1 $AL bench generate --model "$PCKPT" --batch ${STALL_BATCH:-16} --prompt-tokens 2 --new-tokens 2 > "$OUT/stall.log" 2>&1 &
  PID=$!
  for i in $(seq 1 ${STALL_WAIT:-40}); do sleep 1; kill -0 $PID 2>/dev/null || break; done
  if kill -0 $PID 2>/dev/null; then
    echo "still running after ${STALL_WAIT:-40} s: attaching cuda-gdb"
    timeout 120 cuda-gdb -p $PID -batch -ex "info cuda kernels" -ex "thread apply all bt 25" > "$OUT/stall-gdb.txt" 2>&1
    grep -v "^\[New\|^$" "$OUT/stall-gdb.txt" | head -80
    kill -9 $PID
  else
    echo "finished"
  fi
  grep -v "phase starts" "$OUT/stall.log" | tail -5; grep "phase starts" "$OUT/stall.log" | tail -3
fi

if stage reference || stage train || stage train-ckpt || stage generate || stage sft; then
  [ -f "$CKPT/config.json" ] || python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --make-ckpt-only 2>&1 | tee "$OUT/make-ckpt.log"
fi

if stage reference; then
  echo "== reference: transformers + PEFT + bitsandbytes"
  watch_mem python
  python3 scripts/bench/hf_qlora_baseline.py --ckpt "$CKPT" --gen 2>&1 | tee "$OUT/python.log" | log python
  stop_mem python
fi

if stage train; then
  echo "== adapterlab bench train"
  watch_mem adapterlab-train
  timeout ${STAGE_TIMEOUT:-240} $AL bench train --model "$CKPT" --batch 8 --seq 512 --steps 10 --warmup 3 --save /tmp/bench-adapter 2>&1 | tee "$OUT/adapterlab-train.log" | log adapterlab
  stop_mem adapterlab-train
fi

if stage train-ckpt; then
  # CKPT_EVERY: a comma-separated list of --checkpoint-every values (1: every layer, as HF).
  for every in ${CKPT_EVERY//,/ }; do
    echo "== adapterlab bench train --gradient-checkpointing --checkpoint-every $every"
    watch_mem adapterlab-train-ckpt-$every
    timeout ${STAGE_TIMEOUT:-240} $AL bench train --model "$CKPT" --batch 8 --seq 512 --steps 10 --warmup 3 --gradient-checkpointing --checkpoint-every $every --save /tmp/bench-adapter 2>&1 | tee "$OUT/adapterlab-train-ckpt-$every.log" | log adapterlab
    stop_mem adapterlab-train-ckpt-$every
  done
fi

if stage generate; then
  echo "== adapterlab bench generate"
  ADAPTER=/tmp/bench-adapter
  [ -f $ADAPTER/adapter_config.json ] || ADAPTER=
  watch_mem adapterlab-generate
  timeout ${STAGE_TIMEOUT:-240} $AL bench generate --model "$CKPT" ${ADAPTER:+--adapter $ADAPTER --merged} --batch ${GEN_BATCHES:-1,16} 2>&1 | tee "$OUT/adapterlab-generate.log" | log adapterlab
  stop_mem adapterlab-generate
fi

if stage sft; then
  echo "== adapterlab train: 50 steps, batch 8 x 512, then HF PEFT loads the adapter"
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
  watch_mem adapterlab-sft
  $AL --data-dir /tmp/al-data train --set model_name_or_path="$CKPT" --set tokenizer_name=.carry/tokenizer.json \
    --set dataset=/tmp/sft-data --set output_dir=/tmp/sft-out --set max_steps=50 \
    --set per_device_train_batch_size=8 --set per_device_eval_batch_size=8 --set gradient_accumulation_steps=1 \
    --set completion_only_loss=false --set group_by_length=false --set max_seq_length=512 \
    --set logging_steps=5 --set save_steps=50 \
    --set gradient_checkpointing=${SFT_GRADIENT_CHECKPOINTING:-false} 2>&1 | tail -20
  stop_mem adapterlab-sft
  python3 -c "
import json; s = json.load(open('/tmp/sft-out/trainer_state.json'))
for e in s['log_history']: print(json.dumps(e))
" 2>&1 | log adapterlab-sft
  python3 scripts/bench/peft_load_check.py --base "$CKPT" --adapter /tmp/sft-out 2>&1 | log python-peft
fi

python3 scripts/bench/gpu_table.py "$RESULTS" "$OUT/gpu.csv" "$OUT/date.txt" | tee "$OUT/table.md"
