"""Helpers for packed (``cu_seqlens``) batches: sequences laid end to end in one ``[1, total, ...]`` tensor."""
from __future__ import annotations

from typing import List, Tuple

import torch


def sequence_bounds(cu_seqlens: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` of every sequence of a packed batch."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Length of the longest sequence of a packed batch (one device-to-host sync: compute it once per call)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """cu_seqlens of the compressed tokens of each sequence (whole blocks only)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ncmp = torch.where(lens >= block, (lens - block) // stride + 1, torch.zeros_like(lens))
    out = torch.zeros(len(lens) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    out[1:] = torch.cumsum(ncmp, 0).to(cu_seqlens.dtype)
    return out


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int) -> None:
    """Raise a ValueError naming the problem if ``cu_seqlens`` does not describe a packed batch of ``total`` tokens."""
    if batch != 1:
        raise ValueError(f"cu_seqlens given: inputs must be packed as [1, total, h, d], got batch size {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {cu}")
