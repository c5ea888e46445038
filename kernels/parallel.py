"""The Triton NSA core: compressed attention -> selection scores -> top-n -> selected + window -> gates.

The compression MLP phi stays in PyTorch: a dense GEMM over t/d tokens that cuBLAS does well (~1% of the core at
64k). Gating and top-n are small Triton kernels of their own (gate.py, topn.py).
"""
from __future__ import annotations

import torch

from .compress import compressed_attention
from .config import NSAConfig
from .flash import position_masked_attention
from .gate import gate_combine
from .reference import NSAOutput
from .select import selected_attention
from .topn import select_blocks
from .varlen import max_seqlen


def nsa_triton(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config: NSAConfig, scale: float,
               cu_seqlens=None, cmp_cu_seqlens=None) -> NSAOutput:
    # packed batches: the longest sequence sizes every grid; one host sync here instead of one per kernel
    # (it also has the most compressed tokens)
    max_t = max_seqlen(cu_seqlens) if cu_seqlens is not None else None
    o_cmp, lse_cmp = compressed_attention(q, k_cmp_c, v_cmp_c, config, scale, cu_seqlens, cmp_cu_seqlens, max_t)
    with torch.no_grad():
        indices = select_blocks(q.detach(), k_cmp_c.detach(), lse_cmp.detach(), config, scale, cu_seqlens,
                                cmp_cu_seqlens, max_t)
    o_slc, _ = selected_attention(q, k_slc, v_slc, indices, config.select_block, scale, cu_seqlens, max_t)
    o_swa, _ = position_masked_attention(q, k_swa, v_swa, scale, 1, 0, config.window, cu_seqlens, cu_seqlens,
                                         None if max_t is None else (max_t, max_t))
    return NSAOutput(gate_combine(o_cmp, o_slc, o_swa, gate), indices)
