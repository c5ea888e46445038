#!/usr/bin/env bash
# Train a tiny NSA GPT on the CPU (built-in recall task) with validation, TensorBoard and a checkpoint, then
# continue prompts from that checkpoint on one process and on two tensor-parallel processes (same tokens).
# About a minute on 2 cores. On GPUs drop nothing: the same flags pick CUDA and the Triton kernels.
#
#   bash examples/train_and_generate.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-/tmp/nsa_example}
# recall task: keys are ids 0..31, values 32..39; a sequence lists 8 key-value pairs, then asks for keys again
MODEL=(--seq-length 256 --micro-batch-size 4 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2
       --recall-pairs 8 --recall-keys 32 --recall-values 8 --init-method-std 0.125
       --nsa-window 32 --nsa-select-block 16 --nsa-select-topn 4 --nsa-compress-block 8 --nsa-compress-stride 4)
PROMPTS=(--prompt 3 35 17 33 3 --prompt 5 38 9 32 11 36 9 --max-new-tokens 6)

python -m nsa_parallel.train "${MODEL[@]}" --train-iters 40 --lr-warmup-iters 4 --log-interval 10 \
    --eval-interval 20 --eval-iters 2 --save "$RUN/ckpt" --tensorboard-dir "$RUN/tb"
echo "== one process"
python -m nsa_parallel.generate "${MODEL[@]}" --load "$RUN/ckpt" "${PROMPTS[@]}"
echo "== two tensor-parallel processes"
torchrun --nproc-per-node 2 -m nsa_parallel.generate "${MODEL[@]}" --load "$RUN/ckpt" \
    --tensor-model-parallel-size 2 "${PROMPTS[@]}"
echo "TensorBoard: tensorboard --logdir $RUN/tb"
