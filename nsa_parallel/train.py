"""Train a small NSA causal LM on the built-in long-context recall task (CPU by default).

    python -m nsa_parallel.train --train-iters 200

Arguments use Megatron's names where Megatron has one. Until the megatron.core trainer lands this trains the
plain-PyTorch model in :mod:`nsa_parallel.layers`; it is the smoke test a new user runs first.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import List, Optional

import torch

from .arguments import add_nsa_args, nsa_config_from_args
from .data import RecallTask
from .layers import TinyNSALM
from .metrics import MetricsLogger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_parallel.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=2, help="KV heads (GQA groups).")
    g.add_argument("--attention", choices=("nsa", "dense"), default="nsa",
                   help="'dense' swaps NSA for causal SDPA, for like-for-like comparisons.")
    g = p.add_argument_group("data")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--recall-pairs", type=int, default=16, help="key-value pairs listed at the start.")
    g.add_argument("--recall-keys", type=int, default=64, help="distinct key tokens.")
    g.add_argument("--recall-values", type=int, default=16, help="distinct value tokens (chance loss = ln of it).")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    add_nsa_args(p)
    return p


def lr_at(it: int, args) -> float:
    """Linear warmup then cosine decay to --min-lr (Megatron's 'cosine' decay style)."""
    if it < args.lr_warmup_iters:
        return args.lr * (it + 1) / args.lr_warmup_iters
    frac = (it - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def train(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("num_layers", "hidden_size", "seq_length", "micro_batch_size", "train_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit(f"--hidden-size={args.hidden_size} must be a multiple of "
                         f"--num-attention-heads={args.num_attention_heads}")
    try:
        nsa_cfg = nsa_config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"bad --nsa-* argument: {e}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.nsa_backend or ("triton" if device.type == "cuda" else "reference")
    torch.manual_seed(args.seed)
    try:
        task = RecallTask(seq_length=args.seq_length, num_pairs=args.recall_pairs, num_keys=args.recall_keys,
                          num_values=args.recall_values)
    except ValueError as e:
        raise SystemExit(f"bad --recall-* / --seq-length argument: {e}")
    model = TinyNSALM(task.vocab_size, args.num_layers, args.hidden_size, args.num_attention_heads,
                      args.num_query_groups, config=nsa_cfg, backend=backend, attention=args.attention).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"> model: {args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads}/"
          f"{args.num_query_groups}, {n_params / 1e6:.2f}M params, attention={args.attention} backend={backend} "
          f"device={device}", flush=True)
    print(f"> {nsa_cfg}", flush=True)
    print(f"> task: recall over {args.seq_length} tokens, {args.recall_pairs} pairs; loss on recalled values "
          f"(chance = ln({task.num_values}) = {math.log(task.num_values):.2f})", flush=True)
    logger = MetricsLogger(args.tensorboard_dir)
    history = []
    t_last, tokens_since = time.perf_counter(), 0
    for it in range(args.train_iters):
        tokens, mask = task.batch(args.micro_batch_size, gen)
        tokens, mask = tokens.to(device), mask.to(device)
        log_now = (it + 1) % args.log_interval == 0 or it + 1 == args.train_iters
        for layer in model.layers:
            layer.attn.collect_stats = log_now and args.attention == "nsa"
        lr = lr_at(it, args)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(tokens[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                               reduction="none").view_as(mask)
        loss = ce[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        tokens_since += tokens[:, :-1].numel()
        if log_now:
            acc = (logits.argmax(-1) == tokens[:, 1:])[mask].float().mean().item()
            now = time.perf_counter()
            scalars = {"loss": loss.item(), "recall_acc": acc, "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_s": tokens_since / (now - t_last)}
            if device.type == "cuda":
                scalars["mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            line = list(scalars)
            for i, layer in enumerate(model.layers):  # NSA's own numbers: TensorBoard only, per layer
                scalars.update({f"nsa/layer{i}/{k}": v for k, v in layer.attn.stats.items()})
            logger.log(it + 1, scalars, line_keys=line)
            history.append({"iteration": it + 1, **scalars})
            t_last, tokens_since = now, 0
    logger.close()
    return {"history": history, "params": n_params}


def main(argv: Optional[List[str]] = None) -> None:
    train(argv)


if __name__ == "__main__":
    main()
