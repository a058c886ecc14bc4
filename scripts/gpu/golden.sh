#!/usr/bin/env bash
# On the lent GPU machine: the model core's golden tests (small random Falcon and Llama against
# transformers) on CUDA, from a test binary built here with `--features cuda` and carried in
# .carry/gpu/golden.gz:
#   source ../shared/gpu/cuda-env.sh
#   CARGO_TARGET_DIR=/work/cargo-target-cuda cargo test -p adapterlab-model --features cuda --test golden --no-run
#   strip + gzip the printed binary into .carry/gpu/golden.gz
set -euo pipefail
cd "$(dirname "$0")/../.."
gunzip -c .carry/gpu/golden.gz > /tmp/golden && chmod +x /tmp/golden
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== CPU"
ADAPTERLAB_GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden /tmp/golden --test-threads 1
echo "== CUDA"
ADAPTERLAB_TEST_DEVICE=cuda ADAPTERLAB_GOLDEN_DIR=$PWD/host/model/tests/fixtures/golden /tmp/golden --test-threads 1
