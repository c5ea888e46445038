"""Position-masked flash attention in Triton, shared by the compressed and the sliding-window branches.

Key ``j`` has position ``j * KSTRIDE + KOFF``; query ``t`` sees it iff ``t - WINDOW < pos <= t``.
Compressed branch: ``KSTRIDE = d``, ``KOFF = l - 1`` (a block is visible once it has ended), no window.
Window branch: ``KSTRIDE = 1``, ``KOFF = 0``, ``WINDOW = w``.
Queries that start later than the keys (a context-parallel chunk at global offset ``o`` against keys from
position 0, or a window chunk behind a halo of ``o`` keys) shift the key positions into the queries' frame:
``KOFF - o``, a runtime integer (negative then), so one compiled kernel serves every offset.

Group-centric tiles: a program owns ``BLOCK_T`` query positions of one KV head and all ``G`` query heads of that
group (rows = positions x heads), so each K/V tile is loaded once for the whole group and the matrix tiles stay
full even for G = 1 or G = 64. Inputs ``[b, t, h, d]`` (or packed ``[1, total, h, d]`` + cu_seqlens), fp32 softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .varlen import max_seqlen

NO_WINDOW = 1 << 30  # "no window"; keeps t - WINDOW inside int32


@triton.jit
def _seq_bounds(seq, CU, CU_K, T_FIXED, TK_FIXED, VARLEN: tl.constexpr):
    if VARLEN:
        bos = tl.load(CU + seq).to(tl.int64)
        T = (tl.load(CU + seq + 1) - bos).to(tl.int32)
        kbos = tl.load(CU_K + seq).to(tl.int64)
        TK = (tl.load(CU_K + seq + 1) - kbos).to(tl.int32)
        return bos, T, kbos, TK
    else:
        return seq.to(tl.int64) * T_FIXED, T_FIXED, seq.to(tl.int64) * TK_FIXED, TK_FIXED


@triton.jit
def _rows(t0, kvh, BLOCK_T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr):
    r = tl.arange(0, BLOCK_T * GP)
    tq = t0 + r // GP
    hg = r % GP
    return tq, kvh * G + hg, hg < G


@triton.jit
def _load_tile(PTR, row_off, rvalid, D: tl.constexpr, BD: tl.constexpr):
    """Rows ``row_off`` of a ``[..., D]`` tensor, zero-padded to ``BD`` columns and for rows not in ``rvalid``."""
    d = tl.arange(0, BD)
    return tl.load(PTR + row_off[:, None] * D + d[None, :], mask=rvalid[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _tile_start(CU, CU_K, T_FIXED, TK_FIXED, HKV: tl.constexpr, BLOCK_T: tl.constexpr, VARLEN: tl.constexpr):
    """A query-major program's sequence bounds ``(bos, T, kbos, TK)``, KV head and first position: grid
    ``(positions / BLOCK_T, sequences * HKV)``."""
    kvh = tl.program_id(1) % HKV
    bos, T, kbos, TK = _seq_bounds(tl.program_id(1) // HKV, CU, CU_K, T_FIXED, TK_FIXED, VARLEN)
    return bos, T, kbos, TK, kvh, tl.program_id(0) * BLOCK_T


@triton.jit
def _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr,
            GP: tl.constexpr, VARLEN: tl.constexpr):
    """The program's sequence bounds and its query rows (BLOCK_T positions x the G heads of one KV head)."""
    bos, T, kbos, TK, kvh, t0 = _tile_start(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, VARLEN)
    tq, hq, hvalid = _rows(t0, kvh, BLOCK_T, G, GP)
    return bos, T, kbos, TK, kvh, t0, tq, hq, hvalid & (tq < T)


@triton.jit
def _key_range(t0, T, TK, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF,
               WINDOW: tl.constexpr):
    """Keys that some query of ``[t0, t0 + BLOCK_T)`` may see: ``[j_lo, j_hi)``, j_lo aligned to BLOCK_N."""
    t_hi = tl.minimum(t0 + BLOCK_T, T) - 1
    j_hi = tl.minimum(TK, (t_hi - KOFF) // KSTRIDE + 1)
    j_lo = tl.maximum(0, (t0 - WINDOW + 1 - KOFF + KSTRIDE - 1) // KSTRIDE)
    return (j_lo // BLOCK_N) * BLOCK_N, j_hi


@triton.jit
def _load_lse2(LSE, row_off, rvalid):
    """Saved log-sum-exp in log2 units for recomputing probabilities; rows that saw no key (lse = -inf) and
    padding rows become +inf, so every probability recomputed from them is exactly 0."""
    lse = tl.load(LSE + row_off, mask=rvalid, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
              BDV: tl.constexpr, GATE, GATED: tl.constexpr, FULL: tl.constexpr = False):
    """What a softmax backward needs of its query rows: q, dO, lse (log2 units, as ``_load_lse2``), delta and, with
    ``GATED``, the rows' gate from a contiguous fp32 ``[b, t, hq]`` plane (see ``_gated``; else a stand-in nothing
    reads). A plane, not the ``[..., 3]`` gate column: a strided 16-bit load is not async-copied, and inside the
    dK/dV loops that cost 4 ms at 64k (H100).

    ``FULL``: every row is there and saw a key (the dK/dV loops' unmasked query tiles at G = GP), so no masks and
    no lse = -inf fix-up. Inside the dK/dV loops each thread repeats the per-row work for every row it holds:
    without it the unmasked step is ~15% fewer instructions (sm_90 SASS)."""
    if FULL:
        delta = tl.load(DELTA + row_off)
        g = delta
        if GATED:
            g = tl.load(GATE + row_off)
        return (_load_rows(Q, row_off, DK, BDK), _load_rows(DO, row_off, DV, BDV),
                tl.load(LSE + row_off) * 1.4426950408889634, delta, g)
    delta = tl.load(DELTA + row_off, mask=rvalid, other=0.0)
    g = delta
    if GATED:
        g = tl.load(GATE + row_off, mask=rvalid, other=0.0)
    return (_load_tile(Q, row_off, rvalid, DK, BDK), _load_tile(DO, row_off, rvalid, DV, BDV),
            _load_lse2(LSE, row_off, rvalid), delta, g)


@triton.jit
def _load_rows(PTR, row_off, D: tl.constexpr, BD: tl.constexpr):
    """``_load_tile`` of rows that are all there: masked only on the columns, where ``BD`` pads ``D``."""
    d = tl.arange(0, BD)
    if D == BD:
        return tl.load(PTR + row_off[:, None] * D + d[None, :])
    return tl.load(PTR + row_off[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0)


@triton.jit
def _own_delta(O, DELTA, do, row_off, rvalid, DV: tl.constexpr, BDV: tl.constexpr):
    """``delta = rowsum(o * do)`` of the rows from the branch output ``O``, stored to ``DELTA`` for the dK/dV pass
    that follows: a dq kernel holds ``do`` already, so this replaces a pass of its own over ``o`` and ``do`` (in the
    NSA core, ``DELTA`` is also the gate's gradient plane)."""
    o = _load_tile(O, row_off, rvalid, DV, BDV).to(tl.float32)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + row_off, delta, mask=rvalid)
    return delta


@triton.jit
def _gated(p, g, GATED: tl.constexpr):
    """``p * g`` with ``GATED`` (``g`` broadcast to ``p`` by the caller: ``g[:, None]`` for row-major tiles,
    ``g[None, :]`` for the transposed dK/dV tiles), else ``p``.

    ``GATED``: ``DO`` is the gated sum's gradient ``do`` and the branch's output gradient is ``g * do``.
    Scaling the probabilities instead (``p' = g p``; dV = p'^T do, dS = p' (do.v - rowsum(o * do))) gives the same
    gradients with ``do`` loaded as it is (a tile computed from it would no longer be an async-copied operand:
    2x slower dK/dV, measured) and delta = rowsum(o * do), which the gate's backward computes anyway."""
    if GATED:
        p = p * g
    return p


@triton.jit
def _store_tile(PTR, row_off, rvalid, x, D: tl.constexpr, BD: tl.constexpr):
    """Rows ``row_off`` of a ``[..., D]`` tensor from a ``[rows, BD]`` fp32 tile (cast to the tensor's dtype)."""
    d = tl.arange(0, BD)
    tl.store(PTR + row_off[:, None] * D + d[None, :], x.to(PTR.dtype.element_ty),
             mask=rvalid[:, None] & (d[None, :] < D))


@triton.jit
def _store_grad_tile(PTR, row_off, rvalid, x, D: tl.constexpr, BD: tl.constexpr, ADD: tl.constexpr):
    """``_store_tile``, or with ``ADD`` add the tile onto what the tensor holds (the NSA core sums its three
    branches' dq in one buffer this way, instead of autograd's separate additions)."""
    if ADD:
        x += _load_tile(PTR, row_off, rvalid, D, BD).to(tl.float32)
    _store_tile(PTR, row_off, rvalid, x, D, BD)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, qk_scale):
    """One online-softmax update with raw scores ``s = q.k`` (-inf where masked), ``qk_scale`` = scale * log2(e)
    (> 0), and values ``v``. The row max is taken before scaling, so the scale and the max meet in one FMA per
    score (scaling first cost a multiply per score more: 64 of ~690 instructions per thread and step of the
    compressed forward, sm_90 SASS)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _finish(acc, m_i, l_i):
    """``(o, lse)`` from the running state; rows that saw no key get o = 0 and lse = -inf."""
    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
    return acc / safe_l[:, None], lse


@triton.jit
def _full_keys(t0, T, j_lo, j_hi, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF,
               WINDOW: tl.constexpr):
    """``[fa, fb)``: the key tiles inside ``[j_lo, j_hi)`` that every query of ``[t0, t0 + BLOCK_T)`` sees whole,
    so they need no mask (fb <= fa: none). Tiles before fa and from max(fa, fb) on are masked."""
    t_last = tl.minimum(t0 + BLOCK_T, T) - 1
    top = tl.where(t0 >= KOFF, (t0 - KOFF) // KSTRIDE + 1, 0)  # keys at or before the first query
    num = t_last - WINDOW - KOFF
    bot = tl.where(num >= 0, num // KSTRIDE + 1, 0)  # keys inside the last query's window
    fa = tl.minimum(j_lo + (tl.maximum(bot - j_lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, j_hi)
    fb = j_lo + (tl.maximum(tl.minimum(top, j_hi) - j_lo, 0)) // BLOCK_N * BLOCK_N
    return fa, fb


@triton.jit
def _kv_tile(K, V, kbos, kvh, j0, j_hi, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
             BDV: tl.constexpr, BLOCK_N: tl.constexpr, KD, VD, TMA: tl.constexpr):
    """Keys ``j0 .. j0 + BLOCK_N`` (those below ``j_hi`` valid), their row offsets and their K/V tiles.

    ``TMA``: the tiles come from the descriptors ``KD``/``VD`` (see ``kv_descriptors``), which fill keys past the
    tensor's end and columns past DK/DV with zeros but read keys ``>= j_hi`` inside it (the next sequence of a
    packed batch) as they are: every caller masks those keys' scores, as it does for the zeros of pointer loads."""
    j = j0 + tl.arange(0, BLOCK_N)
    jvalid = j < j_hi
    kv_off = (kbos + j.to(tl.int64)) * HKV + kvh
    if TMA:
        row = (kbos + j0).to(tl.int32)
        return (j, jvalid, kv_off, KD.load([row, kvh, 0]).reshape(BLOCK_N, BDK),
                VD.load([row, kvh, 0]).reshape(BLOCK_N, BDV))
    return j, jvalid, kv_off, _load_tile(K, kv_off, jvalid, DK, BDK), _load_tile(V, kv_off, jvalid, DV, BDV)


@triton.jit
def _visible(kp, tq, WINDOW: tl.constexpr):
    """Whether keys at positions ``kp`` are visible to queries at ``tq`` (broadcast against each other: ``kp[None, :]``
    and ``tq[:, None]`` give ``[rows, keys]``, the transposed pair ``[keys, rows]``)."""
    return (kp <= tq) & (kp > tq - WINDOW)


@triton.jit
def _fwd_tiles(q, K, V, kbos, kvh, tq, j_start, j_end, j_hi, m_i, l_i, acc, qk_scale,
               HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
               BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, MASKED: tl.constexpr,
               KD, VD, TMA: tl.constexpr):
    for j0 in range(j_start, j_end, BLOCK_N):
        j, jvalid, _, k, v = _kv_tile(K, V, kbos, kvh, j0, j_hi, HKV, DK, DV, BDK, BDV, BLOCK_N, KD, VD, TMA)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            vis = _visible((j * KSTRIDE + KOFF)[None, :], tq[:, None], WINDOW) & jvalid[None, :]
            s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _attend(q, K, V, kbos, kvh, t0, T, TK, tq, qk_scale, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            BDK: tl.constexpr, BDV: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr,
            KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, KD, VD, TMA: tl.constexpr):
    """``(o, lse)`` of a query tile's rows ``q`` over the keys its positions ``tq`` see."""
    m_i = tl.full([BLOCK_T * GP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T * GP, BDV], dtype=tl.float32)
    j_lo, j_hi = _key_range(t0, T, TK, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    fa, fb = _full_keys(t0, T, j_lo, j_hi, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    # masked tiles at the window's far edge, unmasked ones in the middle, masked ones at the causal edge
    m_i, l_i, acc = _fwd_tiles(q, K, V, kbos, kvh, tq, j_lo, fa, j_hi, m_i, l_i, acc, qk_scale, HKV, DK, DV, BDK,
                               BDV, BLOCK_N, KSTRIDE, KOFF, WINDOW, True, KD, VD, TMA)
    m_i, l_i, acc = _fwd_tiles(q, K, V, kbos, kvh, tq, fa, fb, j_hi, m_i, l_i, acc, qk_scale, HKV, DK, DV, BDK,
                               BDV, BLOCK_N, KSTRIDE, KOFF, WINDOW, False, KD, VD, TMA)
    m_i, l_i, acc = _fwd_tiles(q, K, V, kbos, kvh, tq, tl.maximum(fa, fb), j_hi, j_hi, m_i, l_i, acc, qk_scale,
                               HKV, DK, DV, BDK, BDV, BLOCK_N, KSTRIDE, KOFF, WINDOW, True, KD, VD, TMA)
    return _finish(acc, m_i, l_i)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, CU_K, T_FIXED, TK_FIXED, scale,
                HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                KD=None, VD=None, TMA: tl.constexpr = False):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q = _load_tile(Q, row_off, rvalid, DK, BDK)
    o, lse = _attend(q, K, V, kbos, kvh, t0, T, TK, tq, scale * 1.4426950408889634, HKV, DK, DV, BDK, BDV, BLOCK_T,
                     GP, BLOCK_N, KSTRIDE, KOFF, WINDOW, KD, VD, TMA)
    _store_tile(O, row_off, rvalid, o, DV, BDV)
    tl.store(LSE + row_off, lse, mask=rvalid)


@triton.jit
def _dq_tiles(q, do, lse2, delta, dq, K, V, kbos, kvh, tq, j_start, j_end, j_hi, qk_scale,
              HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
              BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, MASKED: tl.constexpr,
              KD, VD, TMA: tl.constexpr, g=None, GATED: tl.constexpr = False):
    for j0 in range(j_start, j_end, BLOCK_N):
        j, jvalid, _, k, v = _kv_tile(K, V, kbos, kvh, j0, j_hi, HKV, DK, DV, BDK, BDV, BLOCK_N, KD, VD, TMA)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible((j * KSTRIDE + KOFF)[None, :], tq[:, None], WINDOW) & jvalid[None, :], p, 0.0)
        if GATED:  # a row gate of its own (the window kernel's forced selected blocks, forced.py)
            p = p * g[:, None]
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_sum(q, do, lse2, delta, K, V, kbos, kvh, t0, T, TK, tq, qk_scale, HKV: tl.constexpr, DK: tl.constexpr,
            DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr,
            BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, KD, VD, TMA: tl.constexpr):
    """A query tile's dq (before the softmax scale and the gate) over the keys its positions ``tq`` see."""
    dq = tl.zeros([BLOCK_T * GP, BDK], dtype=tl.float32)
    j_lo, j_hi = _key_range(t0, T, TK, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    fa, fb = _full_keys(t0, T, j_lo, j_hi, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    dq = _dq_tiles(q, do, lse2, delta, dq, K, V, kbos, kvh, tq, j_lo, fa, j_hi, qk_scale, HKV, DK, DV, BDK, BDV,
                   BLOCK_N, KSTRIDE, KOFF, WINDOW, True, KD, VD, TMA)
    dq = _dq_tiles(q, do, lse2, delta, dq, K, V, kbos, kvh, tq, fa, fb, j_hi, qk_scale, HKV, DK, DV, BDK, BDV,
                   BLOCK_N, KSTRIDE, KOFF, WINDOW, False, KD, VD, TMA)
    return _dq_tiles(q, do, lse2, delta, dq, K, V, kbos, kvh, tq, tl.maximum(fa, fb), j_hi, j_hi, qk_scale, HKV,
                     DK, DV, BDK, BDV, BLOCK_N, KSTRIDE, KOFF, WINDOW, True, KD, VD, TMA)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, CU_K, T_FIXED, TK_FIXED, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                   KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                   DQ_ADD: tl.constexpr = False, GATE=None, GATED: tl.constexpr = False, O=None,
                   DELTA_FROM_O: tl.constexpr = False, KD=None, VD=None, TMA: tl.constexpr = False):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, GATED)
    if DELTA_FROM_O:
        delta = _own_delta(O, DELTA, do, row_off, rvalid, DV, BDV)
    dq = _dq_sum(q, do, lse2, delta, K, V, kbos, kvh, t0, T, TK, tq, scale * 1.4426950408889634, HKV, DK, DV, BDK,
                 BDV, BLOCK_T, GP, BLOCK_N, KSTRIDE, KOFF, WINDOW, KD, VD, TMA)
    _store_grad_tile(DQ, row_off, rvalid, _gated(dq, g[:, None], GATED) * scale, DK, BDK, DQ_ADD)


@triton.jit
def _dkdv_tiles(Q, DO, LSE, DELTA, k, v, j, jvalid, dk_acc, dv_acc, bos, kvh, t_start, t_stop, t_end, qk_scale,
                HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BDK: tl.constexpr, BDV: tl.constexpr, BLOCK_T: tl.constexpr, KSTRIDE: tl.constexpr, KOFF,
                WINDOW: tl.constexpr, MASKED: tl.constexpr, GATE, GATED: tl.constexpr):
    # transposed products (keys as rows): p^T and dS^T come out of one product as the register operand of the
    # next, and K / V, the loop-invariant operands, stay in shared memory (q k^T with transposes of p and dS
    # re-stored K and V to shared memory every step)
    for t0 in range(t_start, t_stop, BLOCK_T):
        tq, hq, hvalid = _rows(t0, kvh, BLOCK_T, G, GP)
        rvalid = hvalid & (tq < t_end)
        row_off = (bos + tq.to(tl.int64)) * HQ + hq
        q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, GATED,
                                          (not MASKED) and G == GP)
        pT = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # [keys, rows]; padding rows: 0
        if MASKED:
            vis = _visible((j * KSTRIDE + KOFF)[:, None], tq[None, :], WINDOW) & jvalid[:, None]
            pT = tl.where(vis & rvalid[None, :], pT, 0.0)
        pT = _gated(pT, g[None, :], GATED)
        dv_acc += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk_acc += tl.dot(dsT.to(q.dtype), q)
    return dk_acc, dv_acc


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_, DV_, CU, CU_K, T_FIXED, TK_FIXED, scale,
                     HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                     DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                     KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                     Q_SPLIT: tl.constexpr, GATE=None, GATED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    bos, T, kbos, TK = _seq_bounds(seq, CU, CU_K, T_FIXED, TK_FIXED, VARLEN)
    j0 = pid_n * BLOCK_N
    if j0 >= TK:
        return
    j, jvalid, kv_off, k, v = _kv_tile(K, V, kbos, kvh, j0, TK, HKV, DK, DV, BDK, BDV, BLOCK_N, None, None, False)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    qk_scale = scale * 1.4426950408889634
    dk_acc = tl.zeros([BLOCK_N, BDK], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    t_lo = tl.maximum(j0 * KSTRIDE + KOFF, 0) // BLOCK_T * BLOCK_T
    t_end = tl.minimum(T, (tl.minimum(j0 + BLOCK_N, TK) - 1) * KSTRIDE + KOFF + WINDOW)
    if Q_SPLIT > 0:
        # Keys near the start are seen by every later query: split that range over programs (axis 2) so the
        # grid fills the GPU; the partial dK/dV tiles meet in fp32 by one atomic add each.
        c0 = tl.program_id(2) * Q_SPLIT
        t_lo = tl.maximum(t_lo, c0)
        t_end = tl.minimum(t_end, c0 + Q_SPLIT)
        if t_lo >= t_end:
            return
    # query tiles that see every key of this tile (unmasked): from the first at or after the last key's position
    # to the last that ends inside both the first key's window and t_end; none if the key tile is partial
    kp_max = (tl.minimum(j0 + BLOCK_N, TK) - 1) * KSTRIDE + KOFF
    ta = tl.minimum(t_lo + (tl.maximum(kp_max - t_lo, 0) + BLOCK_T - 1) // BLOCK_T * BLOCK_T, t_end)
    tb = t_lo + tl.maximum(tl.minimum(j0 * KSTRIDE + KOFF + WINDOW, t_end) - t_lo, 0) // BLOCK_T * BLOCK_T
    tb = tl.where(j0 + BLOCK_N <= TK, tb, ta)
    dk_acc, dv_acc = _dkdv_tiles(Q, DO, LSE, DELTA, k, v, j, jvalid, dk_acc, dv_acc, bos, kvh, t_lo, ta, t_end,
                                 qk_scale, HQ, G, GP, DK, DV, BDK, BDV, BLOCK_T, KSTRIDE, KOFF, WINDOW, True, GATE,
                                 GATED)
    dk_acc, dv_acc = _dkdv_tiles(Q, DO, LSE, DELTA, k, v, j, jvalid, dk_acc, dv_acc, bos, kvh, ta, tb, t_end,
                                 qk_scale, HQ, G, GP, DK, DV, BDK, BDV, BLOCK_T, KSTRIDE, KOFF, WINDOW, False, GATE,
                                 GATED)
    dk_acc, dv_acc = _dkdv_tiles(Q, DO, LSE, DELTA, k, v, j, jvalid, dk_acc, dv_acc, bos, kvh, tl.maximum(ta, tb),
                                 t_end, t_end, qk_scale, HQ, G, GP, DK, DV, BDK, BDV, BLOCK_T, KSTRIDE, KOFF, WINDOW,
                                 True, GATE, GATED)
    dk_mask = jvalid[:, None] & (dk[None, :] < DK)
    dv_mask = jvalid[:, None] & (dv[None, :] < DV)
    if Q_SPLIT > 0:
        tl.atomic_add(DK_ + kv_off[:, None] * DK + dk[None, :], dk_acc * scale, mask=dk_mask)
        tl.atomic_add(DV_ + kv_off[:, None] * DV + dv[None, :], dv_acc, mask=dv_mask)
    else:
        tl.store(DK_ + kv_off[:, None] * DK + dk[None, :], (dk_acc * scale).to(DK_.dtype.element_ty), mask=dk_mask)
        tl.store(DV_ + kv_off[:, None] * DV + dv[None, :], dv_acc.to(DV_.dtype.element_ty), mask=dv_mask)


@triton.jit
def _row_dot_kernel(O, DO, DELTA, ROWS, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    mask = (r < ROWS)[:, None] & (d < D)[None, :]
    off = r.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < ROWS)


def row_dot(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(o * do)`` in fp32 (the softmax backward's D term), ``[..., d] -> [...]``.

    One pass over the 16-bit tensors: ``(o.float() * do.float()).sum(-1)`` moves ~7x their size through fp32
    temporaries, ~5 ms per branch at 64k on an H100."""
    o, do = o.contiguous(), do.contiguous()
    d = o.shape[-1]
    rows = o.numel() // max(d, 1)
    delta = torch.empty(o.shape[:-1], device=o.device, dtype=torch.float32)
    bd = max(16, triton.next_power_of_2(d))
    br = max(1, 8192 // bd)
    _row_dot_kernel[(triton.cdiv(rows, br),)](o, do, delta, rows, D=d, BD=bd, BR=br)
    return delta


WIDE_STAGES = 2  # pipeline stages of 256-wide tiles (head dims above 128) where shared memory allows


def wide_tile_stages(q: torch.Tensor, bdk: int, bdv: int, stages: int) -> int:
    """Pipeline stages for 256-wide tiles (padded head dims ``bdk``, ``bdv``): ``stages`` where measured to fit
    (bf16/fp16 on a GPU, one of the two dims at most 128: 192/128 on an H100, benchmarks/wide_tiles.py), else 1
    (both dims 256 wide, or fp32: not measured)."""
    return stages if q.is_cuda and q.dtype != torch.float32 and bdk + bdv <= 384 else 1


def choose_q_split(max_t: int, key_programs: int, window: int) -> int:
    """Query positions per dK/dV program (0 = all): split when few key tiles each see very many queries
    (the compressed branch), so that the grid fills the GPU."""
    if window < max_t or key_programs >= 1024 or max_t <= 2048:
        return 0
    return max(2048, triton.next_power_of_2(triton.cdiv(max_t * key_programs, 4096)))


def _tiles(g: int, block_m: int = 64):
    gp = triton.next_power_of_2(g)
    block_t = max(1, block_m // gp)
    return gp, block_t


# (rows = positions x heads, keys, warps, stages) of the compressed branch's forward and dq kernels, H100 at 64k,
# G=16, d=128 (benchmarks/tile_sweep.py): forward 10.0 ms against 10.3 with 2 stages and 10.8 with the shared
# 64 x 64 / 4 warps / 2 stages, dq 11.8 against 12.6
COMPRESSED_FWD_TILES = (128, 128, 8, 3)
COMPRESSED_DQ_TILES = (128, 64, 8, 3)
# dK/dV's (rows, keys, warps, stages) at G >= 16, d <= 128, both branches (H100 at 64k, benchmarks/tile_sweep.py):
# compressed 16.9 ms against 19.0 with the 64 x 64 / 4 warps / 2 stages, window 6.0 against 7.5
DKDV_TILES = (64, 128, 8, 3)
# the smallest padded group (GP) that takes the tiles above (the same rows: 128 / GP positions a tile); smaller groups
# keep the shared 64-row tiles. G = 4 (32 / 8 heads, H100 at 64k, `benchmarks/switch_ab.py --switch
# flash.TUNED_MIN_GP --values 16 4 --heads 32 --kv-heads 8`): compressed forward 6.66 -> 5.82 ms, core forward
# 24.2 -> 23.4 (docs/benchmarks.md, twenty-fifth session)
TUNED_MIN_GP = 4


def tuned_shape(gp: int, dk: int, dv: int) -> bool:
    """Whether the measured tiles above fit: groups of ``TUNED_MIN_GP`` (padded) heads or more, head dims up to 128."""
    return gp >= TUNED_MIN_GP and max(dk, dv) <= 128


def tuned_tiles(gp: int, dk: int, dv: int, q: torch.Tensor) -> bool:
    """Whether a launch takes the measured tiles above: :func:`tuned_shape`, 16-bit inputs on a GPU (the CPU tests
    switch the GPU part off to run those tiles through the interpreter)."""
    return tuned_shape(gp, dk, dv) and q.is_cuda and q.dtype != torch.float32


USE_TMA = True  # K/V tiles of the query-major kernels by TMA where ``tma_ok`` allows (False: pointer loads)
# which query-major kernels take their K/V tiles by TMA. The dK/dV kernel's q/dO rows by TMA ([BLOCK_T, GP, d]
# boxes) measured no faster (H100, 64k, benchmarks/tma_ab.py run 3) and were left out
TMA_KERNELS = frozenset({"fwd", "dq"})


def tma_ok(*xs: torch.Tensor) -> bool:
    """Whether TMA descriptors can serve tensors ``xs`` (``[..., h, d]``): Hopper or newer (or the interpreter),
    contiguous, 16-byte aligned base and rows (TMA's requirement), not empty; else the kernels load by pointers."""
    if not USE_TMA or any(x.numel() == 0 or not x.is_contiguous() for x in xs):
        return False
    if xs[0].is_cuda and torch.cuda.get_device_capability(xs[0].device)[0] < 9:
        return False
    return all(x.data_ptr() % 16 == 0 and x.shape[-1] * x.element_size() % 16 == 0 for x in xs)


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, const: dict) -> dict:
    """Kernel arguments ``KD``, ``VD``, ``TMA``: descriptors of K and V as ``[rows, h, d]`` (batch and sequence
    flattened, so packed and fixed-length batches address a key the same way, ``kbos + j``) with
    ``[BLOCK_N, 1, BD]`` boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return dict(KD=TensorDescriptor.from_tensor(k.view(-1, *k.shape[-2:]), [const["BLOCK_N"], 1, const["BDK"]]),
                VD=TensorDescriptor.from_tensor(v.view(-1, *v.shape[-2:]), [const["BLOCK_N"], 1, const["BDV"]]),
                TMA=True)


class _Launch:
    """Shapes, grids and compile-time constants of one call's three kernels: ``fwd``, ``dq`` and ``dkdv`` are each
    (grid, constants, launch options), with tiles of their own where measured faster; ``dkdv_tiles`` =
    (rows, keys, warps, stages) overrides dK/dV's (benchmarks)."""

    def __init__(self, q, k, v, kstride, koff, window, cu_seqlens, cu_seqlens_k, max_seqlens=None, block_m=64,
                 block_n=64, dkdv_tiles=None):
        b, t, hq, dk = q.shape
        _, tk, hkv, dv = v.shape
        self.stages = 2 if q.is_cuda else 1
        if max(dk, dv) > 128:  # 256-wide tiles: halve the key tile to fit shared memory
            block_n = 32
            # 2 stages: the compressed branch's fwd+bwd 147 -> 102 ms at 64k, dk/dv = 192/128 on an H100
            self.stages = wide_tile_stages(q, triton.next_power_of_2(dk), triton.next_power_of_2(dv), WIDE_STAGES)
        self.g = hq // hkv
        gp, block_t = _tiles(self.g, block_m)
        self.varlen = cu_seqlens is not None
        nseq = cu_seqlens.numel() - 1 if self.varlen else b
        if not self.varlen:
            max_t, max_tk = t, tk
        elif max_seqlens is not None:
            max_t, max_tk = max_seqlens
        else:
            max_t, max_tk = max_seqlen(cu_seqlens), (max_seqlen(cu_seqlens_k) if tk else 0)
        dummy = cu_seqlens if self.varlen else q.new_zeros(1, dtype=torch.int32)
        self.cu, self.cu_k = dummy, (cu_seqlens_k if self.varlen else dummy)
        self.t_fixed, self.tk_fixed = t, tk
        # K/V tiles by TMA (H100 at 64k): compressed forward 9.8 -> 8.7 ms, window 3.6 -> 3.3, NSA core fwd+bwd
        # ~1.5 ms faster (benchmarks/flash_fwd_variants.py, tma_ab.py; docs/benchmarks.md, fifteenth session)
        self.tma = {name: tma_ok(k, v) and name in TMA_KERNELS for name in ("fwd", "dq")}
        self.grid_q = (triton.cdiv(max_t, block_t), nseq * hkv)
        self.const = dict(HQ=hq, HKV=hkv, G=self.g, GP=gp, DK=dk, DV=dv, BDK=max(16, triton.next_power_of_2(dk)),
                          BDV=max(16, triton.next_power_of_2(dv)), BLOCK_T=block_t, BLOCK_N=block_n,
                          KSTRIDE=kstride, KOFF=koff, WINDOW=window, VARLEN=self.varlen)
        # tiles of their own where measured faster; the query-major kernels only in the compressed branch (no
        # window, many keys per query)
        tuned = tuned_tiles(gp, dk, dv, q)
        shared = (block_m, block_n, 4, self.stages)
        for name, tiles in (("fwd", COMPRESSED_FWD_TILES), ("dq", COMPRESSED_DQ_TILES)):
            if tuned and window == NO_WINDOW:
                const, opts = self._tiled(tiles)
                setattr(self, name, ((triton.cdiv(max_t, const["BLOCK_T"]), nseq * hkv), const, opts))
            else:
                setattr(self, name, (self.grid_q, self.const, dict(num_stages=self.stages)))
        const, opts = self._tiled(dkdv_tiles or (DKDV_TILES if tuned else shared))
        keys = const["BLOCK_N"]
        self.q_split = choose_q_split(max_t, triton.cdiv(max(max_tk, 1), keys) * nseq * hkv, window)
        n_chunks = triton.cdiv(max_t, self.q_split) if self.q_split else 1
        self.dkdv = ((triton.cdiv(max(max_tk, 1), keys), nseq * hkv, n_chunks), const, opts)

    def _tiled(self, tiles):
        """``(constants, launch options)`` for ``tiles = (rows, keys, warps, stages)``."""
        rows, keys, warps, stages = tiles
        return dict(self.const, BLOCK_T=_tiles(self.g, rows)[1], BLOCK_N=keys), dict(num_warps=warps,
                                                                                        num_stages=stages)

    def args(self):
        return (self.cu, self.cu_k, self.t_fixed, self.tk_fixed)

    def kv(self, name, k, v, const):
        """The K/V tile arguments of query-major kernel ``name`` launched with ``const``: TMA descriptors, or
        none."""
        return kv_descriptors(k, v, const) if self.tma[name] else {}


def masked_forward(q, k, v, scale: float, L: _Launch):
    """``(o, lse)`` of contiguous ``q, k, v`` (no autograd)."""
    b, t, hq, _ = q.shape
    o = torch.empty(b, t, hq, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(b, t, hq, device=q.device, dtype=torch.float32)
    grid, const, opts = L.fwd
    _fwd_kernel[grid](q, k, v, o, lse, *L.args(), scale, **const, **L.kv("fwd", k, v, const), **opts)
    return o, lse


def _grad_args(q, dq, gate, dq_dtype=None):
    """A backward's dq buffer and kernel arguments: ``(dq, DQ_ADD, gate arguments)``; a given ``dq`` is added
    onto (``DQ_ADD``), else a new one is made; a given ``gate`` (contiguous fp32 ``[b, t, hq]``) turns ``GATED``
    on."""
    add = dq is not None
    gated = dict(GATE=gate, GATED=True) if gate is not None else {}
    return (dq if add else torch.empty_like(q, dtype=dq_dtype or q.dtype)), add, gated


def _delta_args(o, delta, q):
    """``(delta, dq kernel arguments)``: ``delta`` as given, or with the branch output ``o`` given, the buffer the
    dq kernel computes it into (``_own_delta``): ``delta`` itself, or a new fp32 ``[b, t, hq]`` one when None."""
    if o is None:
        return delta, {}
    if delta is None:
        delta = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    return delta, dict(O=o, DELTA_FROM_O=True)


def masked_dq(q, k, v, do, lse, delta, scale: float, L: _Launch, dq=None, gate=None, o=None):
    """``(dq, delta)``: the dq kernel of :func:`masked_backward` alone (arguments as there)."""
    dq, add, gated = _grad_args(q, dq, gate)
    delta, own_delta = _delta_args(o, delta, q)
    grid, const, opts = L.dq
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *L.args(), scale, **const, DQ_ADD=add, **gated,
                         **own_delta, **L.kv("dq", k, v, const), **opts)
    return dq, delta


def masked_dkdv(q, k, v, do, lse, delta, scale: float, L: _Launch, gate=None):
    """``(dk, dv)``: the dK/dV kernel of :func:`masked_backward` alone, given ``delta``."""
    split = L.q_split > 0
    dk = torch.zeros_like(k, dtype=torch.float32) if split else torch.empty_like(k)
    dv = torch.zeros_like(v, dtype=torch.float32) if split else torch.empty_like(v)
    if k.shape[1]:
        grid, const, opts = L.dkdv
        gated = dict(GATE=gate, GATED=True) if gate is not None else {}
        _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *L.args(), scale, **const, Q_SPLIT=L.q_split,
                               **gated, **opts)
    return dk.to(k.dtype), dv.to(v.dtype)


def masked_backward(q, k, v, do, lse, delta, scale: float, L: _Launch, dq=None, gate=None, o=None):
    """``(dq, dk, dv)`` given ``delta = rowsum(o * do)``; with ``dq`` given, this call's dq is added onto it; with
    ``gate`` (this branch's gate, contiguous fp32 ``[b, t, hq]``), ``do`` is the gated sum's gradient and this
    branch's output gradient is ``gate * do`` (``delta`` then is ``rowsum(o * do)``); with the branch output ``o``
    given, the dq kernel computes delta itself and writes it into ``delta`` (an fp32 ``[b, t, hq]`` buffer, or a
    new one when ``delta`` is None) instead of a pass of its own."""
    dq, delta = masked_dq(q, k, v, do, lse, delta, scale, L, dq, gate, o)
    return (dq, *masked_dkdv(q, k, v, do, lse, delta, scale, L, gate))


class PositionMaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, kstride, koff, window, cu_seqlens, cu_seqlens_k, max_seqlens, q_offset):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        L = _Launch(q, k, v, kstride, koff - q_offset, window, cu_seqlens, cu_seqlens_k, max_seqlens)
        o, lse = masked_forward(q, k, v, scale, L)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.launch, ctx.scale = L, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = masked_backward(q, k, v, do, lse, None, ctx.scale, ctx.launch, o=o)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def position_masked_attention(q, k, v, scale: float, kstride: int, koff: int, window: int = NO_WINDOW,
                              cu_seqlens: Optional[torch.Tensor] = None,
                              cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlens=None, q_offset: int = 0):
    """``(o [b, t, hq, dv], lse [b, t, hq] fp32)``; the gradient flows into q, k, v (not through lse).

    ``max_seqlens = (longest query sequence, longest key sequence)`` of a packed batch, if the caller knows them
    (saves a device-to-host sync each). ``q_offset``: query ``i`` sits at key-frame position ``i + q_offset``."""
    return PositionMaskedAttention.apply(q, k, v, scale, kstride, koff, window, cu_seqlens, cu_seqlens_k,
                                         max_seqlens, q_offset)
