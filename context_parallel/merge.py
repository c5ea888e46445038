"""Merging partial attention results by log-sum-exp: the one combine step of ring attention.

A query attended to two disjoint key sets gives ``(o1, lse1)`` and ``(o2, lse2)``; the attention over their union is
``o = w1 o1 + w2 o2`` with ``w_i = exp(lse_i - lse)`` and ``lse = log(exp(lse1) + exp(lse2))``. Accumulators stay
fp32 whatever the inputs' dtype, so precision does not degrade as the number of ring steps grows.
"""
from __future__ import annotations

from typing import Tuple

import torch


def merge_partial(o: torch.Tensor, lse: torch.Tensor, o_new: torch.Tensor,
                  lse_new: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results. ``o``: ``[..., d]``, ``lse``: ``[...]`` (``-inf`` where nothing was seen).

    Returns fp32 ``(o, lse)``; rows where both sides saw nothing stay 0 / ``-inf``.
    """
    o, o_new, lse, lse_new = o.float(), o_new.float(), lse.float(), lse_new.float()
    lse_out = torch.logaddexp(lse, lse_new)
    # where both are -inf, logaddexp is -inf and the weights would be nan: use 0 instead
    safe = torch.where(torch.isfinite(lse_out), lse_out, torch.zeros_like(lse_out))
    w, w_new = torch.exp(lse - safe), torch.exp(lse_new - safe)
    return o * w.unsqueeze(-1) + o_new * w_new.unsqueeze(-1), lse_out
