"""Train a GPT whose attention is NSA, on megatron.core (CPU with gloo by default, GPUs with NCCL).

    python -m nsa_parallel.train --train-iters 200                     # one process, CPU, built-in recall task
    torchrun --nproc-per-node 2 -m nsa_parallel.train --tensor-model-parallel-size 2 ...

Arguments carry Megatron-LM's names. The model is megatron.core's ``GPTModel`` built from
:func:`nsa_parallel.megatron.get_gpt_layer_nsa_spec` (``--attention dense``: the same GPT with causal SDPA), wrapped
in Megatron's ``DistributedDataParallel``; micro-batches run through Megatron's forward-backward schedule (pipeline
parallel when ``--pipeline-model-parallel-size > 1``), gradients are finalised with ``finalize_model_grads`` and
stepped by torch's AdamW under Megatron's LR scheduler. Checkpoints go through ``dist_checkpointing``.

Data: the built-in recall task (default; loss on the recalled values only), ``--mock-data`` (Megatron's mock GPT
dataset) or ``--data-path`` (Megatron indexed datasets, token ids below ``--vocab-size``).
"""
from __future__ import annotations

import argparse
import math
import resource
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .arguments import add_nsa_args, nsa_config_from_args
from .distributed import all_done
from .metrics import MetricsLogger
from .rendezvous import LAUNCHERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_parallel.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=2, help="KV heads (GQA groups).")
    g.add_argument("--kv-channels", type=int, default=None, help="head dim; default hidden / heads")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm")
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"), default="rope")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight init (Megatron's)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--attention", choices=("nsa", "dense"), default="nsa",
                   help="'dense': the same GPT with causal SDPA (flash/cuDNN on GPUs), for comparisons.")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="layer flavour of the NSA spec; transformer_engine needs transformer-engine.")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    g.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="where ranks and rank 0's address come from: torchrun's variables, srun's (SLURM_*), "
                        "mpirun's through mpi4py, or one process; auto picks the one present.")
    g = p.add_argument_group("data")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--data-path", nargs="+", default=None,
                   help="Megatron indexed dataset prefixes, optionally weighted: '0.3 a 0.7 b'.")
    g.add_argument("--split", default="100,0,0", help="train,valid,test weights of --data-path (train is used).")
    g.add_argument("--mock-data", action="store_true", help="Megatron's mock GPT dataset.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of --data-path / --mock-data token ids (required with them).")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the model's vocabulary (embedding and output rows) to a multiple of this (and of the "
                        "tensor-parallel size): each TP rank holds an equal slice, GEMMs stay aligned, and a "
                        "checkpoint reshards to any TP size dividing it. Padded rows are never targets; generation "
                        "never draws them.")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="document masking: attention (and RoPE) stays within each document of a sample, the "
                        "documents ending with the EOD token (the last id of --vocab-size) of --data-path / "
                        "--mock-data. NSA runs the sample as a packed batch (cu_seqlens); needs --micro-batch-size "
                        "1 and --attention nsa; not yet with --context-parallel-size > 1.")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart after every EOD (for --position-embedding-type learned_absolute; "
                        "RoPE restarts per document under --reset-attention-mask anyway).")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting the token after an EOD.")
    g.add_argument("--recall-pairs", type=int, default=16, help="recall task: key-value pairs listed first.")
    g.add_argument("--recall-keys", type=int, default=64, help="recall task: distinct key tokens.")
    g.add_argument("--recall-values", type=int, default=16,
                   help="recall task: distinct value tokens (chance loss = ln of it).")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch x data-parallel size (no gradient accumulation).")
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=20)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard AdamW's state over the data-parallel (x context-parallel) ranks (ZeRO-1, torch's "
                        "ZeroRedundancyOptimizer); checkpoints are the same as without it.")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 parameters and optimizer state).")
    g.add_argument("--recompute-activations", action="store_true", help="recompute whole layers in backward.")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validation loss every N iterations and after the last (default: no validation). Data: "
                        "the validation split of --data-path (see --split), Megatron's mock validation set, or "
                        "held-out recall-task samples.")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches per validation; the same ones every time, so the curve compares like "
                        "with like.")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory for dist_checkpointing checkpoints")
    g.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    add_nsa_args(p)
    return p


def _fail(msg: str):
    raise SystemExit(f"nsa_parallel.train: {msg}")


def validate_args(args) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
                 "micro_batch_size", "train_iters", "log_interval", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "context_parallel_size", "make_vocab_size_divisible_by",
                 "eval_iters"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.hidden_size % args.num_attention_heads:
        _fail(f"--hidden-size={args.hidden_size} must be a multiple of --num-attention-heads="
              f"{args.num_attention_heads}")
    if args.num_attention_heads % args.num_query_groups:
        _fail(f"--num-attention-heads={args.num_attention_heads} must be a multiple of --num-query-groups="
              f"{args.num_query_groups}")
    if args.context_parallel_size > 1 and args.attention != "nsa":
        _fail(f"--context-parallel-size={args.context_parallel_size} needs --attention nsa (the dense SDPA baseline "
              "runs without context parallelism)")
    if args.num_layers % args.pipeline_model_parallel_size:
        _fail(f"--num-layers={args.num_layers} must be a multiple of --pipeline-model-parallel-size="
              f"{args.pipeline_model_parallel_size}")
    if args.data_path and args.mock_data:
        _fail("--data-path and --mock-data exclude each other; give one (or neither for the recall task)")
    if (args.data_path or args.mock_data) and not args.vocab_size:
        _fail("--vocab-size is required with --data-path / --mock-data")
    decay = args.lr_decay_iters or args.train_iters
    if not 0 <= args.lr_warmup_iters < decay:
        _fail(f"--lr-warmup-iters={args.lr_warmup_iters} must be >= 0 and < --lr-decay-iters (default "
              f"--train-iters) = {decay}")
    if args.eval_interval is not None and args.eval_interval < 1:
        _fail(f"--eval-interval={args.eval_interval} must be >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        _fail(f"--save-interval={args.save_interval} must be >= 1")
    if args.save_interval and not args.save:
        _fail("--save-interval needs --save DIR")
    documents = [f for f in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss") if getattr(args, f)]
    if documents and not (args.data_path or args.mock_data):
        _fail(f"--{documents[0].replace('_', '-')} needs documents that end with an EOD token: --data-path or "
              "--mock-data (the recall task has none)")
    if args.reset_position_ids and args.position_embedding_type == "rope" and not args.reset_attention_mask:
        _fail("--reset-position-ids does nothing for --position-embedding-type rope (RoPE takes no position ids; it "
              "restarts per document under --reset-attention-mask); allowed: with --reset-attention-mask, or with "
              "--position-embedding-type learned_absolute")
    if args.reset_attention_mask:
        if args.micro_batch_size != 1:
            _fail(f"--reset-attention-mask packs one sample's documents into one sequence: --micro-batch-size="
                  f"{args.micro_batch_size}; allowed: 1")
        if args.attention != "nsa":
            _fail("--reset-attention-mask needs --attention nsa (the dense SDPA baseline takes no packed sequences)")


def padded_vocab_size(vocab_size: int, args) -> int:
    """The model's vocabulary: ``vocab_size`` rounded up to a multiple of ``--make-vocab-size-divisible-by`` and of
    the tensor-parallel size (the vocab-parallel embedding needs equal slices per TP rank). Unlike Megatron's
    ``divisible_by x TP``, the size does not change with TP when TP divides ``divisible_by`` (the default 128), so a
    checkpoint loads at another TP size."""
    multiple = math.lcm(args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    return -(-vocab_size // multiple) * multiple


def build_model(args, nsa_cfg, vocab_size: int, device: torch.device):
    """GPTModel (this pipeline stage) from the NSA or dense spec, in Megatron's DDP wrapper; ``vocab_size`` is the
    data's, padded here by :func:`padded_vocab_size`."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .megatron import get_gpt_layer_nsa_spec
    from .megatron.dense import get_gpt_layer_dense_spec
    from .megatron.norm import with_sequence_parallel_norms

    kw = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        # every rank draws the full weights from the same CPU RNG stream: a model starts identical for any TP size
        use_cpu_initialization=True, perform_initialization=True,
        enable_autocast=args.bf16, autocast_dtype=torch.bfloat16 if args.bf16 else None,
        recompute_granularity="full" if args.recompute_activations else None,
        recompute_method="uniform" if args.recompute_activations else None,
        recompute_num_layers=1 if args.recompute_activations else None,
        transformer_impl=args.transformer_impl)
    if args.pipeline_model_parallel_size > 1:
        kw["batch_p2p_comm"] = device.type == "cuda"  # gloo has no batched isend/irecv
        # documents under CP give each micro-batch (and CP rank) its own length: the stages exchange shapes first
        if args.reset_attention_mask and args.context_parallel_size > 1:
            # (the model has no MoE layers; TransformerConfig refuses variable lengths with the default allgather
            # MoE token dispatcher)
            kw.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    config = TransformerConfig(**{k: v for k, v in kw.items() if v is not None})
    if args.attention == "nsa":
        spec = get_gpt_layer_nsa_spec(config, nsa_config=nsa_cfg, backend=args.nsa_backend,
                                      transformer_impl=args.transformer_impl)
    else:
        spec = get_gpt_layer_dense_spec(config)
    if args.sequence_parallel and args.transformer_impl == "local":
        # Megatron's torch norms refuse sequence parallelism (apex's and TE's do not): use ours, which can
        spec = with_sequence_parallel_norms(spec, args.num_layers // args.pipeline_model_parallel_size)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab_size(vocab_size, args),
                     max_sequence_length=args.seq_length, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base)
    model.to(device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, config


def build_optimizer(args, model, device: torch.device):
    """torch AdamW (fused on CUDA) with Megatron's rule: no weight decay on biases and norms; Megatron's
    OptimizerParamScheduler drives lr and weight decay. ``--use-distributed-optimizer``: AdamW's state sharded
    over the data-parallel ranks (ZeRO-1)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
              eps=args.adam_eps, fused=device.type == "cuda")
    if getattr(args, "use_distributed_optimizer", False):
        from megatron.core import parallel_state as ps
        from torch.distributed.optim import ZeroRedundancyOptimizer
        # every data x context-parallel rank holds the same averaged gradients: each steps its share of the
        # parameters and broadcasts them
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                      process_group=ps.get_data_parallel_group(with_context_parallel=True), **kw)
    else:
        opt = torch.optim.AdamW(groups, **kw)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters or args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")
    return opt, sched


def clip_grads(model, max_norm: float) -> float:
    """Move DDP's reduced ``main_grad`` into ``.grad`` and clip by the global norm over model-parallel ranks
    (tensor-parallel duplicates and pipeline-shared embeddings counted once)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    params = [p for p in model.parameters() if p.requires_grad]
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        p.grad = p.main_grad.to(p.dtype)
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.float().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss over the loss mask of the whole sequence; reports it averaged over data-parallel ranks.

    With context parallelism each rank holds part of the sequence (and of the loss mask): it divides its sum by
    the whole sequence's count. DDP averages gradients over the data x context ranks, and Megatron's schedule
    multiplies a two-output loss function's loss by the CP size to make up for it (not here as well: that gave
    CP-times gradients, hidden from the losses by Adam and by clipping, seen in the logged grad norm)."""
    from megatron.core import parallel_state as ps
    mask = loss_mask.view(-1).float()
    local = (output_tensor.view(-1).float() * mask).sum()
    count = mask.sum()
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        sums = torch.stack([local.detach(), count])
        dist.all_reduce(sums, group=ps.get_context_parallel_group())
        seq_sum, count = sums[0], sums[1]
    else:
        seq_sum = local.detach()
    loss = local / count.clamp(min=1.0)
    reported = seq_sum / count.clamp(min=1.0)
    dist.all_reduce(reported, group=ps.get_data_parallel_group())
    return loss, {"lm loss": reported / ps.get_data_parallel_world_size()}


def _cp_shard(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This context-parallel rank's tokens of the micro-batch (Megatron's load-balanced split)."""
    from megatron.core import parallel_state as ps

    from .context_parallel import split_for_rank
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    return {k: split_for_rank(v, cp, ps.get_context_parallel_rank()) for k, v in batch.items()}


# document and padding tokens of the samples since the last log line, under CP (document_padding_share)
_PADDING = {"documents": 0, "padded": 0, "largest": 0}


def _documents(batch: Dict[str, torch.Tensor], eod: int, nsa_config):
    """This rank's tokens of a sample as a packed batch of its documents, and the ``PackedSeqParams``."""
    from megatron.core import parallel_state as ps

    from .documents import document_bounds, document_packed_seq_params, documents_on_cp_rank, plan_cp_documents
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch, document_packed_seq_params(batch["tokens"], eod)
    plan = plan_cp_documents(document_bounds(batch["tokens"], eod), cp, nsa_config)
    _PADDING["documents"] += plan.length
    _PADDING["padded"] += plan.computed()
    _PADDING["largest"] += cp * max(plan.tokens(r) for r in range(cp))
    return documents_on_cp_rank(batch, eod, plan, ps.get_context_parallel_rank())


def _padding_share() -> Dict[str, float]:
    """Under CP with documents, since the last call: ``document_padding_share``, the share of padding in the
    tokens computed; ``document_cp_imbalance``, the busiest rank's tokens over the ranks' mean (1 = even; whole
    documents are placed to even it out, see :func:`nsa_parallel.documents.plan_cp_documents`)."""
    seen, padded, largest = _PADDING["documents"], _PADDING["padded"], _PADDING["largest"]
    _PADDING.update(documents=0, padded=0, largest=0)
    return {"document_padding_share": 1.0 - seen / padded, "document_cp_imbalance": largest / padded} if padded else {}


def micro_batch_on_this_rank(batch: Dict[str, torch.Tensor], document_eod: Optional[int] = None, nsa_config=None):
    """This context-parallel rank's part of a micro-batch of whole sequences, and its ``PackedSeqParams``: None,
    or with ``document_eod`` (document masking) the sample's documents as a packed batch (under CP long documents
    split over the ranks, short ones held whole by one: :mod:`nsa_parallel.documents`; ``nsa_config`` gives the
    lengths)."""
    if document_eod is None:
        return _cp_shard(batch), None
    return _documents(batch, document_eod, nsa_config)


def forward_step(data_iterator, model, document_eod: Optional[int] = None, nsa_config=None):
    """One micro-batch through this pipeline stage (Megatron's ``forward_step_func`` contract); with
    ``document_eod`` (``--reset-attention-mask``) the sample's documents go in as a packed batch
    (:func:`micro_batch_on_this_rank`)."""
    if data_iterator is None:
        # a middle pipeline stage: its input is the previous stage's output (set by the schedule), and the loss
        # function is only called on the last stage
        return model(None, None, None), _loss_func
    batch, packed = micro_batch_on_this_rank(next(data_iterator), document_eod, nsa_config)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    return out, partial(_loss_func, batch["loss_mask"])


def model_flops_per_token(args, nsa_cfg, vocab_size: int) -> float:
    """Training FLOPs per token (3 x forward: 2 multiply-adds per weight, attention by keys actually visited)."""
    h, L, t = args.hidden_size, args.num_layers, args.seq_length
    d = args.kv_channels or h // args.num_attention_heads
    hq, hkv = args.num_attention_heads, args.num_query_groups
    ffn = args.ffn_hidden_size or 4 * h
    if args.attention == "nsa":
        qkv = h * (hq * d + 6 * hkv * d + 3 * hq)
        c = nsa_cfg
        keys = ((t / 2) / c.compress_stride + min(c.select_topn * c.select_block, t / 2) + min(c.window, t / 2))
    else:
        qkv = h * (hq * d + 2 * hkv * d)
        keys = t / 2  # causal
    mlp = h * ffn * (3 if args.swiglu else 2)
    weights = L * (qkv + hq * d * h + mlp) + h * padded_vocab_size(vocab_size, args)
    attn = L * hq * d * 2 * keys  # QK^T and PV
    return 3 * 2 * (weights + attn)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def _start(args):
    """``(nsa_cfg, env)``: the NSA config from the flags and this process in its process group."""
    from .distributed import init_distributed
    validate_args(args)
    try:
        nsa_cfg = nsa_config_from_args(args)
    except ValueError as e:
        _fail(f"bad --nsa-* argument: {e}")
    try:
        env = init_distributed(args.device, launcher=args.launcher)
    except ValueError as e:
        _fail(str(e))
    if args.num_query_groups % args.tensor_model_parallel_size:
        _fail(f"--num-query-groups={args.num_query_groups} must be a multiple of --tensor-model-parallel-size="
              f"{args.tensor_model_parallel_size}")
    return nsa_cfg, env


def _enter_model_parallel(args, env, tp: int, pp: int, cp: int) -> None:
    """Megatron's groups for these sizes and the seeds: the same weights for any TP size (CPU init stream)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from .megatron import enable_cpu_shims
    from .megatron.cpu_shims import seed_cpu_rng_tracker
    if env.device.type == "cpu":
        enable_cpu_shims(force=True)
    _model_parallel(tp, pp, cp)
    torch.manual_seed(args.seed)
    if env.device.type == "cuda":
        model_parallel_cuda_manual_seed(args.seed)
    else:
        seed_cpu_rng_tracker(args.seed, ps.get_tensor_model_parallel_rank())


def train(argv: Optional[List[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    nsa_cfg, env = _start(args)
    if args.context_parallel_size > 1:
        from .context_parallel import check_cp_config
        try:
            check_cp_config(args.seq_length, args.context_parallel_size, "load_balanced", nsa_cfg)
        except ValueError as e:
            _fail(f"--seq-length / --context-parallel-size: {e}")
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import HeldOut, RecallTask, megatron_gpt_dataset

    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if args.sequence_parallel and args.reset_attention_mask and cp > 1 and args.nsa_select_block % tp:
        # each CP rank's share of a sample is padded to whole selection blocks (nsa_parallel.documents)
        _fail(f"--nsa-select-block={args.nsa_select_block} must be a multiple of --tensor-model-parallel-size={tp} "
              "with --sequence-parallel and --reset-attention-mask under context parallelism")
    if env.world_size % (tp * pp * cp):
        _fail(f"world size {env.world_size} must be a multiple of tensor x pipeline x context parallel sizes = "
              f"{tp * pp * cp}")
    if args.sequence_parallel and args.seq_length % tp:
        _fail(f"--seq-length={args.seq_length} must be a multiple of --tensor-model-parallel-size={tp} with "
              "--sequence-parallel")
    dp = env.world_size // (tp * pp * cp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        _fail(f"--global-batch-size={gbs} must be a multiple of micro batch x data-parallel size = "
              f"{args.micro_batch_size * dp}")
    num_micro = gbs // (args.micro_batch_size * dp)
    _enter_model_parallel(args, env, tp, pp, cp)
    if args.data_path or args.mock_data:
        try:
            dataset, valid = megatron_gpt_dataset(
                data_path=args.data_path, mock=args.mock_data, seq_length=args.seq_length,
                vocab_size=args.vocab_size, num_samples=args.train_iters * gbs, seed=args.seed, split=args.split,
                valid_samples=args.eval_iters * gbs if args.eval_interval else 0,
                reset_position_ids=args.reset_position_ids, eod_mask_loss=args.eod_mask_loss)
        except ValueError as e:
            _fail(str(e))
        vocab_size, data_name = args.vocab_size, ("mock" if args.mock_data else " ".join(args.data_path))
    else:
        try:
            dataset = RecallTask(seq_length=args.seq_length, num_pairs=args.recall_pairs,
                                 num_keys=args.recall_keys, num_values=args.recall_values, seed=args.seed)
        except ValueError as e:
            _fail(f"bad --recall-* / --seq-length argument: {e}")
        vocab_size, valid = dataset.vocab_size, HeldOut(dataset) if args.eval_interval else None
        data_name = (f"recall task ({args.recall_pairs} pairs; loss on recalled values, chance "
                     f"ln({args.recall_values}) = {math.log(args.recall_values):.2f})")
    model, config = build_model(args, nsa_cfg, vocab_size, env.device)
    opt, sched = build_optimizer(args, model, env.device)
    start = load_checkpoint(args.load, model, opt, sched) if args.load else 0
    return _loop(args, env, model, config, opt, sched, dataset, valid, start, dp, num_micro, nsa_cfg, vocab_size,
                 data_name, get_forward_backward_func(), save_checkpoint)


def load_for_inference(args):
    """``(model, vocab_size)``: this rank's part of the model the trainer flags ``args`` describe, with the weights
    of ``args.load`` (saved at any TP / PP / CP size; loaded at ``--tensor-model-parallel-size`` x
    ``--pipeline-model-parallel-size``, CP = 1), and the data's vocabulary (the model's rows are padded past it)."""
    from .checkpoint import load_checkpoint
    from .data import RecallTask
    if args.attention != "nsa":
        _fail(f"--attention {args.attention}: generation runs through the NSA KV cache; allowed: nsa")
    if args.context_parallel_size != 1:
        _fail(f"--context-parallel-size={args.context_parallel_size}: generation runs without context parallelism; "
              "allowed: 1 (checkpoints saved at any TP/PP/CP size load here)")
    nsa_cfg, env = _start(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if env.world_size != tp * pp:
        _fail(f"generation runs on --tensor-model-parallel-size x --pipeline-model-parallel-size = {tp * pp} "
              f"processes; this launch has {env.world_size}")
    if args.sequence_parallel and env.rank == 0:
        print("> --sequence-parallel ignored for generation: a decode step has one token to split (the weights are "
              "the same)", flush=True)
    args.sequence_parallel = False
    _enter_model_parallel(args, env, tp, pp, 1)
    vocab_size = args.vocab_size if (args.data_path or args.mock_data) else RecallTask(
        seq_length=args.seq_length, num_pairs=args.recall_pairs, num_keys=args.recall_keys,
        num_values=args.recall_values, seed=args.seed).vocab_size
    model, _ = build_model(args, nsa_cfg, vocab_size, env.device)
    opt, sched = build_optimizer(args, model, env.device)
    load_checkpoint(args.load, model, opt, sched)
    return model, vocab_size


def _model_parallel(tp: int, pp: int, cp: int) -> None:
    """Megatron's process groups for these sizes; kept for the next ``train()`` in the same process (tests,
    notebooks) when the sizes match, because NCCL communicators of destroyed groups are never freed."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size()) == (tp, pp, cp):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)


def _stage_reads_data(args) -> bool:
    """The first stage embeds tokens, the last takes labels; under document masking every stage needs the
    tokens for its packed-sequence bounds."""
    from megatron.core import parallel_state as ps
    return ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage() or args.reset_attention_mask


def _forward_step_func(args):
    if not args.reset_attention_mask:
        return forward_step
    # the EOD id of the data here: VocabTokenizer's, the last id of --vocab-size
    return partial(forward_step, document_eod=args.vocab_size - 1, nsa_config=nsa_config_from_args(args))


def _core_attentions(model) -> list:
    return [layer.self_attention.core_attention for layer in model.module.decoder.layers]


def _evaluate(args, model, forward_backward, valid, dp: int, num_micro: int, device, cores) -> float:
    """Mean validation loss over ``--eval-iters`` global batches (the first ones of ``valid`` every time); NaN
    off the last pipeline stage."""
    from megatron.core import parallel_state as ps

    from .data import micro_batches
    data = micro_batches(valid, micro_batch_size=args.micro_batch_size, num_micro_batches=num_micro,
                         data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=dp, start_iteration=0,
                         device=device) if _stage_reads_data(args) else None
    losses = []
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(args.eval_iters):
                reports = forward_backward(forward_step_func=_forward_step_func(args), data_iterator=data,
                                           model=[model], num_microbatches=num_micro, seq_length=args.seq_length,
                                           micro_batch_size=args.micro_batch_size, forward_only=True)
                losses += [r["lm loss"].item() for r in reports]
    finally:
        model.train()
        for core in cores:
            core.timer.pop()  # not training time
        _padding_share()  # nor training tokens
    return sum(losses) / len(losses) if losses else float("nan")


def _loop(args, env, model, config, opt, sched, dataset, valid, start, dp, num_micro, nsa_cfg, vocab_size,
          data_name, forward_backward, save_checkpoint) -> Dict:
    from megatron.core import parallel_state as ps

    from .data import micro_batches
    is_logger = env.rank == env.world_size - 1  # the last pipeline stage holds the loss
    logger = MetricsLogger(args.tensorboard_dir if is_logger else None, quiet=not is_logger)
    n_params = sum(p.numel() for p in model.parameters())
    if is_logger:
        print(f"> GPT: {args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads}/"
              f"{args.num_query_groups}, {n_params / 1e6:.2f}M params on this rank, attention={args.attention}, "
              f"device={env.device}, world {env.world_size} = TP {args.tensor_model_parallel_size} x PP "
              f"{args.pipeline_model_parallel_size} x CP {args.context_parallel_size} x DP {dp}", flush=True)
        if args.attention == "nsa":
            print(f"> {nsa_cfg}", flush=True)
        print(f"> data: {data_name}; global batch {num_micro * dp * args.micro_batch_size} x {args.seq_length} "
              f"tokens; vocab {vocab_size} (model rows {padded_vocab_size(vocab_size, args)})", flush=True)
        if start:
            print(f"> resumed from {args.load} at iteration {start}", flush=True)
    data = micro_batches(dataset, micro_batch_size=args.micro_batch_size, num_micro_batches=num_micro,
                         data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=dp,
                         start_iteration=start, device=env.device) if _stage_reads_data(args) else None
    cores = _core_attentions(model)
    flops_per_token = model_flops_per_token(args, nsa_cfg, vocab_size)
    tokens_per_iter = num_micro * dp * args.micro_batch_size * args.seq_length
    history, validation, t_last, iters_since = [], [], time.perf_counter(), 0
    for it in range(start, args.train_iters):
        log_now = (it + 1) % args.log_interval == 0 or it + 1 == args.train_iters
        for core in cores:
            core.collect_stats = log_now
        t_step = time.perf_counter()
        model.zero_grad_buffer()
        opt.zero_grad(set_to_none=True)
        reports = forward_backward(forward_step_func=_forward_step_func(args), data_iterator=data, model=[model],
                                   num_microbatches=num_micro, seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=False)
        grad_norm = clip_grads(model, args.clip_grad)
        opt.step()
        sched.step(increment=1)
        iters_since += 1
        if log_now:
            now = time.perf_counter()
            step_s = now - t_step
            dt = (now - t_last) / iters_since
            scalars = {"loss": float("nan")}
            if ps.is_pipeline_last_stage():
                scalars["loss"] = sum(r["lm loss"].item() for r in reports) / len(reports)
            scalars.update({"lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                            "tokens_per_s": tokens_per_iter / dt,
                            "tflops_per_gpu": flops_per_token * tokens_per_iter / dt / env.world_size / 1e12,
                            "mem_gib": _memory_gib(env.device), **_padding_share()})
            line = list(scalars)
            attn_s = sum(core.timer.pop() for core in cores)
            scalars["attention_time_share"] = attn_s / step_s
            for i, core in enumerate(cores):
                layer = ps.get_pipeline_model_parallel_rank() * len(cores) + i
                scalars.update({f"nsa/layer{layer}/{k}": v for k, v in getattr(core, "stats", {}).items()})
            logger.log(it + 1, scalars, line_keys=line)
            history.append({"iteration": it + 1, **scalars})
            t_last, iters_since = time.perf_counter(), 0
        if valid is not None and ((it + 1) % args.eval_interval == 0 or it + 1 == args.train_iters):
            loss = _evaluate(args, model, forward_backward, valid, dp, num_micro, env.device, cores)
            logger.log(it + 1, {"validation/loss": loss, "validation/ppl": math.exp(min(loss, 50.0))})
            validation.append({"iteration": it + 1, "loss": loss})
            t_last = time.perf_counter()  # throughput counts training, not validation
        if args.save and args.save_interval and (it + 1) % args.save_interval == 0 and it + 1 < args.train_iters:
            save_checkpoint(args.save, it + 1, model, opt, sched)
            t_last = time.perf_counter()  # throughput counts training, not checkpoint writes
    for core in cores:
        core.collect_stats = False
    if args.save and args.train_iters > start:
        save_checkpoint(args.save, args.train_iters, model, opt, sched)
    logger.close()
    return {"history": history, "validation": validation, "params": n_params, "rank": env.rank}


def close_parallel() -> None:
    """End a command's run: Megatron's model-parallel groups, then the default group once every rank is through
    (:func:`distributed.all_done`; without it a gloo rank may abort at exit, "terminate called without an active
    exception")."""
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    if dist.is_initialized():
        all_done()
        dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    train(argv)
    close_parallel()


if __name__ == "__main__":
    main()
