#!/usr/bin/env bash
# One GPU session: install the checkout without network, run the GPU tests, then the benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_session.sh OUTDIR [bench args...]
# Wheels of missing packages (fla-core) may sit in .whl/; the package is laid out the way pip installs it.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [bench args]}; shift
mkdir -p "$out" /tmp/pkg/nsa_parallel
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
cp -r nsa_parallel/. /tmp/pkg/nsa_parallel/ && cp -r kernels /tmp/pkg/nsa_parallel/kernels \
  && cp -r context_parallel /tmp/pkg/nsa_parallel/context_parallel
export PYTHONPATH=/tmp/pkg:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -P -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
fi
python3 -P -m nsa_parallel.bench --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
