#!/usr/bin/env bash
# Scaling study on the GPUs of one host (NSA vs dense, lengths x CP sizes), then the CP check at 128k.
# Usage (repo root): bash benchmarks/gpu_scaling.sh OUTDIR [scaling args...]; plots: python -m nsa_parallel.scaling
# --replot OUTDIR/scaling on a machine with matplotlib.
set -uo pipefail
out=${1:?usage: gpu_scaling.sh OUTDIR [scaling args]}; shift
source benchmarks/gpu_env.sh
out=$(cd "$out" && pwd)
ngpu=$(nvidia-smi -L | wc -l)
python3 -P -m nsa_parallel.scaling --no-plots --out "$out/scaling" "$@" 2>&1 | tee "$out/scaling.log"
if [ "$ngpu" -gt 1 ]; then  # equality of CP with one GPU (bf16) on the current ring / launch code
  cd /tmp && python3 -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m nsa_parallel.bench_cp \
    --seqlens 131072 --iters 3 --dense-max-t 0 --out "$out/cp_check.json" 2>&1 | tail -3 | tee "$out/cp_check.log"
fi
