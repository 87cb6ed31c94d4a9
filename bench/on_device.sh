#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheel, run the GPU test suite, then the
# encrypted-vs-plain load benchmark. Carry `.device` holding the wheel(s) and `vectors/`:
#   mkdir -p .device && cp target/wheels/tensorizer_rs-*.whl .device/ && cp -r ../shared/vectors .device/
#   device run: bash bench/on_device.sh          (logs under $OUT when set)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target "$HOME/site" .device/*.whl || exit 1
export PYTHONPATH=$HOME/site PYTHONUNBUFFERED=1 TENSORIZER_VECTORS=$PWD/.device/vectors
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_vectors.py tests/test_encryption.py \
  -k "not crosscheck and not coreweave" 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
python3 bench/bench_encrypted.py --dir /tmp/tzbench --gib "${GIB:-8}" 2>&1 | tee "$OUT/bench-encrypted.log"
