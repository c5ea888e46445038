"""Helpers for packed (``cu_seqlens``) batches: sequences laid end to end in one ``[1, total, ...]`` tensor."""
from __future__ import annotations

import itertools
import weakref
from typing import Dict, List, Tuple

import torch

from .config import num_compressed

# id(cu_seqlens) -> (weak reference, the tensor's version, its values): a packed batch's bounds are read to the host
# once per tensor, not by every layer and branch. Each read of a CUDA tensor is a device-to-host sync that drains
# the GPU queue; a packed 64k sequence's NSA forward made six (H100, twenty-seventh session: 48.0 ms against 42.0
# for the same sequence as a fixed-length batch). Megatron passes one cu_seqlens tensor to every layer of a step.
_HOST: Dict[int, tuple] = {}


def host_values(cu_seqlens: torch.Tensor) -> List[int]:
    """``cu_seqlens.tolist()``, read once per tensor (again after an in-place change: its version moves)."""
    hit = _cached(cu_seqlens)
    if hit is not None:
        return hit
    values = [int(x) for x in _read(cu_seqlens)]
    _remember(cu_seqlens, values)
    return values


def _read(cu_seqlens: torch.Tensor) -> list:
    return cu_seqlens.tolist()


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: not cached
        return None


def _cached(cu_seqlens: torch.Tensor):
    hit = _HOST.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == _version(cu_seqlens) is not None:
        return hit[2]
    return None


def _remember(cu_seqlens: torch.Tensor, values: List[int]) -> None:
    version = _version(cu_seqlens)
    if version is None:
        return
    key = id(cu_seqlens)
    # the entry leaves with its tensor (before the id can be reused)
    _HOST[key] = (weakref.ref(cu_seqlens, lambda _, key=key: _HOST.pop(key, None)), version, values)


def cu_seqlens_from_host(values: List[int], device=None) -> torch.Tensor:
    """An int32 cu_seqlens tensor of ``values`` (made on the host), its values cached so that no reader syncs."""
    out = torch.tensor(values, dtype=torch.int32, device=device)
    _remember(out, [int(v) for v in values])
    return out


def sequence_bounds(cu_seqlens: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` of every sequence of a packed batch."""
    cu = host_values(cu_seqlens)
    return list(zip(cu[:-1], cu[1:]))


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Length of the longest sequence of a packed batch."""
    cu = host_values(cu_seqlens)
    return max(b - a for a, b in zip(cu[:-1], cu[1:]))


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """cu_seqlens of the compressed tokens of each sequence (whole blocks only). Made on the device (no sync); where
    ``cu_seqlens``' values are on the host already, the result's are derived there too (:func:`host_values`)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ncmp = torch.where(lens >= block, (lens - block) // stride + 1, torch.zeros_like(lens))
    out = torch.zeros(len(lens) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    out[1:] = torch.cumsum(ncmp, 0).to(cu_seqlens.dtype)
    cu = _cached(cu_seqlens)
    if cu is not None:
        _remember(out, [0, *itertools.accumulate(num_compressed(b - a, block, stride) for a, b in zip(cu, cu[1:]))])
    return out


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int) -> None:
    """Raise a ValueError naming the problem if ``cu_seqlens`` does not describe a packed batch of ``total`` tokens."""
    if batch != 1:
        raise ValueError(f"cu_seqlens given: inputs must be packed as [1, total, h, d], got batch size {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = host_values(cu_seqlens)
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {cu}")
