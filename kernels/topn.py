"""Top-n selection from block scores: forced blocks in, future blocks out, ties to the lower index."""
from __future__ import annotations

from typing import Optional

import torch

from .config import NSAConfig
from .select import sequence_ids


def select_topn(scores: torch.Tensor, config: NSAConfig, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores ``[b, t, hkv, ns]`` -> block indices ``[b, t, hkv, n]`` int32, ascending, -1 padded, as
    :func:`reference.select_topn` (which takes ``[b, hkv, t, ns]``)."""
    b, t, hkv, ns = scores.shape
    n = config.select_topn
    _, local_t = sequence_ids(b, t, cu_seqlens, scores.device)
    own = (local_t // config.select_block).view(b, t, 1, 1)
    j = torch.arange(ns, device=scores.device).view(1, 1, 1, ns)
    valid = j <= own
    forced = valid & ((j < config.select_initial) | (j > own - config.select_local))
    s = torch.where(forced, float("inf"), torch.where(valid, scores, float("-inf")))
    if ns < n:
        s = torch.nn.functional.pad(s, (0, n - ns), value=float("-inf"))
    # topk, not a full sort: n << ns at long T. Forced blocks (+inf) are all taken whatever their order; only exactly
    # equal finite scores may break differently from the reference's lower-index rule.
    top = torch.topk(s, n, dim=-1)
    idx = torch.where(top.values == float("-inf"), ns + n, top.indices)
    idx = torch.sort(idx, dim=-1).values
    return torch.where(idx >= ns + n, -1, idx).to(torch.int32)
