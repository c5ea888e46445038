"""Process-group start-up for the trainer and tools: torchrun's environment, or a single process.

The rendezvous is read from the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` as torchrun sets them. With none of them set this is a one-process job on a free local port.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


BACKENDS = ("gloo", "nccl", "cpu:gloo,cuda:nccl")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None) -> DistributedEnv:
    """Initialise ``torch.distributed`` once (idempotent) and pick this rank's device.

    Args:
        device: ``"cuda"`` or ``"cpu"``; default cuda when available.
        backend: default ``cpu:gloo,cuda:nccl`` on cuda, gloo on cpu.
    """
    dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}; allowed: 'cuda', 'cpu'")
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; allowed here: 'cpu'")
    # On GPUs CUDA tensors go through NCCL and CPU ones (checkpoint metadata, object collectives) through gloo.
    backend = backend or ("cpu:gloo,cuda:nccl" if dev_type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    rank, world = _int_env("RANK", 0), _int_env("WORLD_SIZE", 1)
    local_rank = _int_env("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if dev_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            if world > 1:
                raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun (or set "
                                 "MASTER_ADDR and MASTER_PORT)")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        kw = {"device_id": dev} if "nccl" in backend else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    elif dev_type == "cuda" and "nccl" not in str(dist.get_backend()):
        raise ValueError(f"torch.distributed is already initialised with backend {dist.get_backend()!r}, which "
                         "cannot reduce CUDA tensors; initialise it with 'nccl' or 'cpu:gloo,cuda:nccl'")
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, str(dist.get_backend()))
