# Shared by the sbatch scripts: turns the job's environment variables into the trainer's arguments.
# Sourced, not run. Every variable has a default; override any of them on the sbatch line:
#   sbatch --export=ALL,CP=4,SEQ_LEN=131072 slurm/train.sbatch
#
#   PYTHON       interpreter with nsa-parallel installed              (python3)
#   NSA_DEVICE   cuda | cpu (cpu: gloo, for testing the launch path)  (cuda)
#   TP, PP, CP   tensor / pipeline / context parallel sizes           (1, 1, 1)
#   SEQ_LEN      tokens per sequence                                  (32768)
#   MICRO_BATCH  sequences per micro batch                            (1)
#   TRAIN_ITERS  optimizer steps                                      (1000)
#   MODEL_ARGS   model shape                                          (a 12-layer 1024-wide GQA model)
#   NSA_ARGS     --nsa-* hyperparameters                              (paper defaults: none)
#   DATA         mock | recall | <Megatron indexed dataset prefix>    (mock)
#   VOCAB_SIZE   token ids of DATA (mock / dataset)                   (32000)
#   RUN_DIR      TensorBoard and checkpoints go under it              (runs/$SLURM_JOB_ID)
#   EXTRA_ARGS   anything else for python -m nsa_parallel.train       ()
#                (validation: EXTRA_ARGS="--split 99,1,0 --eval-interval 500 --eval-iters 20")
#   NSA_MASTER_ADDR, NSA_MASTER_PORT  rendezvous override             (first host, 20000 + job id % 20000)

set -euo pipefail

PYTHON=${PYTHON:-python3}
NSA_DEVICE=${NSA_DEVICE:-cuda}
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
SEQ_LEN=${SEQ_LEN:-32768}
MICRO_BATCH=${MICRO_BATCH:-1}
TRAIN_ITERS=${TRAIN_ITERS:-1000}
MODEL_ARGS=${MODEL_ARGS:---num-layers 12 --hidden-size 1024 --num-attention-heads 16 --num-query-groups 4}
NSA_ARGS=${NSA_ARGS:-}
DATA=${DATA:-mock}
VOCAB_SIZE=${VOCAB_SIZE:-32000}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_ID:-local}}
EXTRA_ARGS=${EXTRA_ARGS:-}

# Rank 0 lives on the job's first host; every task derives the same port from the job id. sbatch copies the
# submitting shell's environment into the job, so a MASTER_ADDR/MASTER_PORT left there (another job, a notebook's
# process group) must not leak in: override on purpose with NSA_MASTER_ADDR / NSA_MASTER_PORT.
MASTER_ADDR=${NSA_MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)}
export MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
export MASTER_PORT=${NSA_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
unset RANK WORLD_SIZE LOCAL_RANK
# The job starts in the submit directory, often a checkout: keep its nsa_parallel/ folder from shadowing the
# installed package (Python >= 3.11; torchrun's workers inherit it)
export PYTHONSAFEPATH=1

case "$DATA" in
    mock) DATA_ARGS=(--mock-data --vocab-size "$VOCAB_SIZE") ;;
    recall) DATA_ARGS=() ;;
    *) DATA_ARGS=(--data-path "$DATA" --vocab-size "$VOCAB_SIZE") ;;
esac
case "$NSA_DEVICE" in
    cuda) DEVICE_ARGS=(--device cuda --bf16) ;;
    cpu) DEVICE_ARGS=(--device cpu) ;;
    *) echo "NSA_DEVICE=$NSA_DEVICE; allowed: cuda, cpu" >&2; exit 2 ;;
esac

# NCCL: uncomment what your fabric needs.
# export NCCL_DEBUG=WARN                 # INFO to see the rings/trees NCCL builds
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL's bootstrap (not docker0/lo)
# export NCCL_ASYNC_ERROR_HANDLING=1     # fail a hung collective instead of waiting forever (older torch)
# export TORCH_NCCL_BLOCKING_WAIT=0
# export NCCL_NVLS_ENABLE=0              # NVLink SHARP/multicast off where the driver lacks it
# export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP overlap wants one

# shellcheck disable=SC2206 # MODEL_ARGS / NSA_ARGS / EXTRA_ARGS are word lists on purpose
TRAIN_ARGS=(
    "${DEVICE_ARGS[@]}"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
    --seq-length "$SEQ_LEN" --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS"
    $MODEL_ARGS $NSA_ARGS
    "${DATA_ARGS[@]}"
    --tensorboard-dir "$RUN_DIR/tensorboard" --save "$RUN_DIR/checkpoints"
    $EXTRA_ARGS
)

echo "nsa-parallel job ${SLURM_JOB_ID:-?}: $(date -Is) nodes=${SLURM_JOB_NODELIST:-?} tasks=${SLURM_NTASKS:-?}" \
     "master=$MASTER_ADDR:$MASTER_PORT TP=$TP PP=$PP CP=$CP seq=$SEQ_LEN device=$NSA_DEVICE"
