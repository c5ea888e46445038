"""The Triton NSA core: compressed attention -> selection scores -> top-n -> window -> selected + gates.

The compression MLP phi stays in PyTorch: a dense GEMM over t/d tokens that cuBLAS does well (~1% of the core at
64k). Top-n is a small Triton kernel of its own (topn.py); the gated sum of the forward is the selected forward's
epilogue, which runs last for that reason, and the gate's gradient comes out of the branches' dq kernels.

One autograd function runs the whole core, so its backward can share work between branches that separate
functions could not: the branch kernels take the gated sum's gradient ``do`` as it is and scale their
probabilities by their gate instead (``flash._gated``), so the three ``[b, t, hq, dv]`` branch output gradients
are never stored and each branch's ``delta = rowsum(o_i * do)`` is the gate's own gradient, which that branch's
dq kernel computes from the ``do`` rows it loads anyway (the separate pass over the outputs and ``do`` it replaces
took 1.4 ms at 64k on an H100; the backward became 0.6 ms faster); and the three branches add their dq into one
buffer (no separate additions of three ``[b, t, hq, dk]`` gradients).

At G >= 16 the window kernels also attend to the selected branch's forced blocks (forced.py), once per tile of
positions instead of once per position in the L2-bound selected loops, which then walk only the chosen blocks.
"""
from __future__ import annotations

import torch

from .config import NSAConfig
from .flash import NO_WINDOW, _Launch, masked_backward, masked_dkdv, masked_forward
from .forced import forced_constants, window_forced_dq, window_forced_forward
from .reference import NSAOutput
from .select import _SelLaunch, selected_backward, selected_forward
from .topn import select_blocks
from .varlen import max_seqlen


class NSACore(torch.autograd.Function):
    """``(o [b, t, hq, dv], indices [b, t, hkv, n])`` from q, the compressed K/V, the selected and window K/V and
    the gate (the arguments of :func:`nsa_triton`); gradients for all of them, none for the indices."""

    @staticmethod
    def forward(ctx, q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, config: NSAConfig, scale: float, cu_seqlens,
                cmp_cu_seqlens, max_t):
        q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate = (x.contiguous() for x in (q, kc, vc, k_slc, v_slc, k_swa,
                                                                                   v_swa, gate))
        lens = None if max_t is None else (max_t, config.num_compressed(max_t))
        L_cmp = _Launch(q, kc, vc, config.compress_stride, config.compress_block - 1, NO_WINDOW, cu_seqlens,
                        cmp_cu_seqlens, lens)
        o_cmp, lse_cmp = masked_forward(q, kc, vc, scale, L_cmp)
        indices = select_blocks(q, kc, lse_cmp, config, scale, cu_seqlens, cmp_cu_seqlens, max_t)
        L_swa = _Launch(q, k_swa, v_swa, 1, 0, config.window, cu_seqlens, cu_seqlens,
                        None if max_t is None else (max_t, max_t))
        L_slc = _SelLaunch(q, k_slc, v_slc, indices, config.select_block, cu_seqlens, max_t,
                           forced=forced_constants(config, L_swa))
        partial = None
        if L_slc.forced is not None:  # the window kernel also attends to the selected branch's forced blocks
            o_swa, lse_swa, *partial = window_forced_forward(q, k_swa, v_swa, k_slc, v_slc, scale, L_swa,
                                                             L_slc.forced)
        else:
            o_swa, lse_swa = masked_forward(q, k_swa, v_swa, scale, L_swa)
        # the selected branch last: its epilogue also writes the gated sum of the three (no gate pass)
        o_slc, lse_slc, o = selected_forward(q, k_slc, v_slc, indices, L_slc, scale, gated_sum=(o_cmp, o_swa, gate),
                                             partial=partial)
        ctx.save_for_backward(q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, indices, o_cmp, o_slc, o_swa, lse_cmp,
                              lse_slc, lse_swa)
        ctx.launches, ctx.scale = (L_cmp, L_slc, L_swa), scale
        ctx.mark_non_differentiable(indices)
        return o, indices

    @staticmethod
    def backward(ctx, do, _):
        (q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, indices, o_cmp, o_slc, o_swa, lse_cmp, lse_slc,
         lse_swa) = ctx.saved_tensors
        L_cmp, L_slc, L_swa = ctx.launches
        scale = ctx.scale
        do = do.contiguous()
        # each branch's dq kernel writes its delta = rowsum(o_i * do) (the gate's gradient) into one plane
        deltas = torch.empty(3, *gate.shape[:-1], device=gate.device, dtype=torch.float32)
        delta_cmp, delta_slc, delta_swa = deltas.unbind(0)
        g_cmp, g_slc, g_swa = gate.float().permute(3, 0, 1, 2).contiguous().unbind(0)
        if L_slc.forced is not None:  # the window's dq kernel also does the selected branch's forced blocks
            dq = window_forced_dq(q, k_swa, v_swa, k_slc, v_slc, do, lse_swa, lse_slc, o_swa, o_slc, delta_swa,
                                  delta_slc, g_swa, g_slc, scale, L_swa, L_slc.forced)
            dk_swa, dv_swa = masked_dkdv(q, k_swa, v_swa, do, lse_swa, delta_swa, scale, L_swa, gate=g_swa)
            _, dk_slc, dv_slc = selected_backward(q, k_slc, v_slc, indices, do, lse_slc, delta_slc, L_slc, scale,
                                                  dq=dq, gate=g_slc)
        else:
            dq, dk_swa, dv_swa = masked_backward(q, k_swa, v_swa, do, lse_swa, delta_swa, scale, L_swa, gate=g_swa,
                                                 o=o_swa)
            _, dk_slc, dv_slc = selected_backward(q, k_slc, v_slc, indices, do, lse_slc, delta_slc, L_slc, scale,
                                                  dq=dq, gate=g_slc, o=o_slc)
        _, dkc, dvc = masked_backward(q, kc, vc, do, lse_cmp, delta_cmp, scale, L_cmp, dq=dq, gate=g_cmp, o=o_cmp)
        dgate = deltas.permute(1, 2, 3, 0)
        return (dq, dkc, dvc, dk_slc.to(k_slc.dtype), dv_slc.to(v_slc.dtype), dk_swa, dv_swa,
                dgate.to(gate.dtype), None, None, None, None, None)


def nsa_triton(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config: NSAConfig, scale: float,
               cu_seqlens=None, cmp_cu_seqlens=None) -> NSAOutput:
    # packed batches: the longest sequence sizes every grid, taken once here for every kernel (it also has the most
    # compressed tokens; cu_seqlens' values are on the host already, read by the input check)
    max_t = max_seqlen(cu_seqlens) if cu_seqlens is not None else None
    o, indices = NSACore.apply(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config, scale, cu_seqlens,
                               cmp_cu_seqlens, max_t)
    return NSAOutput(o, indices)
