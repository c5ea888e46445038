#!/usr/bin/env bash
# Context-parallel session on the GPUs of one host: CP equality (bf16) + timings vs one GPU and dense ring, then
# document masking's two layouts timed.
# Usage (repo root, on a multi-GPU machine): bash benchmarks/gpu_cp.sh OUTDIR [bench_cp args...]
set -uo pipefail
out=${1:?usage: gpu_cp.sh OUTDIR [bench_cp args]}; shift
source benchmarks/gpu_env.sh
out=$(cd "$out" && pwd)
repo=$(pwd)
ngpu=$(nvidia-smi -L | wc -l)
# torchrun starts its workers without -P: run from elsewhere so that the checkout's nsa_parallel/ (which lacks the
# kernels/ and context_parallel/ subpackages until installed) does not shadow the laid-out package
cd /tmp && python3 -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m nsa_parallel.bench_cp \
  --out "$out/cp_bench.json" "$@" 2>&1 | tee "$out/cp_bench.log"
# document masking: every document padded to split against short documents held whole (benchmarks/cp_documents_ab.py)
cd /tmp && python3 -m torch.distributed.run --standalone --nproc_per_node "$ngpu" \
  "$repo/benchmarks/cp_documents_ab.py" --out "$out/cp_documents_ab.json" 2>&1 | tee "$out/cp_documents_ab.log"
