#!/usr/bin/env bash
# The CPU-side benchmarks, run on the lent GPU machine (16 idle cores) with binaries carried
# from the build machine in .carry/bench/ (see BENCHMARKS.md for how they were built):
# plugin runtime overhead, API load (50 clients, 30 s), and eval against Python.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=.carry/bench
mkdir -p /tmp/bench
for f in adapterlab api_load plugin_overhead; do gunzip -c $B/$f.gz > /tmp/bench/$f && chmod +x /tmp/bench/$f; done
python3 -m pip install -q --no-index --no-deps --target /tmp/bench/site $B/whl/*.whl
echo "== machine"; nproc; grep -m1 "model name" /proc/cpuinfo; python3 -c "import sacrebleu; print('sacrebleu', sacrebleu.__version__)"
echo "== plugin overhead"; /tmp/bench/plugin_overhead $B/adapterlab_test_misbehave.wasm
echo "== api load"; /tmp/bench/api_load 30 50 2>/dev/null
echo "== eval vs python"
PYTHONPATH=/tmp/bench/site ADAPTERLAB_BENCH_PYTHON=python3 ADAPTERLAB_BENCH_DATA=$B/dialogsum \
  scripts/bench/eval_vs_python.sh /tmp/bench/adapterlab
