#!/usr/bin/env bash
# Megatron-LM's pretrain() through python -m nsa_parallel.pretrain_gpt on one GPU (megatron-core >= 0.17 in .whl/).
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_pretrain.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu_pretrain.sh OUTDIR}; shift
source benchmarks/gpu_env.sh
python3 -c "import megatron.core; print('megatron-core', megatron.core.__version__)" | tee -a "$out/device.txt"
cd /tmp && torchrun --nproc-per-node 1 -m nsa_parallel.pretrain_gpt \
  --num-layers 2 --hidden-size 512 --num-attention-heads 8 --group-query-attention --num-query-groups 2 \
  --seq-length 8192 --max-position-embeddings 8192 --micro-batch-size 1 --global-batch-size 2 \
  --train-iters 20 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --bf16 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 8192 --log-interval 5 --eval-iters 0 --eval-interval 1000 \
  --transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm --position-embedding-type rope \
  --normalization RMSNorm --swiglu --disable-bias-linear --nsa-window 512 --nsa-select-topn 16 \
  --save "$out/ckpt" --save-interval 20 "$@" 2>&1 | grep -v -i "warn\|Evict LRU\|DEPRECATED" | tee "$out/pretrain.log" | tail -60
