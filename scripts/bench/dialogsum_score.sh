#!/usr/bin/env bash
# DialogSum side by side (issue 16, part 4), the host's half: score the predictions that
# dialogsum_side_by_side.sh brought back (three references a row) and compare the adapters
# with paired 95% intervals, the base model as the baseline and then TRL as the baseline.
#
#   scripts/bench/dialogsum_score.sh RESULTS_DIR [OUT_DIR]
#
# RESULTS_DIR holds pred_base.jsonl, pred_adapterlab.jsonl and pred_trl.jsonl (any missing one is
# an error). Env: AL (the adapterlab binary, default `adapterlab`), METRICS (default
# rouge,bleu,bertscore), ADAPTERLAB_DATA_DIR (the store the runs go to).
set -euo pipefail
RES=${1:?usage: dialogsum_score.sh RESULTS_DIR [OUT_DIR]}
OUTD=${2:-$RES/scores}
AL=${AL:-adapterlab}
METRICS=${METRICS:-rouge,bleu,bertscore}
mkdir -p "$OUTD"
STAMP=$(date -u +%Y%m%dT%H%M%S)
for m in base adapterlab trl; do
  f="$RES/pred_$m.jsonl"
  [ -f "$f" ] || { echo "missing $f" >&2; exit 2; }
  # Every row must carry its three references, or the scores would be single-reference ones.
  python3 - "$f" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bad = [r["id"] for r in rows if len(r.get("references") or []) != 3]
if bad:
    sys.exit(f"{sys.argv[1]}: {len(bad)} rows without 3 references, e.g. {bad[:3]}")
print(f"{sys.argv[1]}: {len(rows)} rows, 3 references each")
PY
done
for m in base adapterlab trl; do
  "$AL" eval --predictions "$RES/pred_$m.jsonl" --metrics "$METRICS" \
    --name "dialogsum-$m-$STAMP" --json "$OUTD/eval_$m.json"
done
"$AL" runs compare "dialogsum-base-$STAMP" "dialogsum-adapterlab-$STAMP" "dialogsum-trl-$STAMP" \
  --format markdown | tee "$OUTD/compare_vs_base.md"
"$AL" runs compare "dialogsum-trl-$STAMP" "dialogsum-adapterlab-$STAMP" \
  --format markdown | tee "$OUTD/compare_adapterlab_vs_trl.md"
"$AL" runs compare "dialogsum-base-$STAMP" "dialogsum-adapterlab-$STAMP" "dialogsum-trl-$STAMP" \
  --json >"$OUTD/compare_vs_base.json"
"$AL" runs compare "dialogsum-trl-$STAMP" "dialogsum-adapterlab-$STAMP" --json >"$OUTD/compare_adapterlab_vs_trl.json"
echo "scores in $OUTD"
