#!/usr/bin/env bash
# Reads TensorBoard event files with the real `tensorboard` package (installed from PyPI into
# ~/.cache/adapterlab/toolchains/tensorboard-venv on first use) and prints every scalar as JSON:
# {"tag": [[step, value], ...], ...}. The e2e test of `report_to = tensorboard` uses it, so the
# files are checked by the reader people use, not by our own writer's twin.
#
#   scripts/check/tensorboard_read.sh LOGDIR
set -euo pipefail
logdir="$1"
venv="${ADAPTERLAB_TOOLCHAINS:-$HOME/.cache/adapterlab/toolchains}/tensorboard-venv"
if ! "$venv/bin/python" -c "import tensorboard" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "tensorboard==2.21.0" >&2
fi
exec "$venv/bin/python" - "$logdir" <<'PY'
import json, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# A run's events sit in a folder of their own below LOGDIR (runs/<date>_<host>/).
runs = sorted(root for root, _, files in os.walk(sys.argv[1]) if any(f.startswith("events.out.tfevents") for f in files))
if len(runs) != 1:
    sys.exit(f"expected one folder of event files below {sys.argv[1]}, found {runs}")
acc = EventAccumulator(runs[0], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]}
out["__text_tags__"] = tags.get("tensors", [])
print(json.dumps(out))
PY
