"""Compressed branch in Triton: attention over the compressed tokens, and the selection scores it yields.

The attention itself is :func:`flash.position_masked_attention` with key positions ``i*d + l - 1``. The scores
kernel recomputes each probability from the saved log-sum-exp, sums the GQA group's heads (eq. 10) and maps
compressed blocks onto selection blocks by slot overlap (eq. 9, see docs/algorithm.md) in registers, so no
``[t, t/d]`` tensor is ever stored: only the ``[b, t, hkv, t/l']`` block scores that top-n reads.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import NSAConfig
from .flash import NO_WINDOW, _rows, _seq_bounds, _tiles, position_masked_attention


def compressed_attention(q, k_cmp, v_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None):
    """``(o [b, t, hq, dv], lse [b, t, hq])`` over compressed tokens ``k_cmp``/``v_cmp`` ``[b, tc, hkv, d]``."""
    return position_masked_attention(q, k_cmp, v_cmp, scale, config.compress_stride, config.compress_block - 1,
                                     NO_WINDOW, cu_seqlens, cmp_cu_seqlens)


@triton.jit
def _scores_kernel(Q, KC, LSE, SC, CU, CU_K, T_FIXED, TK_FIXED, NS, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   DK: tl.constexpr, BDK: tl.constexpr, BLOCK_T: tl.constexpr, BC: tl.constexpr,
                   BJV: tl.constexpr, BJP: tl.constexpr, S: tl.constexpr, A: tl.constexpr,
                   KSTRIDE: tl.constexpr, KOFF: tl.constexpr, SEL_BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    pid_t = tl.program_id(0)
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    bos, T, kbos, TK = _seq_bounds(seq, CU, CU_K, T_FIXED, TK_FIXED, VARLEN)
    t0 = pid_t * BLOCK_T
    if t0 >= T:
        return
    tq, hq, hvalid = _rows(t0, kvh, BLOCK_T, G, GP)
    rvalid = hvalid & (tq < T)
    dk = tl.arange(0, BDK)
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q = tl.load(Q + row_off[:, None] * DK + dk[None, :], mask=rvalid[:, None] & (dk[None, :] < DK), other=0.0)
    lse = tl.load(LSE + row_off, mask=rvalid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634
    t_hi = tl.minimum(t0 + BLOCK_T, T) - 1
    n_blocks = t_hi // SEL_BLOCK + 1  # blocks that start at or before the last query of the tile
    tpos = t0 + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BC)
    jj = tl.arange(0, BJP)
    for j0 in range(0, n_blocks, BJV):
        # BC compressed blocks starting A-1 before the tile's first slot cover BJV selection blocks whole
        ci = j0 * S - (A - 1) + c
        cvalid = (ci >= 0) & (ci < TK)
        kc = tl.load(KC + ((kbos + ci.to(tl.int64)) * HKV + kvh)[:, None] * DK + dk[None, :],
                     mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
        s = tl.dot(q, tl.trans(kc)) * qk_scale
        vis = cvalid[None, :] & ((ci * KSTRIDE + KOFF)[None, :] <= tq[:, None]) & rvalid[:, None]
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        # eq. 9 as a matrix: w[i, j] = stride slots shared by compressed block i and selection block j
        j = j0 + jj
        lo = tl.maximum(ci[:, None], j[None, :] * S)
        hi = tl.minimum(ci[:, None] + A, (j[None, :] + 1) * S)
        w = tl.where((jj[None, :] < BJV) & (hi > lo), hi - lo, 0).to(tl.float32)
        blk = tl.dot(p, w, input_precision="ieee")  # [rows, BJP]; exact fp32 so rankings match the reference
        blk = tl.sum(tl.reshape(blk, [BLOCK_T, GP, BJP]), axis=1)  # eq. 10: sum the group's heads
        out = SC + ((bos + tpos.to(tl.int64)) * HKV + kvh)[:, None] * NS + j[None, :]
        tl.store(out, blk, mask=(tpos < T)[:, None] & (jj < BJV)[None, :] & (j < NS)[None, :])


def selection_scores(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None):
    """Block importance ``[b, t, hkv, ns_max]`` fp32 (entries of blocks after a query's own are undefined)."""
    b, t, hq, dk = q.shape
    hkv = k_cmp.shape[2]
    g = hq // hkv
    s = config.stride_slots_per_select_block
    a = config.stride_slots_per_compress_block
    bc = max(64, triton.next_power_of_2(s + a - 1))  # compressed blocks per tile
    bjv = (bc - (a - 1)) // s                          # selection blocks each tile covers whole
    bdk = max(16, triton.next_power_of_2(dk))
    varlen = cu_seqlens is not None
    max_t = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if varlen else t
    ns = config.num_select_blocks(max_t)
    gp, block_t = _tiles(g, 64)
    scores = torch.empty(b, t, hkv, ns, device=q.device, dtype=torch.float32)
    nseq = cu_seqlens.numel() - 1 if varlen else b
    dummy = q.new_zeros(1, dtype=torch.int32)
    _scores_kernel[(triton.cdiv(max_t, block_t), nseq * hkv)](
        q.contiguous(), k_cmp.contiguous(), lse_cmp, scores, cu_seqlens if varlen else dummy,
        cmp_cu_seqlens if varlen else dummy, t, k_cmp.shape[1], ns, scale,
        HQ=hq, HKV=hkv, G=g, GP=gp, DK=dk, BDK=bdk, BLOCK_T=block_t, BC=bc, BJV=bjv,
        BJP=max(16, triton.next_power_of_2(bjv)), S=s, A=a, KSTRIDE=config.compress_stride,
        KOFF=config.compress_block - 1, SEL_BLOCK=config.select_block, VARLEN=varlen,
        num_stages=1 if bdk > 128 or q.dtype == torch.float32 else 2)
    return scores
