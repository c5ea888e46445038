#!/usr/bin/env bash
# One GPU session: install the checkout without network, run the GPU tests, then the benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_session.sh OUTDIR [bench args...]
# Wheels of missing packages (fla-core) may sit in .whl/; the package is laid out the way pip installs it.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [bench args]}; shift
source benchmarks/gpu_env.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -P -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
fi
python3 -P -m nsa_parallel.bench --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
