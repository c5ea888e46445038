"""Triton kernels for one NSA decoding step (one new query per sequence), GQA group-centric, split-K.

Every program serves one (sequence, KV head) pair and all ``G = hq / hkv`` query heads of its group, so each
loaded key block is used by the whole group (rows of the ``[G, d]`` query tile, padded to 16 for ``tl.dot``).
Long caches are split: the compressed branch over ``splits`` ranges of compressed tokens, the selected branch and
the window over programs of a few blocks of ``l'`` positions each. Partial (o, max, sum) are merged by the last
kernel, which also applies the gates:

1. ``_cmp_partial``: compressed attention over a range -> partial o, m, l (log2 domain); per tile of compressed
   tokens it also sums each head's probabilities (relative to the running max) into the tile's selection blocks by
   stride-slot overlap (eq. 9): 1/S of the logits' bytes.
2. ``_cmp_scores``: the global log-sum-exp from the partials rescales those tile sums; summed over the group's
   heads (eq. 10) -> fp32 block scores.
3. ``_topn_window``: forced first/local blocks, then the best free blocks above a threshold from chunk maxima,
   ties to the lower index, ascending (as the reference); beside those programs, ``WINDOW_TILES_PER_PROGRAM``
   window tiles per program -> partial o, m, l (they need no selection, and the top-n alone leaves the GPU idle).
4. ``_sparse_partial``: ``SPARSE_TILES_PER_PROGRAM`` selected blocks -> partial o, m, l (a loop without branches,
   so Triton pipelines its loads).
5. ``_combine``: one program (one warp) per query head merges the partials of each branch, gates, writes
   ``[B, hq, dv]``.

Sequence lengths are read on the device (``cache.lens``): no host sync, so a step can be captured in a CUDA graph.
``append_raw`` / ``append_compress`` are the cache update (:meth:`NSAKVCache.append` with ``backend="triton"``).

Tried on an H100 and not kept (64k x 8, see docs/decode.md): scores in the top-n or in the last compressed program
(arrival counter), top-n by ranks in parallel programs or by int64 keys, the combine in the last sparse program,
programmatic dependent launch between the kernels, the window branch on a second stream, all five phases chained in
one launch (commit b46cf25), TMA or evict-first loads in the compressed pass, splits capped at one wave, sparse
loops with preloaded indices, the tile sums own + spill combined through one fp32 product (commit a240898), all n
selected blocks in one program per pair with the gates applied there (a240898), programmatic dependent launch
with the window overlapping the scores kernel (f2262dd): none faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compress import overlap_weights

# launch knobs, swept by python -m nsa_parallel.bench_decode (defaults: the best measured on an H100)
CMP_BN, CMP_WARPS, CMP_STAGES = 64, 4, 3  # compressed-branch tile, warps, pipeline stages
SCORES_BJ = 64  # selection blocks per scores program
SCORES_WARPS = 2  # warps of a scores program
COMBINE_WARPS = 1  # warps of a combine program (one query head: its merges' sums stay within the warp)
SPARSE_TILES_PER_PROGRAM = 4  # selected blocks one program merges before writing a partial
WINDOW_TILES_PER_PROGRAM = 4  # window tiles of l' positions one program merges before writing a partial
TOPN_WARPS = 4  # warps of the top-n program
TOPN_CHUNKS = 64  # top-n threshold from this many chunk maxima of the scores (0: one argmax per pick)
TOPN_CANDIDATES = 64  # most blocks above that threshold ranked directly; more (ties) fall back to the argmaxes
APPEND_ROWS = 16  # sequences one phi program compresses together (the rows of its tl.dot, >= 16)
PROGRAMS_PER_SM = 2  # compressed-branch programs per SM the split aims for
WINDOW_IN_TOPN = True  # window partials computed by extra programs of the top-n launch (else of the sparse one)
SPARSE_STAGES = 3  # pipeline stages of the selected / window loops


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@triton.jit
def _load_q(q_ptr, b, h, sqb, sqh, G: tl.constexpr, DK: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr):
    g = tl.arange(0, BG)
    d = tl.arange(0, BD)
    ptr = q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :]
    return tl.load(ptr, mask=(g[:, None] < G) & (d[None, :] < DK), other=0.0)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc):
    """One online-softmax update (scores in log2 units, -inf where masked). Unlike the training kernels' step it
    allows rows with no visible key yet: decode tiles may be wholly masked (a block past n, an empty split)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _num_cmp(t, CL: tl.constexpr, CS: tl.constexpr):
    # compressed blocks that end at or before position t: i*CS + CL - 1 <= t
    return tl.where(t >= CL - 1, (t - CL + 1) // CS + 1, 0)


@triton.jit
def _cmp_partial(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, own_ptr, spill_ptr, mt_ptr, sm_scale, sqb, sqh,
                 skb, skt, skh, svb, svt, svh, NSP, NT,
                 HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CL: tl.constexpr,
                 CS: tl.constexpr, SB: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, BG: tl.constexpr,
                 BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr):
    """Compressed attention over one split -> partial (o, m, l) and the per-tile block sums. (Measured on an H100,
    64k x 8, no faster: K/V through TMA tensor descriptors with 2-4 stages or 128-token tiles, loads marked
    evict-first.)"""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)  # b * stride passes 2^31 for long caches at large batch
    h = bh % HKV
    t = tl.load(lens_ptr + b) - 1
    nc = _num_cmp(t, CL, CS)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, nc)
    q = _load_q(q_ptr, b, h, sqb, sqh, G, DK, BG, BD)
    g = tl.arange(0, BG)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    A: tl.constexpr = CL // CS  # stride slots per compressed token
    S: tl.constexpr = SB // CS  # stride slots (= compressed tokens) per selection block; A <= S
    TB: tl.constexpr = BN // S  # selection blocks a tile starts
    w_own, w_spill = overlap_weights(A, S)
    rows = (bh * G + g).to(tl.int64)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for i0 in range(start, end, BN):
        i = i0 + tl.arange(0, BN)
        ok = i < end
        k = tl.load(k_ptr + b * skb + i[:, None].to(tl.int64) * skt + h * skh + d[None, :],
                    mask=ok[:, None] & (d[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + b * svb + i[:, None].to(tl.int64) * svt + h * svh + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k)) * (sm_scale * 1.4426950408889634)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile holds a visible token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        # the selection scores need these probabilities once the global max is known: per head, summed into the
        # tile's selection blocks relative to m_new (kept as the tile's max); 1/S of the logits' bytes
        p3 = tl.reshape(p, [BG, TB, S])
        tile = i0 // BN
        j = tile * TB + tl.arange(0, TB)
        sel = rows[:, None] * NSP + j[None, :]
        gm = (g < G)[:, None] & (j < NSP)[None, :]
        tl.store(own_ptr + sel, tl.sum(p3 * w_own[None, None, :], 2), mask=gm)
        tl.store(spill_ptr + sel, tl.sum(p3 * w_spill[None, None, :], 2), mask=gm)
        tl.store(mt_ptr + rows * NT + tile, m_new, mask=g < G)
    row = (bh * SPLITS + split) * G + g
    tl.store(m_ptr + row, m_i, mask=g < G)
    tl.store(l_ptr + row, l_i, mask=g < G)
    tl.store(o_ptr + row[:, None] * DV + dv[None, :], acc, mask=(g[:, None] < G) & (dv[None, :] < DV))


@triton.jit
def _cmp_scores(own_ptr, spill_ptr, mt_ptr, lens_ptr, m_ptr, l_ptr, sc_ptr, NSMAX, NSP, NT, HKV: tl.constexpr,
                G: tl.constexpr, CL: tl.constexpr, CS: tl.constexpr, SB: tl.constexpr, SPLITS: tl.constexpr,
                BSPL: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    """Block scores (eq. 10) of ``BJ`` blocks: each head's tile sums rescaled by exp2(tile max - global lse),
    summed over the group; block j takes its own tokens' share and the spill of block j - 1's (kept by j - 1's
    tile). (Measured on an H100, 64k x 8: computing them in the top-n program, 30 us slower; in the last
    compressed program of a pair via an arrival counter, 40 us slower: one program then walks every block.)"""
    bh = tl.program_id(0)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    nc = _num_cmp(tl.load(lens_ptr + bh // HKV) - 1, CL, CS)
    g = tl.arange(0, BG)
    sp = tl.arange(0, BSPL)
    pm = (sp[:, None] < SPLITS) & (g[None, :] < G)
    part = (bh * SPLITS + sp[:, None]) * G + g[None, :]
    m_s = tl.load(m_ptr + part, mask=pm, other=float("-inf"))
    l_s = tl.load(l_ptr + part, mask=pm, other=0.0)
    m_all = tl.max(m_s, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    lse = m_safe + tl.log2(tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), 0))
    S: tl.constexpr = SB // CS
    TB: tl.constexpr = BN // S
    rows = (bh * G + g).to(tl.int64)[:, None]
    gm = (g < G)[:, None]
    sc = tl.zeros([BJ], tl.float32)
    for back in tl.static_range(2):  # 0: own tokens of block j, 1: the spill of block j - 1
        jj = j - back
        tile = jj // TB
        vis = gm & ((jj >= 0) & (tile * BN < nc))[None, :]  # tiles past nc were never written
        mt = tl.load(mt_ptr + rows * NT + tile[None, :], mask=vis, other=0.0)
        part_ptr = own_ptr if back == 0 else spill_ptr
        x = tl.load(part_ptr + rows * NSP + jj[None, :], mask=vis, other=0.0)
        sc += tl.sum(x * tl.where(vis, tl.exp2(mt - lse[:, None]), 0.0), 0)
    tl.store(sc_ptr + bh * NSMAX + j, sc, mask=j < NSMAX)


@triton.jit
def _kth_best(v, i, K: tl.constexpr):
    """``(value, index)`` of the K-th best entry of ``v`` by (value desc, index asc): the rank of each entry is the
    number of entries that beat it, all pairs compared at once. ``(-inf, -1)`` if fewer than K are > -inf."""
    beats = (v[None, :] > v[:, None]) | ((v[None, :] == v[:, None]) & (i[None, :] < i[:, None]))
    kth = (tl.sum(beats.to(tl.int32), 1) == K - 1) & (v > float("-inf"))
    return tl.max(tl.where(kth, v, float("-inf")), 0), tl.max(tl.where(kth, i, -1), 0)


@triton.jit
def _topn_program(bh, sc_ptr, lens_ptr, idx_ptr, cand_ptr, NSMAX, HKV: tl.constexpr, SB: tl.constexpr,
                  TOPN: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, BNS: tl.constexpr, BTOP: tl.constexpr,
                  NCH: tl.constexpr, CB: tl.constexpr):
    """Forced first/local blocks of pair ``bh``, then the ``TOPN - INIT - LOCAL`` best free blocks, ties to the
    lower index, slots ascending (as the reference).

    The free picks (``NCH > 0``): the K-th best of ``NCH`` chunk maxima is a threshold no pick lies below (K chunks
    hold a block at least that high), so only the few blocks at or above it (at most K chunks' worth, unless ties)
    are ranked against each other, compacted through ``cand_ptr`` (``CB`` slots per pair); the picks are those
    that beat or equal the K-th best of them. Ties that leave more than ``CB`` candidates fall back to one argmax
    per pick. Measured on an H100 at 64k x 8 (1024 blocks, 13 picks), the top-n launch alone: argmaxes 7.6 us,
    64 or 32 chunks 6.8 / 6.7 us; 128 or 256 chunks and candidates slower (the [CB, CB] compares spill). Earlier:
    tl.sort 56 us; ranks of every block against every other in parallel programs 27 us; one warp 29 us."""
    K: tl.constexpr = TOPN - INIT - LOCAL  # forced blocks are at most INIT + LOCAL
    b = bh // HKV
    t = tl.load(lens_ptr + b) - 1
    own = t // SB
    j = tl.arange(0, BNS)
    s = tl.load(sc_ptr + bh * NSMAX + j, mask=j < NSMAX, other=0.0)
    valid = j <= own
    forced = valid & ((j < INIT) | (j > own - LOCAL))
    s = tl.where(valid & ~forced, s, float("-inf"))
    sel = forced
    if NCH > 0:
        tau, _ = _kth_best(tl.max(tl.reshape(s, [NCH, BNS // NCH]), 1), tl.arange(0, NCH), K)
        cand = (s >= tau) & (s > float("-inf"))
        n_cand = tl.sum(cand.to(tl.int32), 0)
    else:  # one argmax per pick
        cand = j < 0
        n_cand = CB + 1
    if n_cand <= CB:
        tl.store(cand_ptr + bh * CB + tl.cumsum(cand.to(tl.int32), 0) - 1, j, mask=cand)
        tl.debug_barrier()  # the compacted indices are read back by other threads of this program
        r = tl.arange(0, CB)
        jc = tl.load(cand_ptr + bh * CB + r, mask=r < n_cand, other=0)
        v_k, j_k = _kth_best(tl.load(sc_ptr + bh * NSMAX + jc, mask=r < n_cand, other=float("-inf")), jc, K)
        sel = sel | (cand & ((s > v_k) | ((s == v_k) & (j <= j_k))))
    else:
        for _ in range(K):
            arg = tl.argmax(s, 0, tie_break_left=True)  # the lower block index wins ties, as in the reference
            hit = (j == arg) & (s > float("-inf"))  # nothing left to take once the best is -inf
            sel = sel | hit
            s = tl.where(j == arg, float("-inf"), s)
    slot = tl.cumsum(sel.to(tl.int32), 0) - 1  # ascending, as the reference
    tl.store(idx_ptr + bh * TOPN + slot, j, mask=sel)
    r = tl.arange(0, BTOP)
    pad = (r >= tl.sum(sel.to(tl.int32), 0)) & (r < TOPN)  # fewer visible blocks than n
    tl.store(idx_ptr + bh * TOPN + r, tl.full([BTOP], -1, tl.int32), mask=pad)


@triton.jit
def _topn(sc_ptr, lens_ptr, idx_ptr, cand_ptr, NSMAX, HKV: tl.constexpr, SB: tl.constexpr, TOPN: tl.constexpr,
          INIT: tl.constexpr, LOCAL: tl.constexpr, BNS: tl.constexpr, BTOP: tl.constexpr, NCH: tl.constexpr,
          CB: tl.constexpr):
    _topn_program(tl.program_id(0), sc_ptr, lens_ptr, idx_ptr, cand_ptr, NSMAX, HKV, SB, TOPN, INIT, LOCAL, BNS,
                  BTOP, NCH, CB)


@triton.jit
def _slc_rows(idx_ptr, bh, k_id, t, u, TOPN: tl.constexpr, SB: tl.constexpr):
    """Cache rows and visibility of selected block number ``k_id`` of pair ``bh`` (index -1, or past n: none)."""
    pos = tl.load(idx_ptr + bh * TOPN + k_id, mask=k_id < TOPN, other=-1) * SB + u
    return pos.to(tl.int64), (pos >= 0) & (pos <= t)  # blk = -1 gives negative positions


@triton.jit
def _win_rows(tile, t, u, W: tl.constexpr, NWT: tl.constexpr, SB: tl.constexpr):
    """Ring rows (p at p % W) and visibility of window tile number ``tile`` of t-W+1 .. t."""
    pos = tl.maximum(t - W + 1, 0) + tile * SB + u
    return (pos % W).to(tl.int64), (pos <= t) & (tile * SB + u < NWT * SB)  # tile < NWT, as a tensor


@triton.jit
def _attend_rows(q, k_ptr, v_ptr, row, ok, sk, sv, d, dv, sm_scale, m_i, l_i, acc, DK: tl.constexpr,
                 DV: tl.constexpr):
    """One online-softmax step over the K/V rows ``row`` (``k_ptr``/``v_ptr`` at the sequence and head already)."""
    k = tl.load(k_ptr + row[:, None] * sk + d[None, :], mask=ok[:, None] & (d[None, :] < DK), other=0.0)
    v = tl.load(v_ptr + row[:, None] * sv + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k)) * (sm_scale * 1.4426950408889634)
    return _softmax_step(tl.where(ok[None, :], s, float("-inf")), v, m_i, l_i, acc)


@triton.jit
def _sparse_program(bh, split, q_ptr, ks_ptr, vs_ptr, kw_ptr, vw_ptr, lens_ptr, idx_ptr, o_ptr, m_ptr, l_ptr,
                    sm_scale, sqb, sqh, ksb, kst, ksh, vsb, vst, vsh, kwb, kwt, kwh, vwb, vwt, vwh,
                    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, SB: tl.constexpr,
                    TOPN: tl.constexpr, W: tl.constexpr, NWT: tl.constexpr, PER: tl.constexpr, WPER: tl.constexpr,
                    NSLC: tl.constexpr, NPART: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                    MODE: tl.constexpr):
    """``PER`` selected blocks (``split < NSLC``) or ``WPER`` window tiles of ``SB`` positions of pair ``bh`` -> one
    partial. ``MODE`` 1: the program is known to take selected blocks, 2: window tiles, 0: either, by ``split``.
    Modes 1 and 2 keep the loop free of branches: only then does Triton pipeline its loads (measured on an H100,
    64k x 8: sparse launch 10.4 -> 9.9 us, top-n + window launch 8.1 -> 7.4; with the block indices loaded before
    the loop, or 2 / 4 stages, no faster)."""
    b = (bh // HKV).to(tl.int64)  # b * stride passes 2^31 for long caches at large batch
    h = bh % HKV
    t = tl.load(lens_ptr + b) - 1
    u = tl.arange(0, SB)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = _load_q(q_ptr, b, h, sqb, sqh, G, DK, BG, BD)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    ks_ptr += b * ksb + h * ksh
    vs_ptr += b * vsb + h * vsh
    kw_ptr += b * kwb + h * kwh
    vw_ptr += b * vwb + h * vwh
    if MODE == 1:
        for r in range(PER):
            row, ok = _slc_rows(idx_ptr, bh, split * PER + r, t, u, TOPN, SB)
            m_i, l_i, acc = _attend_rows(q, ks_ptr, vs_ptr, row, ok, kst, vst, d, dv, sm_scale, m_i, l_i, acc,
                                         DK, DV)
    elif MODE == 2:
        for r in range(WPER):
            row, ok = _win_rows((split - NSLC) * WPER + r, t, u, W, NWT, SB)
            m_i, l_i, acc = _attend_rows(q, kw_ptr, vw_ptr, row, ok, kwt, vwt, d, dv, sm_scale, m_i, l_i, acc, DK,
                                         DV)
    else:
        for r in range(tl.where(split < NSLC, PER, WPER)):
            if split < NSLC:
                row, ok = _slc_rows(idx_ptr, bh, split * PER + r, t, u, TOPN, SB)
                m_i, l_i, acc = _attend_rows(q, ks_ptr, vs_ptr, row, ok, kst, vst, d, dv, sm_scale, m_i, l_i, acc,
                                             DK, DV)
            else:
                row, ok = _win_rows((split - NSLC) * WPER + r, t, u, W, NWT, SB)
                m_i, l_i, acc = _attend_rows(q, kw_ptr, vw_ptr, row, ok, kwt, vwt, d, dv, sm_scale, m_i, l_i, acc,
                                             DK, DV)
    g = tl.arange(0, BG)
    rowp = (bh * NPART + split) * G + g
    tl.store(m_ptr + rowp, m_i, mask=g < G)
    tl.store(l_ptr + rowp, l_i, mask=g < G)
    tl.store(o_ptr + rowp[:, None] * DV + dv[None, :], acc, mask=(g[:, None] < G) & (dv[None, :] < DV))


@triton.jit
def _sparse_partial(q_ptr, ks_ptr, vs_ptr, kw_ptr, vw_ptr, lens_ptr, idx_ptr, o_ptr, m_ptr, l_ptr, sm_scale,
                    sqb, sqh, ksb, kst, ksh, vsb, vst, vsh, kwb, kwt, kwh, vwb, vwt, vwh,
                    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, SB: tl.constexpr,
                    TOPN: tl.constexpr, W: tl.constexpr, NWT: tl.constexpr, PER: tl.constexpr, WPER: tl.constexpr,
                    NSLC: tl.constexpr, NPART: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                    MODE: tl.constexpr):
    """Program (pair, split): ``split < NSLC`` selected blocks, the rest (when the grid has them) window tiles."""
    _sparse_program(tl.program_id(0), tl.program_id(1), q_ptr, ks_ptr, vs_ptr, kw_ptr, vw_ptr, lens_ptr, idx_ptr,
                    o_ptr, m_ptr, l_ptr, sm_scale, sqb, sqh, ksb, kst, ksh, vsb, vst, vsh, kwb, kwt, kwh, vwb, vwt,
                    vwh, HKV, G, DK, DV, SB, TOPN, W, NWT, PER, WPER, NSLC, NPART, BG, BD, BDV, MODE)


@triton.jit
def _topn_window(sc_ptr, idx_ptr, cand_ptr, NSMAX, q_ptr, kw_ptr, vw_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, sm_scale,
                 sqb, sqh, kwb, kwt, kwh, vwb, vwt, vwh, BH: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                 DK: tl.constexpr, DV: tl.constexpr, SB: tl.constexpr, TOPN: tl.constexpr, INIT: tl.constexpr,
                 LOCAL: tl.constexpr, BNS: tl.constexpr, BTOP: tl.constexpr, W: tl.constexpr, NWT: tl.constexpr,
                 PER: tl.constexpr, WPER: tl.constexpr, NSLC: tl.constexpr, NPART: tl.constexpr, BG: tl.constexpr,
                 BD: tl.constexpr, BDV: tl.constexpr, NCH: tl.constexpr, CB: tl.constexpr, MODE: tl.constexpr):
    """The top-n of every pair (programs ``< BH``) and, beside them, the window partials: the window needs no
    selection, and the top-n's 32-odd programs leave the rest of the GPU idle, so the window's reads are free.
    (Measured on an H100, 64k x 8: the sparse launch 13.3 -> 10.1 us, this one 7.5 -> 8.1. Each top-n program
    also computing its pair's scores instead of their own launch, 512 blocks a step: 74 against 61 us.)"""
    pid = tl.program_id(0)
    if pid < BH:
        _topn_program(pid, sc_ptr, lens_ptr, idx_ptr, cand_ptr, NSMAX, HKV, SB, TOPN, INIT, LOCAL, BNS, BTOP, NCH,
                      CB)
    else:
        i = pid - BH
        _sparse_program(i // (NPART - NSLC), NSLC + i % (NPART - NSLC), q_ptr, kw_ptr, vw_ptr, kw_ptr, vw_ptr,
                        lens_ptr, idx_ptr, o_ptr, m_ptr, l_ptr, sm_scale, sqb, sqh, kwb, kwt, kwh, vwb, vwt, vwh, kwb,
                        kwt, kwh, vwb, vwt, vwh, HKV, G, DK, DV, SB, TOPN, W, NWT, PER, WPER, NSLC, NPART, BG, BD,
                        BDV, MODE)


@triton.jit
def _merge(o_ptr, m_ptr, l_ptr, bh, g, first, count, NPART: tl.constexpr, G: tl.constexpr, DV: tl.constexpr,
           BP: tl.constexpr, BDV: tl.constexpr):
    """Merge ``count`` partials (from ``first``) of query head ``g`` of pair ``bh``: ``[BDV]``, 0 if none saw a key."""
    sp = tl.arange(0, BP)
    dv = tl.arange(0, BDV)
    ok = sp < count
    row = (bh * NPART + first + sp) * G + g
    m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_safe)
    w = tl.where(ok, w, 0.0)
    l_all = tl.sum(tl.load(l_ptr + row, mask=ok, other=0.0) * w, 0)
    o = tl.load(o_ptr + row[:, None].to(tl.int64) * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV),
                other=0.0)
    acc = tl.sum(o * w[:, None], 0)
    return acc / tl.where(l_all == 0.0, 1.0, l_all)


@triton.jit
def _combine(co_ptr, cm_ptr, cl_ptr, so_ptr, sm_ptr, sl_ptr, gate_ptr, out_ptr, sgb, sgh, sob, soh,
             HKV: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, SPLITS: tl.constexpr, TOPN: tl.constexpr,
             NPART: tl.constexpr, BSPL: tl.constexpr, BTOP: tl.constexpr, BWIN: tl.constexpr, BDV: tl.constexpr):
    head = tl.program_id(0)  # one query head: b * hq + h * G + g
    b = head // (HKV * G)
    h = (head // G) % HKV
    g = head % G
    bh = b * HKV + h
    o_cmp = _merge(co_ptr, cm_ptr, cl_ptr, bh, g, 0, SPLITS, SPLITS, G, DV, BSPL, BDV)
    o_slc = _merge(so_ptr, sm_ptr, sl_ptr, bh, g, 0, TOPN, NPART, G, DV, BTOP, BDV)
    o_swa = _merge(so_ptr, sm_ptr, sl_ptr, bh, g, TOPN, NPART - TOPN, NPART, G, DV, BWIN, BDV)
    gp = gate_ptr + b.to(tl.int64) * sgb + (h * G + g) * sgh
    o = tl.load(gp).to(tl.float32) * o_cmp + tl.load(gp + 1).to(tl.float32) * o_slc \
        + tl.load(gp + 2).to(tl.float32) * o_swa
    dv = tl.arange(0, BDV)
    tl.store(out_ptr + b.to(tl.int64) * sob + (h * G + g) * soh + dv, o.to(out_ptr.dtype.element_ty), mask=dv < DV)


def _num_splits(bsz: int, hkv: int, max_cmp: int) -> int:
    """Enough compressed-branch programs to fill the GPU, no split under one tile."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 132
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, bsz * hkv), triton.cdiv(max_cmp, CMP_BN)))


def _check_config(cfg) -> None:
    if cfg.select_block & (cfg.select_block - 1) or cfg.select_block < 16:
        raise ValueError(f"backend='triton' decoding needs NSAConfig.select_block to be a power of two >= 16, got "
                         f"{cfg.select_block}")
    if cfg.compress_block > cfg.select_block or cfg.select_block // cfg.compress_stride > CMP_BN:
        raise ValueError(f"backend='triton' decoding needs NSAConfig.compress_block <= select_block <= "
                         f"{CMP_BN} * compress_stride, got compress_block={cfg.compress_block}, select_block="
                         f"{cfg.select_block}, compress_stride={cfg.compress_stride}")


def topn_launch_args(cfg, nsmax: int, pairs: int, device) -> dict:
    """The top-n's launch arguments shared by ``_topn`` and ``_topn_window`` (``cand``: its scratch)."""
    free = cfg.select_topn - cfg.select_initial - cfg.select_local
    bns = _p2(nsmax)
    nch = min(TOPN_CHUNKS, bns) if free > 0 else 0
    return dict(cand=torch.empty(pairs, TOPN_CANDIDATES, device=device, dtype=torch.int32), SB=cfg.select_block,
                TOPN=cfg.select_topn, INIT=cfg.select_initial, LOCAL=cfg.select_local, BNS=bns,
                BTOP=_p2(cfg.select_topn), NCH=nch, CB=TOPN_CANDIDATES, num_warps=TOPN_WARPS)


def compressed_step(q: torch.Tensor, cache, scale: float):
    """Compressed branch and selection scores: ``(partials (o, m, l) per split, scores [B, hkv, ns])``."""
    cfg = cache.config
    bsz, hq, dk = q.shape
    hkv, dv = cache.num_kv_heads, cache.head_dim_v
    G = hq // hkv
    dev = q.device
    BG, BD, BDV = max(16, _p2(G)), max(16, _p2(dk)), max(16, _p2(dv))
    s_slots = cfg.select_block // cfg.compress_stride
    splits = _num_splits(bsz, hkv, cache.max_cmp)
    chunk = triton.cdiv(triton.cdiv(cache.max_cmp, splits), CMP_BN) * CMP_BN
    f32 = dict(device=dev, dtype=torch.float32)
    co = torch.empty(bsz, hkv, splits, G, dv, **f32)
    cm = torch.empty(bsz, hkv, splits, G, **f32)
    cl = torch.empty_like(cm)
    nt = triton.cdiv(cache.max_cmp, CMP_BN)  # tiles of compressed tokens
    nsp = nt * (CMP_BN // s_slots)  # selection blocks the tiles start
    own = torch.empty(bsz * hkv, G, nsp, **f32)  # per-head partial block scores, relative to the tile's max
    spill = torch.empty_like(own)
    mt = torch.empty(bsz * hkv, G, nt, **f32)
    kc, vc = cache.k_cmp, cache.v_cmp
    _cmp_partial[(bsz * hkv, splits)](
        q, kc, vc, cache.lens, co, cm, cl, own, spill, mt, scale, q.stride(0), q.stride(1), kc.stride(0),
        kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), nsp, nt, HKV=hkv, G=G, DK=dk, DV=dv,
        CL=cfg.compress_block, CS=cfg.compress_stride, SB=cfg.select_block, CHUNK=chunk, SPLITS=splits, BG=BG,
        BD=BD, BDV=BDV, BN=CMP_BN, num_warps=CMP_WARPS, num_stages=CMP_STAGES)
    nsmax = triton.cdiv(cache.max_len, cfg.select_block)
    scores = torch.empty(bsz, hkv, nsmax, **f32)
    _cmp_scores[(bsz * hkv, triton.cdiv(nsmax, SCORES_BJ))](
        own, spill, mt, cache.lens, cm, cl, scores, nsmax, nsp, nt, HKV=hkv, G=G, CL=cfg.compress_block,
        CS=cfg.compress_stride, SB=cfg.select_block, SPLITS=splits, BSPL=_p2(splits), BG=BG, BN=CMP_BN,
        BJ=SCORES_BJ, num_warps=SCORES_WARPS)
    return (co, cm, cl), scores


def decode_triton(q: torch.Tensor, gate: torch.Tensor, cache, scale: float):
    """``(o [B, hq, dv], indices [B, hkv, n])`` for the token at ``cache.lens - 1`` of each sequence."""
    cfg = cache.config
    _check_config(cfg)
    bsz, hq, dk = q.shape
    hkv, dv = cache.num_kv_heads, cache.head_dim_v
    G = hq // hkv
    q = q.contiguous()
    gate = gate.contiguous()
    dev = q.device
    BG, BD, BDV = max(16, _p2(G)), max(16, _p2(dk)), max(16, _p2(dv))
    f32 = dict(device=dev, dtype=torch.float32)
    n = cfg.select_topn
    nwt = triton.cdiv(cfg.window, cfg.select_block)  # window tiles
    per = SPARSE_TILES_PER_PROGRAM
    wper = WINDOW_TILES_PER_PROGRAM
    nslc = triton.cdiv(n, per)
    npart = nslc + triton.cdiv(nwt, wper)
    so = torch.empty(bsz, hkv, npart, G, dv, **f32)
    sm = torch.empty(bsz, hkv, npart, G, **f32)
    sl = torch.empty_like(sm)
    ks, vs, kw, vw = cache.k_slc, cache.v_slc, cache.k_swa, cache.v_swa
    (co, cm, cl), scores = compressed_step(q, cache, scale)
    splits = co.shape[2]
    nsmax = scores.shape[2]
    idx = torch.empty(bsz, hkv, n, device=dev, dtype=torch.int32)
    topn = topn_launch_args(cfg, nsmax, bsz * hkv, dev)
    if WINDOW_IN_TOPN:
        _topn_window[(bsz * hkv * (1 + npart - nslc),)](
            scores, idx, topn.pop("cand"), nsmax, q, kw, vw, cache.lens, so, sm, sl, scale, q.stride(0),
            q.stride(1), kw.stride(0), kw.stride(1), kw.stride(2), vw.stride(0), vw.stride(1), vw.stride(2),
            BH=bsz * hkv, HKV=hkv, G=G, DK=dk, DV=dv, W=cfg.window, NWT=nwt, PER=per, WPER=wper, NSLC=nslc,
            NPART=npart, BG=BG, BD=BD, BDV=BDV, MODE=2, num_stages=SPARSE_STAGES, **topn)
    else:
        _topn[(bsz * hkv,)](scores, cache.lens, idx, topn.pop("cand"), nsmax, HKV=hkv, **topn)
    _sparse_partial[(bsz * hkv, nslc if WINDOW_IN_TOPN else npart)](
        q, ks, vs, kw, vw, cache.lens, idx, so, sm, sl, scale, q.stride(0), q.stride(1),
        ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        kw.stride(0), kw.stride(1), kw.stride(2), vw.stride(0), vw.stride(1), vw.stride(2),
        HKV=hkv, G=G, DK=dk, DV=dv, SB=cfg.select_block, TOPN=n, W=cfg.window, NWT=nwt, PER=per, WPER=wper, NSLC=nslc,
        NPART=npart, BG=BG, BD=BD, BDV=BDV, MODE=1 if WINDOW_IN_TOPN else 0, num_stages=SPARSE_STAGES)
    out = torch.empty(bsz, hq, dv, device=dev, dtype=q.dtype)
    _combine[(bsz * hq,)](co, cm, cl, so, sm, sl, gate, out, gate.stride(0), gate.stride(1), out.stride(0),
                          out.stride(1), HKV=hkv, G=G, DV=dv, SPLITS=splits, TOPN=nslc, NPART=npart, BSPL=_p2(splits),
                          BTOP=_p2(nslc), BWIN=_p2(npart - nslc), BDV=BDV, num_warps=COMBINE_WARPS)
    return out, idx


@triton.jit
def _append_raw(keys_ptr, vals_ptr, lens_ptr, kslc, vslc, kswa, vswa, kraw, vraw, B, MAXLEN, W: tl.constexpr,
                CL: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                BDV: tl.constexpr):
    """The new token's raw K/V of the three branches into the cache: selected (at its position), window ring
    (p % w), compressed-branch ring (p % l). keys/vals ``[3, B, hkv, d]`` stacked in the order cmp, slc, swa."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.load(lens_ptr + b).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    mk, mv = dk < DK, dv < DV
    src_k = keys_ptr + (b * HKV + h) * DK + dk
    src_v = vals_ptr + (b * HKV + h) * DV + dv
    slot = (b * MAXLEN + tl.minimum(p, MAXLEN - 1)) * HKV + h  # a full sequence overwrites its last slot
    tl.store(kslc + slot * DK + dk, tl.load(src_k + B * HKV * DK, mask=mk), mask=mk)
    tl.store(vslc + slot * DV + dv, tl.load(src_v + B * HKV * DV, mask=mv), mask=mv)
    slot = (b * W + p % W) * HKV + h
    tl.store(kswa + slot * DK + dk, tl.load(src_k + 2 * B * HKV * DK, mask=mk), mask=mk)
    tl.store(vswa + slot * DV + dv, tl.load(src_v + 2 * B * HKV * DV, mask=mv), mask=mv)
    slot = (b * CL + p % CL) * HKV + h
    tl.store(kraw + slot * DK + dk, tl.load(src_k, mask=mk), mask=mk)
    tl.store(vraw + slot * DV + dv, tl.load(src_v, mask=mv), mask=mv)


def append_raw(cache, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa) -> None:
    """One launch for the six raw writes of :meth:`NSAKVCache.append` (inputs ``[B, 1, hkv, d]``)."""
    keys = torch.stack([k_cmp[:, 0], k_slc[:, 0], k_swa[:, 0]]).to(cache.k_slc.dtype).contiguous()
    vals = torch.stack([v_cmp[:, 0], v_slc[:, 0], v_swa[:, 0]]).to(cache.v_slc.dtype).contiguous()
    cfg = cache.config
    _append_raw[(cache.batch, cache.num_kv_heads)](
        keys, vals, cache.lens, cache.k_slc, cache.v_slc, cache.k_swa, cache.v_swa, cache.k_raw, cache.v_raw,
        cache.batch, cache.max_len, W=cfg.window, CL=cfg.compress_block, HKV=cache.num_kv_heads, DK=cache.head_dim,
        DV=cache.head_dim_v, BDK=_p2(cache.head_dim), BDV=_p2(cache.head_dim_v))


@triton.jit
def _phi_rows(raw_ptr, out_ptr, bias_ptr, w1_ptr, w2_ptr, b2_ptr, b, n, done, h, MAXC,
              HKV: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, CL: tl.constexpr, CS: tl.constexpr,
              BD: tl.constexpr, BH: tl.constexpr):
    """phi of the block each ``done`` row just completed (ring ``raw [B, l, hkv, D]``) -> ``out[b, blk, h]``."""
    # phi in the cache's dtype with Compression.compress_blocks' arithmetic: the product of each chunk of CS
    # block rows with W1 rounded to it, the chunks and the first layer's bias pe . W1 + b1 (fp32 ``[hkv, HID]``,
    # Compression.first_layer_bias) summed in fp32
    dt = out_ptr.dtype.element_ty
    d = tl.arange(0, BD)
    o = tl.arange(0, BH)
    dm, om = d < D, o < HID
    hid = tl.zeros([b.shape[0], BH], tl.float32) + tl.load(bias_ptr + h * HID + o, mask=om, other=0.0)[None, :]
    for c in range(CL // CS):
        part = tl.zeros([b.shape[0], BH], tl.float32)
        for i in range(CS):  # block row r: one D-wide slice of flatten(block) @ w1
            r = c * CS + i
            slot = (n - CL + r) % CL
            x = tl.load(raw_ptr + ((b * CL + slot) * HKV + h)[:, None] * D + d[None, :],
                        mask=done[:, None] & dm[None, :], other=0.0)
            w = tl.load(w1_ptr + ((h * CL + r) * D + d[:, None]).to(tl.int64) * HID + o[None, :],
                        mask=dm[:, None] & om[None, :], other=0.0).to(dt)
            part += tl.dot(x.to(dt), w)
        hid += part.to(dt).to(tl.float32)
    hid = hid.to(dt).to(tl.float32)
    act = (hid * tl.sigmoid(hid)).to(dt)
    w = tl.load(w2_ptr + (h * HID + o[:, None]) * D + d[None, :], mask=om[:, None] & dm[None, :], other=0.0).to(dt)
    y = tl.dot(act, w).to(dt) + tl.load(b2_ptr + h * D + d, mask=dm, other=0.0).to(dt)[None, :]
    blk = tl.minimum(tl.maximum(n - CL, 0) // CS, MAXC - 1).to(tl.int64)
    tl.store(out_ptr + ((b * MAXC + blk) * HKV + h)[:, None] * D + d[None, :], y, mask=done[:, None] & dm[None, :])


@triton.jit
def _append_compress(lens_ptr, kraw, vraw, kcmp, vcmp, kbias, kw1, kw2, kb2, vbias, vw1, vw2, vb2, B, MAXC,
                     HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HIDK: tl.constexpr, HIDV: tl.constexpr,
                     CL: tl.constexpr, CS: tl.constexpr, BB: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                     BHK: tl.constexpr, BHV: tl.constexpr):
    """Compressed tokens of the blocks the new tokens complete (every ``d`` tokens once ``l`` are there), only for
    those sequences: a step where none completes reads no weights."""
    h = tl.program_id(0)
    b = tl.program_id(1) * BB + tl.arange(0, BB)
    n = tl.load(lens_ptr + b, mask=b < B, other=0) + 1  # tokens once this one is in (lens not yet advanced)
    done = (b < B) & (n >= CL) & ((n - CL) % CS == 0)
    b = b.to(tl.int64)
    if tl.max(done.to(tl.int32), 0) > 0:
        if tl.program_id(2) == 0:
            _phi_rows(kraw, kcmp, kbias, kw1, kw2, kb2, b, n, done, h, MAXC, HKV, DK, HIDK, CL, CS, BDK, BHK)
        else:
            _phi_rows(vraw, vcmp, vbias, vw1, vw2, vb2, b, n, done, h, MAXC, HKV, DV, HIDV, CL, CS, BDV, BHV)


def append_compress(cache) -> None:
    """After :func:`append_raw`: phi of every block the new tokens complete, written to the compressed cache."""
    cfg = cache.config
    ck, cv = cache.compress_k, cache.compress_v
    ps = [t.detach().contiguous() for m, bias in zip((ck, cv), cache.phi_bias) for t in (bias, m.w1, m.w2, m.b2)]
    bb = APPEND_ROWS
    _append_compress[(cache.num_kv_heads, triton.cdiv(cache.batch, bb), 2)](
        cache.lens, cache.k_raw, cache.v_raw, cache.k_cmp, cache.v_cmp, *ps, cache.batch, cache.max_cmp,
        HKV=cache.num_kv_heads, DK=cache.head_dim, DV=cache.head_dim_v, HIDK=ck.hidden, HIDV=cv.hidden,
        CL=cfg.compress_block, CS=cfg.compress_stride, BB=bb, BDK=max(16, _p2(cache.head_dim)),
        BDV=max(16, _p2(cache.head_dim_v)), BHK=max(16, _p2(ck.hidden)), BHV=max(16, _p2(cv.hidden)))
