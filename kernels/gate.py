"""Gated combination of the three branch outputs, fused in Triton: one read of each output, one write.

In PyTorch the same op makes fp32 temporaries of every ``[b, t, hq, dv]`` output in forward and again in backward;
fused it is a single memory-bound pass each way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_fwd(OC, OS, OW, GATE, O, R, DV: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BDV)
    rv = r < R
    m = rv[:, None] & (d[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + d[None, :]
    g0 = tl.load(GATE + r * 3, mask=rv, other=0.0).to(tl.float32)
    g1 = tl.load(GATE + r * 3 + 1, mask=rv, other=0.0).to(tl.float32)
    g2 = tl.load(GATE + r * 3 + 2, mask=rv, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * tl.load(OS + off, mask=m, other=0.0).to(tl.float32)
    o += g2[:, None] * tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd(OC, OS, OW, GATE, DO, DOC, DOS, DOW, DGATE, R, DV: tl.constexpr, BR: tl.constexpr,
              BDV: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BDV)
    rv = r < R
    m = rv[:, None] & (d[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GATE + r * 3, mask=rv, other=0.0).to(tl.float32)
    tl.store(DOC + off, (g[:, None] * do).to(DOC.dtype.element_ty), mask=m)
    tl.store(DGATE + r * 3, tl.sum(do * tl.load(OC + off, mask=m, other=0.0).to(tl.float32), 1), mask=rv)
    g = tl.load(GATE + r * 3 + 1, mask=rv, other=0.0).to(tl.float32)
    tl.store(DOS + off, (g[:, None] * do).to(DOS.dtype.element_ty), mask=m)
    tl.store(DGATE + r * 3 + 1, tl.sum(do * tl.load(OS + off, mask=m, other=0.0).to(tl.float32), 1), mask=rv)
    g = tl.load(GATE + r * 3 + 2, mask=rv, other=0.0).to(tl.float32)
    tl.store(DOW + off, (g[:, None] * do).to(DOW.dtype.element_ty), mask=m)
    tl.store(DGATE + r * 3 + 2, tl.sum(do * tl.load(OW + off, mask=m, other=0.0).to(tl.float32), 1), mask=rv)


def _launch(dv: int, rows: int):
    bdv = max(16, triton.next_power_of_2(dv))
    br = max(1, 4096 // bdv)
    return (triton.cdiv(rows, br),), dict(DV=dv, BR=br, BDV=bdv)


class GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_swa, gate):
        o_cmp, o_slc, o_swa, gate = (x.contiguous() for x in (o_cmp, o_slc, o_swa, gate))
        dv = o_cmp.shape[-1]
        rows = o_cmp.numel() // dv
        o = torch.empty_like(o_cmp)
        grid, const = _launch(dv, rows)
        _gate_fwd[grid](o_cmp, o_slc, o_swa, gate, o, rows, **const)
        ctx.save_for_backward(o_cmp, o_slc, o_swa, gate)
        return o

    @staticmethod
    def backward(ctx, do):
        o_cmp, o_slc, o_swa, gate = ctx.saved_tensors
        dv = o_cmp.shape[-1]
        rows = o_cmp.numel() // dv
        d_cmp, d_slc, d_swa = torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_swa)
        dgate = torch.empty(gate.shape, device=gate.device, dtype=torch.float32)
        grid, const = _launch(dv, rows)
        _gate_bwd[grid](o_cmp, o_slc, o_swa, gate, do.contiguous(), d_cmp, d_slc, d_swa, dgate, rows, **const)
        return d_cmp, d_slc, d_swa, dgate.to(gate.dtype)


def gate_combine(o_cmp, o_slc, o_swa, gate):
    """``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` with gate ``[b, t, hq, 3]``, outputs ``[b, t, hq, dv]``."""
    return GateCombine.apply(o_cmp, o_slc, o_swa, gate)
