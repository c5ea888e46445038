#!/usr/bin/env bash
# The megatron.core trainer on one GPU: its tests (incl. the gpu-marked ones) with the installed megatron-core,
# then NSA vs dense (cuDNN/flash SDPA) training throughput at 32k and 64k tokens.
# Usage (repo root, on the GPU machine, megatron-core's wheel in .whl/): bash benchmarks/gpu_train.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu_train.sh OUTDIR}; shift
source benchmarks/gpu_env.sh
python3 -c "import megatron.core; print('megatron-core', megatron.core.__version__)" | tee -a "$out/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -P -m pytest -q -m "gpu or not gpu" tests/test_megatron.py tests/test_train.py -p no:cacheprovider 2>&1 \
    > "$out/train_tests.log"; tail -5 "$out/train_tests.log"
fi
# a 4-layer GPT (hidden 2048, 16 query / 2 KV heads of 128: GQA 8), bf16 autocast, Megatron's mock data
model="--num-layers 4 --hidden-size 2048 --num-attention-heads 16 --num-query-groups 2 --micro-batch-size 1 --bf16
       --mock-data --vocab-size 8192 --train-iters ${ITERS:-12} --log-interval 4 --lr-warmup-iters 2"
for t in ${SEQLENS-32768 65536}; do
  for attn in nsa dense; do
    python3 -P -m nsa_parallel.train $model --seq-length "$t" --attention "$attn" 2>&1 | grep -v -i warn \
      | tee "$out/train_${attn}_${t}.log"
  done
done
