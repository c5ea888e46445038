"""Compressed branch in Triton: attention over the compressed tokens, and the selection scores it yields.

The attention itself is :func:`flash.position_masked_attention` with key positions ``i*d + l - 1``. The scores
kernel recomputes each probability from the saved log-sum-exp (one q.k pass), sums the GQA group's heads (eq. 10)
and maps compressed blocks onto selection blocks by slot overlap (eq. 9, see docs/algorithm.md) in registers, so no
``[t, t/d]`` tensor is ever stored: only the ``[b, t, hkv, t/l', 2]`` block score pairs that top-n reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import NSAConfig
from .flash import NO_WINDOW, _load_lse2, _load_rows, _load_tile, _tile_start, _tiles, position_masked_attention
from .interface import check_triton_config
from .varlen import max_seqlen

SCORES_WIDE_STAGES = 1  # pipeline stages of 256-wide tiles (dk above 128); 2 and 3 measured slower (H100)
SCORES_WIDE_BLOCK_M = 128  # query rows with 256-wide tiles (dk above 128): 256 x 256 failed the GPU tests (H100)
SCORES_ONE_PASS = True  # one q.k pass per tile, blocks by overlap weights (else one pass per slot a token covers)
SCORES_BLOCK_M, SCORES_WARPS, SCORES_STAGES = 128, 4, 2  # query rows (positions x heads) per program, warps,
# stages (H100 at 64k, benchmarks/scores_ab.py --sweep, the first 32k queries: 1.17 ms against 1.22 for 256 rows,
# 1.31 / 1.70 for 128 / 256 rows on 3 stages; the kernel before the (own, spill) pairs: 256 / 4 / 3, 1.27-1.33)
SCORES_TOKENS = 64  # compressed tokens per key tile (one-pass kernel)


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
def _group_sum(e, BC: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr):
    """``[BC, BLOCK_T * GP]`` -> ``[BC, BLOCK_T]``: the sum over the heads of each position, columns in the order
    of :func:`_score_columns`."""
    HL: tl.constexpr = min(GP, 2)
    PL: tl.constexpr = min(BLOCK_T, 4)
    e = tl.sum(tl.reshape(e, [BC, BLOCK_T // PL, GP // HL, PL, HL]), axis=4)
    return tl.reshape(tl.sum(e, axis=2), [BC, BLOCK_T])


@triton.jit
def _score_columns(t0, kvh, BLOCK_T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr):
    """Position and head of each column of the scores kernel's ``kc q^T`` products: column
    ``((ph * GP/HL + hh) * PL + pl) * HL + hl`` holds head ``hh * HL + hl`` of position ``ph * PL + pl``
    (``HL = 2``, ``PL = 4`` when there are as many). A Hopper wgmma accumulator gives each thread, per row, the
    columns ``{0, 1} + 2 * (lane % 4) + 8 i``, so this order puts all heads of one position (column bits 0 and 3..)
    in one thread's registers: the group's head sum takes adds, not shuffles."""
    HL: tl.constexpr = min(GP, 2)
    PL: tl.constexpr = min(BLOCK_T, 4)
    c = tl.arange(0, BLOCK_T * GP)
    hg = (c // (HL * PL)) % (GP // HL) * HL + c % HL
    tq = t0 + c // (GP * PL) * PL + (c // HL) % PL
    return tq, kvh * G + hg, hg < G


@triton.jit
def _scores_kernel(Q, KC, LSE, SC, CU, CU_K, T_FIXED, TK_FIXED, NS, QOFF, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   DK: tl.constexpr, BDK: tl.constexpr, BLOCK_T: tl.constexpr, BJ: tl.constexpr,
                   S: tl.constexpr, A: tl.constexpr, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
                   SEL_BLOCK: tl.constexpr, VARLEN: tl.constexpr, ONE_PASS: tl.constexpr):
    # One program: BLOCK_T positions x the GP heads of one KV head, against tiles of BJ*S compressed tokens.
    # The products are s^T = kc q^T ([tokens, query rows]): with the query rows as columns in _score_columns'
    # order, the head sum is in-thread and only the [tokens, positions] sums move between threads (H100 at 64k, same
    # run: 6.2 ms against 7.7 for q kc^T with the heads summed across lanes, both 8 warps; 4.95 ms with 4).
    # Each block's score is written as a pair (own, spill): its tokens' share of it, and the share of the next
    # block (a token that straddles two blocks); top-n adds block j - 1's spill to block j's own. Shifting the
    # spill along the block axis here went through shared memory (a tile's blocks span the four warps): four of
    # the loop's six barriers; sm_90 SASS at 256 rows, 801 -> 597 instructions a tile (benchmarks/sass_loops.py).
    bos, T, kbos, TK, kvh, t0 = _tile_start(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, VARLEN)
    if t0 >= T:
        return
    tq, hq, hvalid = _score_columns(t0, kvh, BLOCK_T, G, GP)
    rvalid = hvalid & (tq < T)
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    qt = tl.trans(_load_tile(Q, row_off, rvalid, DK, BDK))
    lse2 = _load_lse2(LSE, row_off, rvalid)  # +inf on padding rows: their probabilities are 0
    qk_scale = scale * 1.4426950408889634
    tpos = t0 + tl.arange(0, BLOCK_T)
    n_blocks = (tl.minimum(t0 + BLOCK_T, T) - 1 + QOFF) // SEL_BLOCK + 1  # blocks up to the tile's last query
    kk = tl.arange(0, BJ)
    out_row = ((bos + tpos.to(tl.int64)) * HKV + kvh) * NS
    out_mask = tpos < T
    if ONE_PASS:  # A <= S: each compressed token reaches its own selection block and at most the next one
        w_own, w_spill = overlap_weights(A, S)
        # tiles of tokens that all the program's positions see (all but the last one or two): no masks
        n_full = tl.minimum(tl.maximum(t0 + QOFF - KOFF + KSTRIDE, 0) // KSTRIDE, TK) // (BJ * S) * BJ
        for j0 in range(0, n_full, BJ):
            p = _token_probs(KC, qt, lse2, j0 * S + tl.arange(0, BJ * S), kbos, kvh, TK, tpos, qk_scale, QOFF,
                             HKV, DK, BDK, BJ * S, BLOCK_T, GP, KSTRIDE, KOFF, False)
            _store_pair(SC, out_row, out_mask, j0 + kk, NS, *_own_spill(p, w_own, w_spill, BJ, S, BLOCK_T))
        for j0 in range(n_full, n_blocks, BJ):
            p = _token_probs(KC, qt, lse2, j0 * S + tl.arange(0, BJ * S), kbos, kvh, TK, tpos, qk_scale, QOFF,
                             HKV, DK, BDK, BJ * S, BLOCK_T, GP, KSTRIDE, KOFF, True)
            _store_pair(SC, out_row, out_mask, j0 + kk, NS, *_own_spill(p, w_own, w_spill, BJ, S, BLOCK_T))
    else:  # a token reaches more blocks than the next: sum slot by slot, one q.k pass per slot a token covers
        for j0 in range(0, n_blocks, BJ):
            u = j0 * S + tl.arange(0, BJ * S)  # stride slots of this tile of selection blocks
            acc = tl.zeros([BJ * S, BLOCK_T], dtype=tl.float32)
            for n in tl.static_range(A):  # slot u holds compressed blocks u-A+1 .. u
                acc += _token_probs(KC, qt, lse2, u - n, kbos, kvh, TK, tpos, qk_scale, QOFF, HKV, DK, BDK,
                                    BJ * S, BLOCK_T, GP, KSTRIDE, KOFF, True)
            blk = tl.sum(tl.reshape(acc, [BJ, S, BLOCK_T]), axis=1)  # [BJ, BLOCK_T]
            _store_pair(SC, out_row, out_mask, j0 + kk, NS, blk, tl.zeros_like(blk))


@triton.jit
def _own_spill(p, w_own, w_spill, BJ: tl.constexpr, S: tl.constexpr, BLOCK_T: tl.constexpr):
    """``[BJ * S, BLOCK_T]`` token probabilities -> ``(own, spill)`` ``[BJ, BLOCK_T]``: each block's share of its
    S tokens, and the share of the next block."""
    p = tl.reshape(p, [BJ, S, BLOCK_T])
    return tl.sum(p * w_own[None, :, None], axis=1), tl.sum(p * w_spill[None, :, None], axis=1)


@triton.jit
def _store_pair(SC, out_row, out_mask, j, NS, own, spill):
    """Blocks ``j`` of the positions ``out_row`` (offsets in blocks) as ``(own, spill)`` pairs."""
    off = (out_row[None, :, None] + j[:, None, None]) * 2 + tl.arange(0, 2)[None, None, :]
    tl.store(SC + off, tl.join(own, spill), mask=(out_mask[None, :] & (j < NS)[:, None])[:, :, None])


@triton.jit
def _token_probs(KC, qt, lse2, ci, kbos, kvh, TK, tpos, qk_scale, QOFF, HKV: tl.constexpr, DK: tl.constexpr,
                 BDK: tl.constexpr, BC: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr,
                 KSTRIDE: tl.constexpr, KOFF: tl.constexpr, MASKED: tl.constexpr):
    """``[BC, BLOCK_T]``: compressed tokens ``ci``'s probabilities summed over each position's heads, 0 where
    a token is not visible (or not there); without ``MASKED`` every token is there and visible to every
    position."""
    kc_row = (kbos + ci.to(tl.int64)) * HKV + kvh
    if MASKED:
        cvalid = (ci >= 0) & (ci < TK)
        kc = _load_tile(KC, kc_row, cvalid, DK, BDK)
    else:
        kc = _load_rows(KC, kc_row, DK, BDK)
    # masked after the head sum (one position's heads share it); a future token's exp2 may be inf there, never NaN
    p = _group_sum(tl.exp2(tl.dot(kc, qt) * qk_scale - lse2[None, :]), BC, BLOCK_T, GP)
    if MASKED:
        vis = cvalid[:, None] & ((ci * KSTRIDE + KOFF)[:, None] <= tpos[None, :] + QOFF)
        p = tl.where(vis, p, 0.0)
    return p


def selection_scores(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                     max_t=None, q_offset: int = 0):
    """Block importance ``[b, t, hkv, ns_max]`` fp32 (entries of blocks after a query's own are undefined).

    With ``q_offset`` (fixed-length only) query ``i`` sits at position ``i + q_offset`` and the block ids are
    global: ``ns_max`` counts the blocks up to the last query."""
    return combine_pairs(score_pairs(q, k_cmp, lse_cmp, config, scale, cu_seqlens, cmp_cu_seqlens, max_t, q_offset))


def combine_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """``[..., ns, 2]`` (own, spill) pairs -> ``[..., ns]`` block scores: block j's own plus block j-1's spill,
    the sum top-n forms (topn.py)."""
    own, spill = pairs.unbind(-1)
    scores = own.clone()
    scores[..., 1:] += spill[..., :-1]
    return scores


def score_pairs(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                max_t=None, q_offset: int = 0):
    """:func:`selection_scores` as the kernel writes them: ``[b, t, hkv, ns_max, 2]`` fp32 (own, spill) pairs
    (see ``_scores_kernel``), which :func:`topn.select_topn` takes as they are."""
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
    gp, block_t = _tiles(g, SCORES_WIDE_BLOCK_M if dk > 128 else SCORES_BLOCK_M)
    pairs = torch.empty(b, t, hkv, ns, 2, device=q.device, dtype=torch.float32)
    nseq = cu_seqlens.numel() - 1 if varlen else b
    dummy = q.new_zeros(1, dtype=torch.int32)
    _scores_kernel[(triton.cdiv(max_t, block_t), nseq * hkv)](
        q.contiguous(), k_cmp.contiguous(), lse_cmp, pairs, cu_seqlens if varlen else dummy,
        cmp_cu_seqlens if varlen else dummy, t, k_cmp.shape[1], ns, q_offset, scale,
        HQ=hq, HKV=hkv, G=g, GP=gp, DK=dk, BDK=max(16, triton.next_power_of_2(dk)), BLOCK_T=block_t,
        BJ=max(1, SCORES_TOKENS // s), S=s, A=config.stride_slots_per_compress_block, KSTRIDE=config.compress_stride,
        KOFF=config.compress_block - 1, SEL_BLOCK=config.select_block, VARLEN=varlen,
        ONE_PASS=SCORES_ONE_PASS and config.compress_block <= config.select_block,
        num_warps=SCORES_WARPS,
        num_stages=1 if q.dtype == torch.float32 else (SCORES_WIDE_STAGES if dk > 128 else SCORES_STAGES))
    return pairs
