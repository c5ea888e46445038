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
def _gate_bwd_branch(O, GATE, do, DOB, DGATE, DELTA, r, rv, off, m, i: tl.constexpr, FUSED: tl.constexpr):
    """One branch: the gate's gradient ``rowsum(do * o_i)`` and the branch's output gradient ``g_i * do``: stored
    (``DOB``), or with ``FUSED`` only its softmax-backward term ``delta_i = rowsum(o_i * do_i)`` (from ``do_i`` in
    16 bits, as the branch kernels form it from ``do`` and the gate themselves), which saves writing three
    ``[b, t, hq, dv]`` gradients and each branch a separate pass over ``o_i`` and ``do_i``."""
    g = tl.load(GATE + r * 3 + i, mask=rv, other=0.0).to(tl.float32)
    dob = (g[:, None] * do).to(O.dtype.element_ty)
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DGATE + r * 3 + i, tl.sum(do * o, 1), mask=rv)
    if FUSED:
        tl.store(DELTA + r, tl.sum(o * dob.to(tl.float32), 1), mask=rv)
    else:
        tl.store(DOB + off, dob, mask=m)


@triton.jit
def _gate_bwd(OC, OS, OW, GATE, DO, DOC, DOS, DOW, DGATE, DC, DS, DW, R, DV: tl.constexpr, BR: tl.constexpr,
              BDV: tl.constexpr, FUSED: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BDV)
    rv = r < R
    m = rv[:, None] & (d[None, :] < DV)
    off = r.to(tl.int64)[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    _gate_bwd_branch(OC, GATE, do, DOC, DGATE, DC, r, rv, off, m, 0, FUSED)
    _gate_bwd_branch(OS, GATE, do, DOS, DGATE, DS, r, rv, off, m, 1, FUSED)
    _gate_bwd_branch(OW, GATE, do, DOW, DGATE, DW, r, rv, off, m, 2, FUSED)


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


def gate_backward(o_cmp, o_slc, o_swa, gate, do, fused: bool = False):
    """``(do_cmp, do_slc, do_swa, dgate fp32)``; with ``fused``, ``(dgate fp32, [delta_cmp, delta_slc, delta_swa])``
    instead, each ``delta = rowsum(o * gate_i * do)`` fp32 ``[b, t, hq]``, for branch kernels that form their
    output gradient from ``do`` and the gate themselves (``gate=`` of :func:`flash.masked_backward`)."""
    dv = o_cmp.shape[-1]
    rows = o_cmp.numel() // dv
    dgate = torch.empty(gate.shape, device=gate.device, dtype=torch.float32)
    if fused:
        outs = [dgate] * 3  # not written
        deltas = [torch.empty(o_cmp.shape[:-1], device=gate.device, dtype=torch.float32) for _ in range(3)]
    else:
        outs = [torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_swa)]
        deltas = [dgate] * 3  # not written
    grid, const = _launch(dv, rows)
    _gate_bwd[grid](o_cmp, o_slc, o_swa, gate, do.contiguous(), *outs, dgate, *deltas, rows, **const, FUSED=fused)
    return (dgate, deltas) if fused else (*outs, dgate)


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
