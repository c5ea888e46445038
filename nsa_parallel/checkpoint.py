"""Save and resume with ``megatron.core.dist_checkpointing``: model, optimizer, LR scheduler, iteration.

Checkpoints are sharded (each rank writes its tensor-parallel shards; replicated tensors once), so a run saved at
one TP/PP size resumes at another. Layout follows Megatron-LM: ``<save>/iter_0000100/`` plus
``<save>/latest_checkpointed_iteration.txt``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        optim_state_to_sharding_state)
from torch.distributed.optim import ZeroRedundancyOptimizer

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's AdamW state (torch makes it lazily at the first step) so it can be loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unwrap(model):
    return getattr(model, "module", model)  # Megatron's DDP wrapper holds the GPTModel as .module


def _local(optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state: a ZeroRedundancyOptimizer's own share, else the optimizer."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _main_replica(sharded: ShardedTensor) -> ShardedTensor:
    """A parameter's optimizer state under ZeRO lives on one data-parallel rank: that rank writes it (the main
    replica along data parallelism, the last entry of Megatron's replica id)."""
    rid = sharded.replica_id
    sharded.replica_id = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
    return sharded


def _sharded_state(model, optimizer, scheduler, iteration: int, loading: bool) -> dict:
    model_sd = _unwrap(model).sharded_state_dict()
    local = _local(optimizer)
    if loading:
        _init_adam_state(local)
    optim_sd = local.state_dict()  # its per-parameter dicts are the optimizer's own: copy before editing
    steps = {float(st["step"]) for st in optim_sd["state"].values() if "step" in st}
    # AdamW keeps one step count per parameter, all equal here: save it once, as Megatron's FP32Optimizer does
    optim_sd["state"] = {i: {k: v for k, v in st.items() if k != "step"} for i, st in optim_sd["state"].items()}
    params = [p for g in local.param_groups for p in g["params"]]
    optim_state_to_sharding_state(optim_sd, get_param_id_to_sharded_param_map(model_sd, params))
    if local is not optimizer:
        # the same checkpoint as without ZeRO: each state once, by its owner; the per-rank param groups not at all
        optim_sd["state"] = {i: {k: _main_replica(v) for k, v in st.items()} for i, st in optim_sd["state"].items()}
        del optim_sd["param_groups"]
    return {"model": model_sd, "optimizer": optim_sd, "optimizer_step": max(steps, default=0.0),
            "scheduler": scheduler.state_dict(), "iteration": iteration}


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler) -> str:
    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, iteration, loading=False), path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return path


def latest_iteration(root: str) -> Optional[int]:
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as f:
        return int(f.read().strip())


def load_checkpoint(root: str, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint under ``root`` into model, optimizer and scheduler; return its iteration."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"--load {root}: no {TRACKER} there (nothing saved with --save {root} yet)")
    state = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, iteration, loading=True),
                                    iteration_dir(root, iteration))
    _unwrap(model).load_state_dict(state["model"])
    optim_sd = state["optimizer"]
    for st in optim_sd["state"].values():
        st["step"] = torch.tensor(float(state["optimizer_step"]))
    local = _local(optimizer)
    # this rank's param groups (their parameter lists differ under ZeRO; lr and weight decay come from the
    # scheduler, loaded below), so a checkpoint saved with or without ZeRO loads either way
    optim_sd["param_groups"] = local.state_dict()["param_groups"]
    local.load_state_dict(optim_sd)
    scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])
