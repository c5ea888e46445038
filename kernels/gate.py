"""Gated combination of the three branch outputs, fused in Triton: one read of each output, one write.

In PyTorch the same op makes fp32 temporaries of every ``[b, t, hq, dv]`` output in forward and again in backward;
fused it is a single memory-bound pass each way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_sum(OC, o_slc, OW, GATE, r, rv, off, m):
    """The NSA output ``g_cmp o_cmp + g_slc o_slc + g_swa o_swa`` (fp32) of rows ``r`` (gate rows ``[.., 3]``,
    element offsets ``off``), with o_slc given as an fp32 tile: one arithmetic for the gate pass here and for the
    selected forward, which does this pass in its epilogue (``select.selected_forward(gated_sum=...)``)."""
    g0 = tl.load(GATE + r * 3, mask=rv, other=0.0).to(tl.float32)
    g1 = tl.load(GATE + r * 3 + 1, mask=rv, other=0.0).to(tl.float32)
    g2 = tl.load(GATE + r * 3 + 2, mask=rv, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * o_slc
    o += g2[:, None] * tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
    return o


@triton.jit
def _gate_fwd(OC, OS, OW, GATE, O, R, DV: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BDV)
    rv = r < R
    m = rv[:, None] & (d[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + d[None, :]
    o = _gated_sum(OC, tl.load(OS + off, mask=m, other=0.0).to(tl.float32), OW, GATE, r, rv, off, m)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd_branch(O, GATE, do, DOB, DGATE, r, rv, off, m, i: tl.constexpr):
    """One branch: its output gradient ``g_i * do`` and the gate's gradient ``rowsum(do * o_i)``."""
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GATE + r * 3 + i, mask=rv, other=0.0).to(tl.float32)
    tl.store(DOB + off, (g[:, None] * do).to(DOB.dtype.element_ty), mask=m)
    tl.store(DGATE + r * 3 + i, tl.sum(do * o, 1), mask=rv)


@triton.jit
def _gate_bwd(OC, OS, OW, GATE, DO, DOC, DOS, DOW, DGATE, R, DV: tl.constexpr, BR: tl.constexpr,
              BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BDV)
    rv = r < R
    m = rv[:, None] & (d[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    _gate_bwd_branch(OC, GATE, do, DOC, DGATE, r, rv, off, m, 0)
    _gate_bwd_branch(OS, GATE, do, DOS, DGATE, r, rv, off, m, 1)
    _gate_bwd_branch(OW, GATE, do, DOW, DGATE, r, rv, off, m, 2)


def _launch(dv: int, rows: int):
    bdv = max(16, triton.next_power_of_2(dv))
    br = max(1, 4096 // bdv)
    return (triton.cdiv(rows, br),), dict(DV=dv, BR=br, BDV=bdv)


def gate_forward(o_cmp, o_slc, o_swa, gate):
    """The gated sum of contiguous branch outputs (no autograd)."""
    dv = o_cmp.shape[-1]
    rows = o_cmp.numel() // dv
    o = torch.empty_like(o_cmp)
    grid, const = _launch(dv, rows)
    _gate_fwd[grid](o_cmp, o_slc, o_swa, gate, o, rows, **const)
    return o


def gate_backward(o_cmp, o_slc, o_swa, gate, do):
    """``(do_cmp, do_slc, do_swa, dgate fp32)`` of contiguous branch outputs. (The NSA core does not call this:
    its branch kernels take ``do`` and the gate, and their dq kernels compute the gate's gradient.)"""
    dv = o_cmp.shape[-1]
    rows = o_cmp.numel() // dv
    grid, const = _launch(dv, rows)
    do = do.contiguous()
    outs = [torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_swa)]
    dgate = torch.empty(gate.shape, device=gate.device, dtype=torch.float32)
    _gate_bwd[grid](o_cmp, o_slc, o_swa, gate, do, *outs, dgate, rows, **const)
    return (*outs, dgate)


class GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_swa, gate):
        o_cmp, o_slc, o_swa, gate = (x.contiguous() for x in (o_cmp, o_slc, o_swa, gate))
        ctx.save_for_backward(o_cmp, o_slc, o_swa, gate)
        return gate_forward(o_cmp, o_slc, o_swa, gate)

    @staticmethod
    def backward(ctx, do):
        o_cmp, o_slc, o_swa, gate = ctx.saved_tensors
        d_cmp, d_slc, d_swa, dgate = gate_backward(o_cmp, o_slc, o_swa, gate, do)
        return d_cmp, d_slc, d_swa, dgate.to(gate.dtype)


def gate_combine(o_cmp, o_slc, o_swa, gate):
    """``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` with gate ``[b, t, hq, 3]``, outputs ``[b, t, hq, dv]``."""
    return GateCombine.apply(o_cmp, o_slc, o_swa, gate)
