"""Compressed branch in Triton: attention over the compressed tokens, and the selection scores it yields.

The attention itself is :func:`flash.position_masked_attention` with key positions ``i*d + l - 1``. The scores
kernel recomputes each probability from the saved log-sum-exp (one q.k pass), sums the GQA group's heads (eq. 10)
and maps compressed blocks onto selection blocks by slot overlap (eq. 9, see docs/algorithm.md) in registers, so no
``[t, t/d]`` tensor is ever stored: only the ``[b, t, hkv, t/l']`` block scores that top-n reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import NSAConfig
from .flash import (
    NO_WINDOW,
    _load_lse2,
    _load_tile,
    _q_tile,
    _tiles,
    position_masked_attention,
)
from .interface import check_triton_config
from .varlen import max_seqlen

SCORES_ONE_PASS = True  # one q.k pass per tile, blocks by overlap weights (else one pass per slot a token covers)
SCORES_UNMASKED_TILES = True  # tiles every query of a program sees whole skip the visibility mask (one-pass kernel)
SCORES_FUSED_TOPN = True  # the one-pass kernel keeps each row's top-n while scoring (no [t, hkv, t/l'] buffer)


def compressed_attention(q, k_cmp, v_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                         max_t=None, q_offset: int = 0):
    """``(o [b, t, hq, dv], lse [b, t, hq])`` over compressed tokens ``k_cmp``/``v_cmp`` ``[b, tc, hkv, d]``
    (compressed from position 0; query ``i`` sits at position ``i + q_offset``)."""
    return position_masked_attention(q, k_cmp, v_cmp, scale, config.compress_stride, config.compress_block - 1,
                                     NO_WINDOW, cu_seqlens, cmp_cu_seqlens,
                                     None if max_t is None else (max_t, config.num_compressed(max_t)), q_offset)


@triton.jit
def overlap_weights(A: tl.constexpr, S: tl.constexpr):
    """Stride-slot overlap (eq. 9) of compressed token ``j*S + r`` (``r < S``; A slots per token, S per selection
    block, A <= S) with selection block j and with block j + 1: ``(w_own [S], w_spill [S])`` fp32."""
    r = tl.arange(0, S)
    return tl.minimum(A, S - r).to(tl.float32), tl.maximum(r + A - S, 0).to(tl.float32)


@triton.jit
def _sortable(v):
    """fp32 -> int32 in the same order (negative floats' magnitude bits flipped)."""
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _topn_merge(keys, blk, j, tpos, QOFF, NS, BLOCK_T: tl.constexpr, BJ: tl.constexpr, SEL_BLOCK: tl.constexpr,
                INITIAL: tl.constexpr, LOCAL: tl.constexpr):
    """Running top-BJ of each row: ``keys [BLOCK_T, BJ]`` int64 = (score order << 32) | (2^32 - 1 - block), so a
    descending sort ranks by score, then the lower block first (the reference's tie rule). Forced blocks
    (first / local) score +inf, blocks after the row's own -inf."""
    own = (tpos + QOFF) // SEL_BLOCK
    valid = (j[None, :] <= own[:, None]) & (j < NS)[None, :]
    forced = valid & ((j[None, :] < INITIAL) | (j[None, :] > own[:, None] - LOCAL))
    v = tl.where(forced, float("inf"), tl.where(valid, blk, float("-inf")))
    new = (_sortable(v).to(tl.int64) << 32) | (4294967295 - j.to(tl.int64))[None, :]
    both = tl.sort(tl.reshape(tl.join(keys, new), [BLOCK_T, 2 * BJ]), 1, descending=True)
    top, _ = tl.split(tl.permute(tl.reshape(both, [BLOCK_T, 2, BJ]), (0, 2, 1)))
    return top


@triton.jit
def _scores_tiles(KC, SC, q, lse2, tq, tpos, rvalid, carry, keys, bos, kbos, kvh, T, TK, NS, QOFF, j_start,
                  j_end, qk_scale, HKV: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, BLOCK_T: tl.constexpr,
                  GP: tl.constexpr, BJ: tl.constexpr, S: tl.constexpr, A: tl.constexpr, KSTRIDE: tl.constexpr,
                  KOFF: tl.constexpr, MASKED: tl.constexpr, TOPN: tl.constexpr, SEL_BLOCK: tl.constexpr,
                  INITIAL: tl.constexpr, LOCAL: tl.constexpr):
    """Block scores of selection blocks ``[j_start, j_end)`` (tiles of BJ) by one q.k pass over their compressed
    tokens, stored (TOPN = 0) or merged into the running top-n ``keys``; returns the last block's spill for the
    next tile and the keys."""
    dk = tl.arange(0, BDK)
    w_own, w_spill = overlap_weights(A, S)
    kk = tl.arange(0, BJ)
    for j0 in range(j_start, j_end, BJ):
        ci = j0 * S + tl.arange(0, BJ * S)  # the compressed tokens of this tile of selection blocks
        cvalid = ci < TK
        kc = tl.load(KC + ((kbos + ci.to(tl.int64)) * HKV + kvh)[:, None] * DK + dk[None, :],
                     mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
        s = tl.dot(q, tl.trans(kc)) * qk_scale
        p = tl.exp2(s - lse2[:, None])  # padding rows: lse2 = +inf, p = 0
        if MASKED:
            vis = cvalid[None, :] & ((ci * KSTRIDE + KOFF)[None, :] <= tq[:, None] + QOFF) & rvalid[:, None]
            p = tl.where(vis, p, 0.0)
        p = tl.sum(tl.reshape(p, [BLOCK_T, GP, BJ, S]), axis=1)
        own = tl.sum(p * w_own[None, None, :], axis=2)  # [BLOCK_T, BJ]
        spill = tl.sum(p * w_spill[None, None, :], axis=2)
        # block k takes block k - 1's spill: a shift along the block axis, as an exact 0/1 sum
        shifted = tl.sum(tl.where(kk[None, :, None] == kk[None, None, :] + 1, spill[:, None, :], 0.0), axis=2)
        blk = own + shifted + tl.where(kk[None, :] == 0, carry[:, None], 0.0)
        carry = tl.sum(tl.where(kk[None, :] == BJ - 1, spill, 0.0), axis=1)
        j = j0 + kk
        if TOPN:
            keys = _topn_merge(keys, blk, j, tpos, QOFF, NS, BLOCK_T, BJ, SEL_BLOCK, INITIAL, LOCAL)
        else:
            out = SC + ((bos + tpos.to(tl.int64)) * HKV + kvh)[:, None] * NS + j[None, :]
            tl.store(out, blk, mask=(tpos < T)[:, None] & (j < NS)[None, :])
    return carry, keys


@triton.jit
def _scores_kernel(Q, KC, LSE, SC, IDX, CU, CU_K, T_FIXED, TK_FIXED, NS, QOFF, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   DK: tl.constexpr, BDK: tl.constexpr, BLOCK_T: tl.constexpr, BJ: tl.constexpr,
                   S: tl.constexpr, A: tl.constexpr, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
                   SEL_BLOCK: tl.constexpr, VARLEN: tl.constexpr, ONE_PASS: tl.constexpr, UNMASKED: tl.constexpr,
                   TOPN: tl.constexpr, INITIAL: tl.constexpr, LOCAL: tl.constexpr):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    if t0 >= T:
        return
    dk = tl.arange(0, BDK)
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q = _load_tile(Q, row_off, rvalid, DK, BDK)
    lse2 = _load_lse2(LSE, row_off, rvalid)
    qk_scale = scale * 1.4426950408889634
    t_hi = tl.minimum(t0 + BLOCK_T, T) - 1 + QOFF
    n_blocks = t_hi // SEL_BLOCK + 1  # blocks that start at or before the last query of the tile
    tpos = t0 + tl.arange(0, BLOCK_T)
    if ONE_PASS:  # A <= S: each compressed token reaches its own selection block and at most the next one
        # tiles whose compressed tokens all end at or before the first query need no visibility mask
        t_first = t0 + QOFF - KOFF
        n_full = tl.where(t_first >= 0, tl.minimum(t_first // KSTRIDE + 1, TK), 0)
        j_full = n_full // (BJ * S) * BJ if UNMASKED else 0
        carry = tl.zeros([BLOCK_T], dtype=tl.float32)  # the previous tile's last block's spill
        keys = tl.full([BLOCK_T, BJ], -9223372036854775807, dtype=tl.int64)  # below every real key: no block
        carry, keys = _scores_tiles(KC, SC, q, lse2, tq, tpos, rvalid, carry, keys, bos, kbos, kvh, T, TK, NS, QOFF,
                                    0, j_full, qk_scale, HKV, DK, BDK, BLOCK_T, GP, BJ, S, A, KSTRIDE, KOFF, False,
                                    TOPN, SEL_BLOCK, INITIAL, LOCAL)
        carry, keys = _scores_tiles(KC, SC, q, lse2, tq, tpos, rvalid, carry, keys, bos, kbos, kvh, T, TK, NS, QOFF,
                                    j_full, n_blocks, qk_scale, HKV, DK, BDK, BLOCK_T, GP, BJ, S, A, KSTRIDE, KOFF,
                                    True, TOPN, SEL_BLOCK, INITIAL, LOCAL)
        if TOPN:  # the n best keys lead each row: their blocks, ascending, -1 padded (as topn.select_topn)
            col = tl.arange(0, BJ)
            picked = (col[None, :] < TOPN) & ((keys >> 32) > -2139095041)  # -2139095041 = _sortable(-inf)
            blocks = tl.where(picked, 4294967295 - (keys & 4294967295), 1 << 30).to(tl.int32)
            blocks = tl.sort(blocks, 1)
            blocks = tl.where(blocks == (1 << 30), -1, blocks)
            out = IDX + ((bos + tpos.to(tl.int64)) * HKV + kvh)[:, None] * TOPN + col[None, :]
            tl.store(out, blocks, mask=(tpos < T)[:, None] & (col < TOPN)[None, :])
    else:  # a token reaches more blocks than the next: sum slot by slot, one q.k pass per slot a token covers
        for j0 in range(0, n_blocks, BJ):
            u = j0 * S + tl.arange(0, BJ * S)  # stride slots of this tile of selection blocks
            acc = tl.zeros([BLOCK_T * GP, BJ * S], dtype=tl.float32)
            for n in tl.static_range(A):  # slot u holds compressed blocks u-A+1 .. u
                ci = u - n
                cvalid = (ci >= 0) & (ci < TK)
                kc = tl.load(KC + ((kbos + ci.to(tl.int64)) * HKV + kvh)[:, None] * DK + dk[None, :],
                             mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
                s = tl.dot(q, tl.trans(kc)) * qk_scale
                vis = cvalid[None, :] & ((ci * KSTRIDE + KOFF)[None, :] <= tq[:, None] + QOFF) & rvalid[:, None]
                acc += tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
            blk = tl.sum(tl.sum(tl.reshape(acc, [BLOCK_T, GP, BJ, S]), axis=3), axis=1)  # [BLOCK_T, BJ]
            j = j0 + tl.arange(0, BJ)
            out = SC + ((bos + tpos.to(tl.int64)) * HKV + kvh)[:, None] * NS + j[None, :]
            tl.store(out, blk, mask=(tpos < T)[:, None] & (j < NS)[None, :])


def fused_topn_fits(config: NSAConfig) -> bool:
    """Whether the scores kernel can keep each row's top-n itself (one-pass kernel, n <= its BJ blocks per tile)."""
    s = config.stride_slots_per_select_block
    return SCORES_FUSED_TOPN and SCORES_ONE_PASS and config.compress_block <= config.select_block and \
        config.select_topn <= max(1, 64 // s)


def selection_scores(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                     max_t=None, q_offset: int = 0, topn: bool = False):
    """Block importance ``[b, t, hkv, ns_max]`` fp32 (entries of blocks after a query's own are undefined).

    With ``q_offset`` (fixed-length only) query ``i`` sits at position ``i + q_offset`` and the block ids are
    global: ``ns_max`` counts the blocks up to the last query.

    ``topn=True`` (needs :func:`fused_topn_fits`): the kernel keeps each row's best n blocks while it scores and
    returns them instead, ``[b, t, hkv, n]`` int32 ascending, -1 padded, equal to ``topn.select_topn`` of the
    scores; the scores themselves are never stored."""
    b, t, hq, dk = q.shape
    hkv = k_cmp.shape[2]
    g = hq // hkv
    check_triton_config(config)
    s = config.stride_slots_per_select_block
    varlen = cu_seqlens is not None
    if not varlen:
        max_t = t
    elif max_t is None:
        max_t = max_seqlen(cu_seqlens)
    ns = config.num_select_blocks(max_t + q_offset)
    gp, block_t = _tiles(g, 64)
    if topn:
        if not fused_topn_fits(config):
            raise ValueError("selection_scores(topn=True) needs compress_block <= select_block and select_topn <= "
                             f"64 / (select_block / compress_stride); got {config}")
        n = config.select_topn
        out = torch.empty(b, t, hkv, n, device=q.device, dtype=torch.int32)
        scores = out  # not written
    else:
        n = 0
        scores = out = torch.empty(b, t, hkv, ns, device=q.device, dtype=torch.float32)
    nseq = cu_seqlens.numel() - 1 if varlen else b
    dummy = q.new_zeros(1, dtype=torch.int32)
    _scores_kernel[(triton.cdiv(max_t, block_t), nseq * hkv)](
        q.contiguous(), k_cmp.contiguous(), lse_cmp, scores, out, cu_seqlens if varlen else dummy,
        cmp_cu_seqlens if varlen else dummy, t, k_cmp.shape[1], ns, q_offset, scale,
        HQ=hq, HKV=hkv, G=g, GP=gp, DK=dk, BDK=max(16, triton.next_power_of_2(dk)), BLOCK_T=block_t,
        BJ=max(1, 64 // s), S=s, A=config.stride_slots_per_compress_block, KSTRIDE=config.compress_stride,
        KOFF=config.compress_block - 1, SEL_BLOCK=config.select_block, VARLEN=varlen,
        ONE_PASS=SCORES_ONE_PASS and config.compress_block <= config.select_block, UNMASKED=SCORES_UNMASKED_TILES,
        TOPN=n, INITIAL=config.select_initial, LOCAL=config.select_local,
        num_stages=1 if dk > 128 or q.dtype == torch.float32 else 3)  # wide tiles: stay inside shared memory
    return out
