#!/usr/bin/env bash
# Decoding on one GPU: the decode tests in bf16, then the decode benchmark against dense SDPA decoding.
# Usage (repo root): bash benchmarks/gpu_decode.sh OUTDIR [bench_decode args...]
set -uo pipefail
out=${1:?usage: gpu_decode.sh OUTDIR [bench_decode args]}; shift
source benchmarks/gpu_env.sh
out=$(cd "$out" && pwd)
python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/test_decode.py 2>&1 | tail -3 | tee "$out/decode_tests.log"
python3 -P -m nsa_parallel.bench_decode --out "$out/decode_bench.json" "$@" 2>&1 | tee "$out/decode_bench.log"
