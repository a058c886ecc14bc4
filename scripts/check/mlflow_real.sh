#!/usr/bin/env bash
# `report_to = mlflow` against a real MLflow tracking server: installs mlflow from PyPI into
# ~/.cache/adapterlab/toolchains/mlflow-venv (a few hundred MB, once), starts `mlflow server`
# on a free loopback port with a SQLite store and artifact serving, trains the tiny test model
# for 8 steps with report_to=mlflow, then reads back through MLflow's own REST API: the
# params, the loss history (one point per step), the eval loss, the adapter's artifacts and
# the run's status. CI checks the same client against a recorded fake (tests/e2e/track.rs);
# this script is the check against the real thing.
#
#   scripts/check/mlflow_real.sh [path/to/adapterlab]      (default: target/debug/adapterlab)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/debug/adapterlab}"
venv="${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/mlflow-venv"
if ! "$venv/bin/python" -c "import mlflow" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "mlflow==3.17.2"
fi
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$venv/bin/mlflow" server --host 127.0.0.1 --port "$port" \
  --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination "$work/artifacts" \
  >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { cat "$work/server.log"; echo "mlflow server did not start" >&2; exit 1; }

# The tiny Llama of the tests with a one-token-per-character tokenizer, and a learnable set.
model="$work/tiny"
mkdir -p "$model" "$work/ds"
cp "$root/host/model/tests/fixtures/bnb/llama_tiny/model.safetensors" "$root/host/model/tests/fixtures/bnb/llama_tiny/generation_config.json" "$model/"
python3 - "$root/host/model/tests/fixtures/bnb/llama_tiny/config.json" "$model" "$work/ds" <<'PY'
import json, sys
config = json.load(open(sys.argv[1])); config["max_position_embeddings"] = 1024
json.dump(config, open(sys.argv[2] + "/config.json", "w"))
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for i, c in enumerate(["\n"] + [chr(b) for b in range(32, 127)]):
    vocab[c] = i + 3
json.dump({"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": 2, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
           "normalizer": None, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
           "post_processor": None, "decoder": {"type": "Fuse"}, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}},
          open(sys.argv[2] + "/tokenizer.json", "w"))
words = ["cat", "dog", "sun", "tree", "rain", "blue", "fish", "star"]
for name, n, off in [("train", 24, 0), ("validation", 6, 3)]:
    with open(f"{sys.argv[3]}/{name}.jsonl", "w") as f:
        for i in range(n):
            w, v = words[(i + off) % 8], words[(i * 3 + off + 1) % 8]
            f.write(json.dumps({"prompt": f"{v} {w} {v}. Echo {w}:", "completion": f" {w} {w} {w}"}) + "\n")
PY

MLFLOW_TRACKING_URI="http://127.0.0.1:$port" MLFLOW_EXPERIMENT_NAME=adapterlab-check \
  "$bin" --data-dir "$work/data" train \
  --set "model_name_or_path=$model" --set "dataset=$work/ds" --set "output_dir=$work/out" \
  --set max_steps=8 --set per_device_train_batch_size=4 --set logging_steps=1 --set eval_steps=4 \
  --set max_seq_length=64 --set lora.r=4 --set report_to=mlflow

MLFLOW_TRACKING_URI="http://127.0.0.1:$port" "$venv/bin/python" - <<'PY'
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("adapterlab-check")
assert exp is not None, "no experiment"
(run,) = c.search_runs([exp.experiment_id])
assert run.info.status == "FINISHED", run.info.status
assert run.data.params["lora.r"] == "4" and run.data.params["max_steps"] == "8", run.data.params
loss = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
assert sorted(loss) == list(range(1, 9)), loss
evals = [m.step for m in c.get_metric_history(run.info.run_id, "eval_loss")]
assert {0, 4, 8} <= set(evals), evals
files = [f.path for f in c.list_artifacts(run.info.run_id, "adapter")]
assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files, files
print(f"PASS: MLflow {__import__('mlflow').__version__} holds run {run.info.run_id}: {len(run.data.params)} params, "
      f"loss at steps {sorted(loss)}, eval_loss at {sorted(evals)}, artifacts {files}")
PY
