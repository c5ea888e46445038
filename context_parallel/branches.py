"""The three NSA branches for one context-parallel chunk of queries, on either backend.

A chunk's queries start at a global position (``q_offset``) while the keys they read start elsewhere: compressed
tokens and selection keys at position 0 (or at ``k_base`` for a ring step's visiting chunk), window keys behind a
halo. These wrappers put both backends behind one signature; the reference is the oracle of the CP tests.
Shapes: ``[b, t, h, d]``.
"""
from __future__ import annotations

import torch

from ..kernels import reference as ref
from ..kernels.config import NSAConfig


def compressed_and_select(q, k_cmp, v_cmp, config: NSAConfig, scale: float, q_offset: int, backend: str):
    """``(o_cmp [b, t, hq, dv], indices [b, t, hkv, n])``: attention over the global compressed tokens and the
    (global) selection blocks it scores highest."""
    hkv = k_cmp.shape[2]
    if backend == "reference":
        out, probs = ref.compressed_attention(q, k_cmp, v_cmp, config, scale, return_probs=True, q_offset=q_offset)
        with torch.no_grad():
            scores = ref.selection_scores(probs.detach(), hkv, q.shape[1] + q_offset, config)
            indices = ref.select_topn(scores, config, q_offset)
        return out.o, indices
    from ..kernels.compress import compressed_attention
    from ..kernels.topn import select_blocks
    o, lse = compressed_attention(q, k_cmp, v_cmp, config, scale, q_offset=q_offset)
    with torch.no_grad():
        indices = select_blocks(q.detach(), k_cmp.detach(), lse.detach(), config, scale, q_offset=q_offset)
    return o, indices


def selected(q, k, v, indices, config: NSAConfig, scale: float, q_offset: int, k_base: int, backend: str):
    """``(o, lse)`` over the selected blocks that lie in the key buffer ``[k_base, k_base + tk)``."""
    if backend == "reference":
        return tuple(ref.selected_attention(q, k, v, indices, config, scale, q_offset, k_base))
    from ..kernels.select import selected_attention
    return selected_attention(q, k, v, indices, config.select_block, scale, q_offset=q_offset, k_base=k_base)


def window(q, k, v, config: NSAConfig, scale: float, halo: int, backend: str):
    """Sliding-window output of queries whose keys ``k``/``v`` start ``halo`` tokens before them."""
    if backend == "reference":
        return ref.window_attention(q, k, v, config, scale, q_offset=halo).o
    from ..kernels.flash import position_masked_attention
    return position_masked_attention(q, k, v, scale, 1, 0, config.window, q_offset=halo)[0]
