#!/usr/bin/env bash
# `adapterlab eval --metrics rouge,bleu` on 818 samples (SAMSum's test size) against Python's
# rouge-score + sacrebleu on the same predictions, same machine, whole processes, as a ratio.
#
#   scripts/bench/eval_vs_python.sh [BINARY]     (default target/release/adapterlab)
#
# Data: DialogSum dev+test from ../shared/data/dialogsum (a benchmark input, never committed),
# first 818 rows; the "prediction" is a lead baseline (the dialogue's first two turns), the
# reference the human summary. Python runs in a venv under ~/.cache/adapterlab/bench-venv with
# rouge-score 0.1.2 and sacrebleu 2.6.0. Each side runs 5 times; the median is reported.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/adapterlab}
DATA=${ADAPTERLAB_BENCH_DATA:-../shared/data/dialogsum}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A Python that already has rouge-score and sacrebleu (e.g. on a machine without a registry)
# can be given as ADAPTERLAB_BENCH_PYTHON; otherwise a venv is made.
if [ -n "${ADAPTERLAB_BENCH_PYTHON:-}" ]; then
  PYTHON=$ADAPTERLAB_BENCH_PYTHON
else
  VENV=${ADAPTERLAB_BENCH_VENV:-$HOME/.cache/adapterlab/bench-venv}
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q rouge-score==0.1.2 sacrebleu==2.6.0 nltk absl-py
  fi
  PYTHON=$VENV/bin/python
fi
"$PYTHON" - "$DATA" "$WORK/p.jsonl" <<'PY'
import json, sys
rows = []
for split in ("dev", "test"):
    for line in open(f"{sys.argv[1]}/{split}.jsonl"):
        r = json.loads(line)
        turns = [t.split(":", 1)[-1].strip() for t in r["dialogue"].split("\n") if t.strip()]
        rows.append({"id": f"{split}-{len(rows)}", "prediction": " ".join(turns[:2]),
                     "reference": r.get("summary") or r.get("summary1"), "source": r["dialogue"]})
with open(sys.argv[2], "w") as f:
    for r in rows[:818]:
        f.write(json.dumps(r) + "\n")
PY
cat > "$WORK/ref.py" <<'PY'
import json, sys
from rouge_score import rouge_scorer
import sacrebleu
rows = [json.loads(l) for l in open(sys.argv[1])]
scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
out = []
for r in rows:
    s = scorer.score(r["reference"], r["prediction"])
    out.append({k: v.fmeasure for k, v in s.items()} | {"bleu": sacrebleu.sentence_bleu(r["prediction"], [r["reference"]]).score})
corpus = sacrebleu.corpus_bleu([r["prediction"] for r in rows], [[r["reference"] for r in rows]]).score
json.dump({"samples": out, "corpus_bleu": corpus}, open(sys.argv[2], "w"))
PY
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_it() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk "BEGIN {print $e - $s}"; }
# Warm the component cache once, as a second start of the tool would find it.
"$BIN" --data-dir "$WORK/data" eval --predictions "$WORK/p.jsonl" --metrics rouge,bleu --json "$WORK/ours.json" >/dev/null
ours=$(for i in 1 2 3 4 5; do time_it "$BIN" --data-dir "$WORK/data" eval --predictions "$WORK/p.jsonl" --metrics rouge,bleu --json "$WORK/ours.json"; done | median)
theirs=$(for i in 1 2 3 4 5; do time_it "$PYTHON" "$WORK/ref.py" "$WORK/p.jsonl" "$WORK/ref.json"; done | median)
# The two must agree before the times mean anything.
"$PYTHON" - "$WORK/ours.json" "$WORK/ref.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1])); ref = json.load(open(sys.argv[2]))
worst = 0.0
for o, r in zip(ours["samples"], ref["samples"]):
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"):
        worst = max(worst, abs(o["scores"][k] - r[k]))
print(f"samples: {len(ref['samples'])}; largest per-sample difference: {worst:.2e}; corpus BLEU {ours['corpus']['bleu']:.4f} vs {ref['corpus_bleu']:.4f}")
PY
echo "adapterlab eval (median of 5): ${ours} s"
echo "python rouge-score + sacrebleu (median of 5): ${theirs} s"
echo "ratio: $(awk "BEGIN {printf \"%.1f\", $theirs / $ours}")x"
