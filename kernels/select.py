"""Selected-block attention in Triton: query-major at G >= 16, KV-block-major below; dK/dV KV-block-major.

Forward / dq, G >= 16: one program per (query position, KV head) loads all query heads of the GQA group together
(the paper's group-centric loading) and loops over that position's n blocks with a counted loop, which Triton
pipelines (the next block's K/V load overlaps this block's products); in the NSA core the window kernels did the
forced blocks already and these loops walk the rest of each list (forced.py).
dK/dV: one program per (selection block, KV head) walks the queries that selected it (an inverted block -> queries
index built with one sort), stacking ``BLOCK_Q`` positions x ``G`` heads as rows, so there are no per-token atomics
(one fp32 add per work item) and the matrix tiles are full even for small G (FSA's KV-block-major idea). In the NSA
core (forced blocks, G >= 16) that pass runs first and stores its dS tiles, and dq reads them with K instead of
recomputing them from K and V (``SEL_DQ_FROM_DS``, :func:`_backward_ds_handoff`).
Small G (fewer than 16 rows a position): the forward walks the same inverted index (:func:`_forward_kmajor`: a
block's queries in full tiles, each query's softmax over that block kept, then merged per position), and dq comes
from the dS tiles as above (``SEL_DQ_FROM_DS_SMALL_G``). The union walk (a tile of neighbouring positions walking
the union of their sorted lists, 64 rows) remains behind the switches.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import (_bwd_rows, _delta_args, _finish, _gated, _grad_args, _load_tile, _own_delta, _q_tile, _rows,
                    _seq_bounds, _softmax_step, _store_grad_tile, _store_tile, kv_descriptors, row_dot, tma_ok,
                    wide_tile_stages)
from .forced import forced_blocks, free_range, resume
from .gate import _gated_sum
from .varlen import max_seqlen


@triton.jit
def _first_ptr(IDX, idx_row, rvalid, LO, N: tl.constexpr, NP: tl.constexpr):
    """Where each row's walk starts: the number of its (ascending) blocks below ``LO``."""
    c = tl.arange(0, NP)
    e = tl.load(IDX + idx_row[:, None] * N + c[None, :], mask=rvalid[:, None] & (c[None, :] < N), other=-1)
    return tl.sum(((e >= 0) & (e < LO)).to(tl.int32), 1)


@triton.jit
def _next_block(IDX, idx_row, ptr, rvalid, HI, N: tl.constexpr):
    """Each row's current block in its (ascending, -1 padded) list; exhausted rows, and blocks at or past ``HI``
    (not in this key buffer), give 1 << 30."""
    cur = tl.load(IDX + idx_row * N + ptr, mask=rvalid & (ptr < N), other=-1)
    return tl.where((cur < 0) | (cur >= HI), 1 << 30, cur)


@triton.jit
def _walk_start(IDX, idx_row, rvalid, LO, HI, ROWS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    ptr = tl.zeros([ROWS], dtype=tl.int32)
    if LO > 0:  # a key buffer that starts later (a context-parallel ring step): skip the earlier blocks
        ptr = _first_ptr(IDX, idx_row, rvalid, LO, N, NP)
    return ptr, _next_block(IDX, idx_row, ptr, rvalid, HI, N)


@triton.jit
def _walk_tile(CU, T_FIXED, TK_FIXED, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr,
               GP: tl.constexpr, VARLEN: tl.constexpr):
    """A union-walk program's sequence bounds, KV head, first position, and its rows: positions, offsets into the
    ``[.., hq]`` tensors and into the ``[.., hkv]`` block lists, validity."""
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    row = bos + tq.to(tl.int64)
    return bos, T, kbos, TK, kvh, t0, tq, row * HQ + hq, row * HKV + kvh, rvalid


@triton.jit
def _walk_on(IDX, idx_row, ptr, hit, rvalid, HI, N: tl.constexpr):
    """One step of the union walk: rows whose block was ``hit`` move to their next; the walk's next block."""
    ptr += hit.to(tl.int32)
    cur = _next_block(IDX, idx_row, ptr, rvalid, HI, N)
    return ptr, cur, tl.min(cur, 0)


@triton.jit
def _block_keys(blk, kbos, KBASE, TK, kvh, HKV: tl.constexpr, BS: tl.constexpr):
    """Selection block ``blk``'s key positions (queries' frame), which of them lie in the key buffer (it starts at
    ``KBASE`` and holds ``TK`` keys of the sequence starting at row ``kbos``) and their rows of ``[.., hkv, d]``."""
    pos = blk * BS + tl.arange(0, BS)
    return pos, (pos >= KBASE) & (pos - KBASE < TK), (kbos + (pos - KBASE).to(tl.int64)) * HKV + kvh


@triton.jit
def _block_kv(K, V, blk, kbos, KBASE, TK, kvh, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, KD=None, VD=None, TMA: tl.constexpr = False):
    """Positions (queries' frame) and K/V tiles of selection block ``blk``; the key buffer starts at ``KBASE``.

    ``TMA``: the tiles come from the descriptors ``KD``/``VD`` (``flash.kv_descriptors``). A block is then read
    whole even where it runs past this sequence's keys (into the next sequence, or TMA's zeros past the tensor):
    such keys lie after every query of the sequence, so the callers' causal mask drops them; blocks that straddle
    a context-parallel key buffer's edge do not occur (chunks are whole blocks)."""
    pos, pvalid, kv_off = _block_keys(blk, kbos, KBASE, TK, kvh, HKV, BS)
    if TMA:
        row = (kbos + blk * BS - KBASE).to(tl.int32)
        return pos, KD.load([row, kvh, 0]).reshape(BS, BDK), VD.load([row, kvh, 0]).reshape(BS, BDV)
    return pos, _load_tile(K, kv_off, pvalid, DK, BDK), _load_tile(V, kv_off, pvalid, DV, BDV)


@triton.jit
def _own_blocks(IDX, idx_row, LO, HI, N: tl.constexpr, NP: tl.constexpr):
    """``[i_lo, i_hi)``: where one position's ascending, -1 padded block list lies inside ``[LO, HI)``."""
    c = tl.arange(0, NP)
    e = tl.load(IDX + idx_row * N + c, mask=c < N, other=-1)
    return tl.sum(((e >= 0) & (e < LO)).to(tl.int32), 0), tl.sum(((e >= 0) & (e < HI)).to(tl.int32), 0)


@triton.jit
def _position_blocks(IDX, bos, t0, kvh, hq, LO, HI, HQ: tl.constexpr, HKV: tl.constexpr, N: tl.constexpr,
                     NP: tl.constexpr):
    """One position's query-row offsets, where its block list starts in IDX, and the list's range inside
    ``[LO, HI)``."""
    row = bos + t0.to(tl.int64)
    i_lo, i_hi = _own_blocks(IDX, row * HKV + kvh, LO, HI, N, NP)
    return row * HQ + hq, (row * HKV + kvh) * N, i_lo, i_hi


@triton.jit
def _listed_block_kv(IDX, list_start, i, K, V, kbos, KBASE, TK, kvh, HKV: tl.constexpr, DK: tl.constexpr,
                     DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, KD, VD,
                     TMA: tl.constexpr):
    """Positions and K/V tiles of the ``i``-th block in a position's list."""
    blk = tl.load(IDX + list_start + i)
    return _block_kv(K, V, blk, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS, KD, VD, TMA)


@triton.jit
def _store_output(O, LSE, row_off, rvalid, o, lse, DV: tl.constexpr, BDV: tl.constexpr, OC, OW, GATE, OUT,
                  GATED_SUM: tl.constexpr):
    """The branch's output and lse; with ``GATED_SUM`` also the NSA output from the other two branches' outputs
    ``OC`` / ``OW`` and the gate (gate.py's pass, fused: at 64k it saves that pass's 1.4 ms on an H100 for ~0.3
    ms more here, where the epilogue's HBM traffic hides behind the K/V blocks' L2 traffic)."""
    _store_tile(O, row_off, rvalid, o, DV, BDV)
    tl.store(LSE + row_off, lse, mask=rvalid)
    if GATED_SUM:
        d = tl.arange(0, BDV)
        m = rvalid[:, None] & (d[None, :] < DV)
        off = row_off[:, None] * DV + d[None, :]
        o_slc = o.to(O.dtype.element_ty).to(tl.float32)  # as the gate pass reads it back
        _store_tile(OUT, row_off, rvalid, _gated_sum(OC, o_slc, OW, GATE, row_off, rvalid, off, m), DV, BDV)


@triton.jit
def _sel_fwd_loop_kernel(Q, K, V, IDX, O, LSE, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, scale,
                         HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                         NP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                         BDV: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr, OC=None, OW=None, GATE=None,
                         OUT=None, GATED_SUM: tl.constexpr = False, KD=None, VD=None, TMA: tl.constexpr = False,
                         FORCED: tl.constexpr = False, INITIAL: tl.constexpr = 0, LOCAL: tl.constexpr = 0):
    # FORCED: O / LSE hold the partial over the forced blocks (forced.py); walk the other blocks from there
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU, T_FIXED, TK_FIXED, HKV, 1, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off, list_start, i_lo, i_hi = _position_blocks(IDX, bos, t0, kvh, hq, LO, HI, HQ, HKV, N, NP)
    q = _load_tile(Q, row_off, rvalid, DK, BDK)
    qk_scale = scale * 1.4426950408889634
    if FORCED:
        i_lo, i_hi = free_range(t0, i_hi, BS, INITIAL, LOCAL)
        m_i, l_i, acc = resume(O, LSE, row_off, rvalid, DV, BDV)
    else:
        m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, BDV], dtype=tl.float32)
    for i in range(i_lo, i_hi):
        pos, k, v = _listed_block_kv(IDX, list_start, i, K, V, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS,
                                     KD, VD, TMA)
        s = tl.where((pos <= t0 + QOFF)[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale)
    o, lse = _finish(acc, m_i, l_i)  # no block in this key buffer: o = 0, lse = -inf
    _store_output(O, LSE, row_off, rvalid, o, lse, DV, BDV, OC, OW, GATE, OUT, GATED_SUM)


@triton.jit
def _sel_dq_loop_kernel(Q, K, V, IDX, DO, LSE, DELTA, DQ, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, scale,
                        HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                        NP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                        BDV: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr,
                        DQ_ADD: tl.constexpr = False, GATE=None, GATED: tl.constexpr = False, O=None,
                        DELTA_FROM_O: tl.constexpr = False, KD=None, VD=None, TMA: tl.constexpr = False,
                        FORCED: tl.constexpr = False, INITIAL: tl.constexpr = 0, LOCAL: tl.constexpr = 0):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU, T_FIXED, TK_FIXED, HKV, 1, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off, list_start, i_lo, i_hi = _position_blocks(IDX, bos, t0, kvh, hq, LO, HI, HQ, HKV, N, NP)
    if FORCED:  # the window's dq kernel did the forced blocks (forced.py)
        i_lo, i_hi = free_range(t0, i_hi, BS, INITIAL, LOCAL)
    q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, GATED)
    if DELTA_FROM_O:
        delta = _own_delta(O, DELTA, do, row_off, rvalid, DV, BDV)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([GP, BDK], dtype=tl.float32)
    for i in range(i_lo, i_hi):
        pos, k, v = _listed_block_kv(IDX, list_start, i, K, V, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS,
                                     KD, VD, TMA)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where((pos <= t0 + QOFF)[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _store_grad_tile(DQ, row_off, rvalid, _gated(dq, g[:, None], GATED) * scale, DK, BDK, DQ_ADD)


@triton.jit
def _sel_fwd_kernel(Q, K, V, IDX, O, LSE, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, scale,
                    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                    NP: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr,
                    BLOCK_T: tl.constexpr, VARLEN: tl.constexpr, OC=None, OW=None, GATE=None, OUT=None,
                    GATED_SUM: tl.constexpr = False):
    # Rows are BLOCK_T neighbouring positions x the G heads of one KV head. The program walks the union of the
    # rows' sorted block lists (a k-way merge): neighbours share most blocks, so each K/V block is loaded once per
    # tile and the matrix products have BLOCK_T*GP rows instead of G.
    bos, T, kbos, TK, kvh, t0, tq, row_off, idx_row, rvalid = _walk_tile(CU, T_FIXED, TK_FIXED, HQ, HKV, BLOCK_T,
                                                                         G, GP, VARLEN)
    if t0 >= T:
        return
    q = _load_tile(Q, row_off, rvalid, DK, BDK)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_T * GP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T * GP, BDV], dtype=tl.float32)
    ptr, cur = _walk_start(IDX, idx_row, rvalid, LO, HI, BLOCK_T * GP, N, NP)
    blk = tl.min(cur, 0)
    while blk < (1 << 30):
        hit = cur == blk
        pos, k, v = _block_kv(K, V, blk, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS)
        s = tl.dot(q, tl.trans(k))
        s = tl.where(hit[:, None] & (pos[None, :] <= tq[:, None] + QOFF), s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale)
        ptr, cur, blk = _walk_on(IDX, idx_row, ptr, hit, rvalid, HI, N)
    o, lse = _finish(acc, m_i, l_i)  # rows with no block in this key buffer: o = 0, lse = -inf
    _store_output(O, LSE, row_off, rvalid, o, lse, DV, BDV, OC, OW, GATE, OUT, GATED_SUM)


@triton.jit
def _sel_bwd_dq_kernel(Q, K, V, IDX, DO, LSE, DELTA, DQ, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, scale,
                       HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                       NP: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr,
                       BLOCK_T: tl.constexpr, VARLEN: tl.constexpr,
                       DQ_ADD: tl.constexpr = False, GATE=None, GATED: tl.constexpr = False, O=None,
                       DELTA_FROM_O: tl.constexpr = False):
    bos, T, kbos, TK, kvh, t0, tq, row_off, idx_row, rvalid = _walk_tile(CU, T_FIXED, TK_FIXED, HQ, HKV, BLOCK_T,
                                                                         G, GP, VARLEN)
    if t0 >= T:
        return
    q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, GATED)
    if DELTA_FROM_O:
        delta = _own_delta(O, DELTA, do, row_off, rvalid, DV, BDV)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_T * GP, BDK], dtype=tl.float32)
    ptr, cur = _walk_start(IDX, idx_row, rvalid, LO, HI, BLOCK_T * GP, N, NP)
    blk = tl.min(cur, 0)
    while blk < (1 << 30):
        hit = cur == blk
        pos, k, v = _block_kv(K, V, blk, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(hit[:, None] & (pos[None, :] <= tq[:, None] + QOFF), tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        ptr, cur, blk = _walk_on(IDX, idx_row, ptr, hit, rvalid, HI, N)
    _store_grad_tile(DQ, row_off, rvalid, _gated(dq, g[:, None], GATED) * scale, DK, BDK, DQ_ADD)


@triton.jit
def _work_item(ITEM_KEY, ITEM_START, ITEM_END):
    """``(start, end, key)`` of this program's work item (:func:`work_items`; empty when ``start >= end``)."""
    item = tl.program_id(0)
    return tl.load(ITEM_START + item), tl.load(ITEM_END + item), tl.load(ITEM_KEY + item)


@triton.jit
def _item_rows(QLIST, q0, end, bos, kvh, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr):
    """A work item's rows in one step, ``ROWS / GP`` queries of its list from ``q0`` x GP heads: ``(list places, head
    in group, validity, positions, query row offsets)``."""
    r = tl.arange(0, ROWS)
    hg = r % GP
    qi = q0 + r // GP
    rvalid = (qi < end) & (hg < G)
    tq = tl.load(QLIST + qi, mask=rvalid, other=0)
    return qi, hg, rvalid, tq, (bos + tq.to(tl.int64)) * HQ + kvh * G + hg


@triton.jit
def _item_block(K, V, key, CU, T_FIXED, TK_FIXED, KBASE, NS_MAX, HKV: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr):
    """The block of a KV-block-major work item (``key`` = (sequence, KV head, block)): its id, KV head, the
    sequence's first row, the block's key positions, which lie in the key buffer, their K/V rows and tiles."""
    blk = key % NS_MAX
    kvh = (key // NS_MAX) % HKV
    bos, T, kbos, TK = _seq_bounds(key // (NS_MAX * HKV), CU, CU, T_FIXED, TK_FIXED, VARLEN)
    pos, pvalid, kv_off = _block_keys(blk, kbos, KBASE, TK, kvh, HKV, BS)
    return blk, kvh, bos, pos, pvalid, kv_off, _load_tile(K, kv_off, pvalid, DK, BDK), _load_tile(V, kv_off, pvalid,
                                                                                                 DV, BDV)


@triton.jit
def _sel_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_, DV_, QLIST, ITEM_KEY, ITEM_START, ITEM_END, CU, T_FIXED,
                         TK_FIXED, QOFF, KBASE, NS_MAX, scale,
                         HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                         DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                         BS: tl.constexpr, BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr, GATE=None,
                         GATED: tl.constexpr = False, DSB=None, OFFS=None, PAIR0=0, PAIR1=0,
                         STORE_DS: tl.constexpr = False, INITIAL: tl.constexpr = 0, LOCAL: tl.constexpr = 0,
                         STORE_DQ: tl.constexpr = False):
    # STORE_DS: only the items of (sequence, KV head) pairs [PAIR0, PAIR1), whose dS tiles (gated, as dq needs
    # them) go to DSB from the pairs' first list entry (OFFS = the index's offsets) on, so that dq
    # (_sel_dq_ds_kernel) reads dS and K instead of recomputing q k^T and dO v^T from K and V. STORE_DQ (G < 16,
    # no forced blocks): the same items, each entry's dq share over this block, dS K ([GP, BDK] in the input dtype,
    # before the softmax scale), goes to DSB instead, so that dq (_sel_dq_sum_kernel) only sums a position's shares
    start, end, key = _work_item(ITEM_KEY, ITEM_START, ITEM_END)
    if start >= end:
        return
    if STORE_DS or STORE_DQ:
        if (key // NS_MAX < PAIR0) | (key // NS_MAX >= PAIR1):
            return
        ds_row0 = start - tl.load(OFFS + PAIR0 * NS_MAX).to(tl.int64)  # this item's first tile in DSB
    blk, kvh, bos, pos, pvalid, kv_off, k, v = _item_block(K, V, key, CU, T_FIXED, TK_FIXED, KBASE, NS_MAX, HKV, DK,
                                                           DV, BDK, BDV, BS, VARLEN)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    qk_scale = scale * 1.4426950408889634
    dk_acc = tl.zeros([BS, BDK], dtype=tl.float32)
    dv_acc = tl.zeros([BS, BDV], dtype=tl.float32)
    r = tl.arange(0, BLOCK_Q * GP)
    for q0 in range(start, end, BLOCK_Q):
        qi, hg, rvalid, tq, row_off = _item_rows(QLIST, q0, end, bos, kvh, HQ, G, GP, BLOCK_Q * GP)
        q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, GATED)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        vis = (pos[None, :] <= tq[:, None] + QOFF) & rvalid[:, None]
        p = _gated(tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0), g[:, None], GATED)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            _store_ds(DSB, ds_row0 + (q0 - start), r, rvalid, tq + QOFF, blk, ds.to(q.dtype), GP, BS, INITIAL,
                      LOCAL)
        if STORE_DQ:  # every entry, a block in the query's future too (its zero share): dq sums all of them
            dqp = tl.dot(ds.to(q.dtype), k)
            tl.store(DSB + (ds_row0 + (q0 - start)) * (GP * BDK) + r[:, None] * BDK + dk[None, :],
                     dqp.to(DSB.dtype.element_ty), mask=rvalid[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q)
    # several work items may share a block (block 0 is every query's): partial tiles meet in fp32
    tl.atomic_add(DK_ + kv_off[:, None] * DK + dk[None, :], dk_acc * scale, mask=pvalid[:, None] & (dk[None, :] < DK))
    tl.atomic_add(DV_ + kv_off[:, None] * DV + dv[None, :], dv_acc, mask=pvalid[:, None] & (dv[None, :] < DV))


@triton.jit
def _sel_fwd_kmajor_kernel(Q, K, V, OP, LP, QLIST, ITEM_KEY, ITEM_START, ITEM_END, OFFS, CU, T_FIXED, TK_FIXED,
                           QOFF, KBASE, NS_MAX, PAIR0, PAIR1, scale,
                           HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                           DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                           BS: tl.constexpr, BLOCK_Q: tl.constexpr, VARLEN: tl.constexpr):
    # The forward at G < 16, KV-block-major (FSA's layout): one work item of the inverted index loads its block's
    # K/V once and attends its queries BLOCK_Q positions x GP heads at a time (full matrix tiles however small G
    # is); each query's softmax over this block alone, (o, lse) as _finish gives them, goes to OP / LP at the
    # entry's place in the index, counted from the first entry of pair PAIR0. _sel_merge_kernel combines a position's.
    start, end, key = _work_item(ITEM_KEY, ITEM_START, ITEM_END)
    if start >= end:
        return
    if (key // NS_MAX < PAIR0) | (key // NS_MAX >= PAIR1):
        return
    first = tl.load(OFFS + PAIR0 * NS_MAX).to(tl.int64)
    blk, kvh, bos, pos, pvalid, kv_off, k, v = _item_block(K, V, key, CU, T_FIXED, TK_FIXED, KBASE, NS_MAX, HKV, DK,
                                                           DV, BDK, BDV, BS, VARLEN)
    qk_scale = scale * 1.4426950408889634
    for q0 in range(start, end, BLOCK_Q):
        qi, hg, rvalid, tq, row_off = _item_rows(QLIST, q0, end, bos, kvh, HQ, G, GP, BLOCK_Q * GP)
        q = _load_tile(Q, row_off, rvalid, DK, BDK)
        s = tl.dot(q, tl.trans(k))
        s = tl.where(pvalid[None, :] & (pos[None, :] <= tq[:, None] + QOFF), s, float("-inf"))
        # finite for a block wholly in a query's future (lists not from top-n): p = 0 there, _finish's empty row
        m = tl.maximum(tl.max(s, 1) * qk_scale, -1.0e30)
        p = tl.exp2(s * qk_scale - m[:, None])
        o, lse = _finish(tl.dot(p.to(v.dtype), v), m, tl.sum(p, 1))
        slot = (qi - first) * GP + hg
        _store_tile(OP, slot, rvalid, o, DV, BDV)
        tl.store(LP + slot, lse, mask=rvalid)


@triton.jit
def _pair_position(CU, T_FIXED, TK_FIXED, P0, PAIR0, OFFS, NS_MAX, HKV: tl.constexpr, VARLEN: tl.constexpr):
    """A per-position program over the inverted index's pairs [PAIR0, ..): its KV head, sequence bounds, position
    (``P0`` + program 0; past the sequence when ``t0 >= T``) and where pair PAIR0's first entry lies in the index
    (the start of the buffers that hold the entries' tiles or partials)."""
    pair = PAIR0 + tl.program_id(1)
    bos, T, kbos, TK = _seq_bounds(pair // HKV, CU, CU, T_FIXED, TK_FIXED, VARLEN)
    return pair % HKV, bos, T, kbos, TK, P0 + tl.program_id(0), tl.load(OFFS + PAIR0 * NS_MAX).to(tl.int64)


@triton.jit
def _pair_list(IDX, bos, t0, kvh, LO, HI, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
               N: tl.constexpr, NP: tl.constexpr):
    """A per-position program's rows (the group's heads, padded to ``ROWS``) and its block list: ``(rvalid,
    row_off, list_start, i_lo, i_hi)``, the list's range inside ``[LO, HI)``."""
    tq, hq, rvalid = _rows(t0, kvh, 1, G, ROWS)
    row_off, list_start, i_lo, i_hi = _position_blocks(IDX, bos, t0, kvh, hq, LO, HI, HQ, HKV, N, NP)
    return rvalid, row_off, list_start, i_lo, i_hi


@triton.jit
def _sel_merge_kernel(IDX, SLOT, OP, LP, O, LSE, OFFS, CU, T_FIXED, TK_FIXED, P0, PAIR0, NS_MAX, LO, HI,
                      HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                      NP: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, VARLEN: tl.constexpr, OC=None,
                      OW=None, GATE=None, OUT=None, GATED_SUM: tl.constexpr = False):
    # One position (P0 + program 0) of (sequence, KV head) pair PAIR0 + program 1: its blocks' partial softmaxes
    # from _sel_fwd_kmajor_kernel (SLOT: where each index entry lies in the index's order) merged by log-sum-exp
    kvh, bos, T, kbos, TK, t0, first = _pair_position(CU, T_FIXED, TK_FIXED, P0, PAIR0, OFFS, NS_MAX, HKV, VARLEN)
    if t0 >= T:
        return
    rvalid, row_off, list_start, i_lo, i_hi = _pair_list(IDX, bos, t0, kvh, LO, HI, HQ, HKV, G, GP, N, NP)
    hg = tl.arange(0, GP)
    m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, BDV], dtype=tl.float32)
    for i in range(i_lo, i_hi):
        slot = (tl.load(SLOT + list_start + i) - first) * GP + hg
        lse2 = tl.load(LP + slot, mask=rvalid, other=-1.0e30) * 1.4426950408889634
        m_new = tl.maximum(m_i, lse2)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse2 - m_new)
        acc = acc * alpha[:, None] + _load_tile(OP, slot, rvalid, DV, BDV).to(tl.float32) * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    o, lse = _finish(acc, m_i, l_i)  # rows with no block in this key buffer: o = 0, lse = -inf
    _store_output(O, LSE, row_off, rvalid, o, lse, DV, BDV, OC, OW, GATE, OUT, GATED_SUM)


@triton.jit
def _sel_dq_sum_kernel(IDX, SLOT, DQB, DQ, OFFS, CU, T_FIXED, TK_FIXED, P0, PAIR0, NS_MAX, LO, HI, scale,
                       HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                       NP: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, VARLEN: tl.constexpr,
                       ADD: tl.constexpr = True):
    # One position (P0 + program 0) of (sequence, KV head) pair PAIR0 + program 1: its dq, the sum of the per-block
    # shares the dK/dV pass stored (STORE_DQ; SLOT: where each index entry's share lies in the index's order), of
    # the blocks in this key buffer; ADD: onto DQ (the NSA core's other branches' dq), else stored
    kvh, bos, T, kbos, TK, t0, first = _pair_position(CU, T_FIXED, TK_FIXED, P0, PAIR0, OFFS, NS_MAX, HKV, VARLEN)
    if t0 >= T:
        return
    rvalid, row_off, list_start, i_lo, i_hi = _pair_list(IDX, bos, t0, kvh, LO, HI, HQ, HKV, G, GP, N, NP)
    hg = tl.arange(0, GP)
    dq = tl.zeros([GP, BDK], dtype=tl.float32)
    for i in range(i_lo, i_hi):
        slot = (tl.load(SLOT + list_start + i) - first) * GP + hg
        dq += _load_tile(DQB, slot, rvalid, BDK, BDK).to(tl.float32)
    _store_grad_tile(DQ, row_off, rvalid, dq * scale, DK, BDK, ADD)


@triton.jit
def _store_ds(DSB, q0, r, rvalid, tq, blk, ds, GP: tl.constexpr, BS: tl.constexpr, INITIAL: tl.constexpr,
              LOCAL: tl.constexpr):
    """A dK/dV step's dS rows (queries ``q0 ..`` (int64) of the inverted index x GP heads) to ``DSB [entries, GP,
    BS]`` in the index's order: one contiguous tile, cheap addresses (at the entries' own places in ``indices`` it
    took 27% more instructions a step, sm_90 SASS). Forced blocks are left out (the window's dq kernel does them);
    a block wholly in the query's future (lists not from top-n) is stored, its zero tile, as dq walks it."""
    a, first_local, own = forced_blocks(tq, BS, INITIAL, LOCAL)
    free = rvalid & (blk >= a) & ((blk < first_local) | (blk > own))
    off = r[:, None] * BS + tl.arange(0, BS)[None, :]
    tl.store(DSB + q0 * (GP * BS) + off, ds, mask=free[:, None])


@triton.jit
def _sel_dq_ds_kernel(K, IDX, SLOT, DSB, DQ, OFFS, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, P0, PAIR0, NS_MAX,
                      scale,
                      HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                      NP: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr,
                      INITIAL: tl.constexpr, LOCAL: tl.constexpr, KD=None, TMA: tl.constexpr = False,
                      RP: tl.constexpr = 16, ADD: tl.constexpr = True):
    # One position (P0 + program 0) of (sequence, KV head) pair PAIR0 + program 1 and its dq over its chosen (not
    # forced) blocks from the dS tiles the dK/dV pass stored (``SLOT``: where each index entry's tile lies in the
    # index's order; DSB starts at pair PAIR0's first entry): per block a [G, BS] tile and K, one product (the
    # recomputing loop reads K and V and does three). RP = max(GP, 16) rows: a product takes at least 16 (G < 16
    # pads with zero rows). ADD: the dq adds onto DQ (the NSA core's other branches' dq), else is stored. Only the
    # blocks in this key buffer ([LO, HI), keys from KBASE on; queries at QOFF on: a context-parallel ring step)
    kvh, bos, T, kbos, TK, t0, first = _pair_position(CU, T_FIXED, TK_FIXED, P0, PAIR0, OFFS, NS_MAX, HKV, VARLEN)
    if t0 >= T:
        return
    rvalid, row_off, list_start, i_lo, i_hi = _pair_list(IDX, bos, t0, kvh, LO, HI, HQ, HKV, G, RP, N, NP)
    a, i_hi = free_range(t0 + QOFF, i_hi, BS, INITIAL, LOCAL)
    i_lo = tl.maximum(i_lo, a)
    h = tl.arange(0, RP)
    h_off = h[:, None] * BS + tl.arange(0, BS)[None, :]
    dq = tl.zeros([RP, BDK], dtype=tl.float32)
    for i in range(i_lo, i_hi):
        blk = tl.load(IDX + list_start + i)
        if TMA:
            k = KD.load([(kbos + blk * BS - KBASE).to(tl.int32), kvh, 0]).reshape(BS, BDK)
        else:
            # named, not "_": a name bound before a loop and again inside is loop-carried, its shape fixed
            kpos, pvalid, kv_off = _block_keys(blk, kbos, KBASE, TK, kvh, HKV, BS)
            k = _load_tile(K, kv_off, pvalid, DK, BDK)
        tile = DSB + (tl.load(SLOT + list_start + i) - first) * (GP * BS) + h_off
        ds = tl.load(tile) if RP == GP else tl.load(tile, mask=(h < GP)[:, None], other=0.0)
        dq += tl.dot(ds, k)
    _store_grad_tile(DQ, row_off, rvalid, dq * scale, DK, BDK, ADD)


def sequence_ids(b: int, t: int, cu_seqlens: Optional[torch.Tensor], device):
    """``(seq [b*t], local_t [b*t])`` of every token row of a fixed-length or packed batch."""
    rows = torch.arange(b * t, device=device)
    if cu_seqlens is None:
        return rows // t, rows % t
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    return seq, rows - cu_seqlens.long()[seq]


def invert_block_indices(indices: torch.Tensor, ns_max: int, cu_seqlens: Optional[torch.Tensor], lo: int = 0,
                         hi: Optional[int] = None, entries: bool = False, positions: Optional[tuple] = None):
    """Inverted index: for each (sequence, KV head, block), the local positions of the queries that selected it.

    indices ``[b, t, hkv, n]`` -> ``(qlist [b*t*hkv*n] int32, offsets [nseq*hkv*ns_max + 1] int32)``: list ``i``
    is ``qlist[offsets[i]:offsets[i+1]]``, ascending; only blocks in ``[lo, hi)`` (those in the key buffer at
    hand) are listed, and with ``positions = (s, e)`` only queries at local positions ``[s, e)`` of their sequence
    (a packed batch's query chunk); the rest sort past the last list. No host sync (no boolean indexing, no
    bincount), so the backward keeps the GPU queue full. ``entries``: also each listed query's entry in ``indices``
    (the flat index ``(row * hkv + kvh) * n + i``), int32 where it fits.
    """
    b, t, hkv, n = indices.shape
    seq, local_t = sequence_ids(b, t, cu_seqlens, indices.device)
    nseq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    total = nseq * hkv * ns_max
    blk = indices.reshape(b * t, hkv, n).long()
    key = (seq[:, None, None] * hkv + torch.arange(hkv, device=indices.device)[None, :, None]) * ns_max + blk
    keep = blk >= lo
    if hi is not None:
        keep &= blk < hi
    if positions is not None:
        keep &= ((local_t >= positions[0]) & (local_t < positions[1]))[:, None, None]
    key = torch.where(keep, key, total).flatten()
    if total < 2**31 - 1:
        key = key.to(torch.int32)  # half the radix passes
    sorted_key, order = torch.sort(key, stable=True)
    qlist = local_t.to(torch.int32).repeat_interleave(hkv * n)[order]
    offsets = torch.searchsorted(sorted_key, torch.arange(total + 1, device=indices.device, dtype=key.dtype))
    if entries:
        return qlist.contiguous(), offsets.to(torch.int32), order.to(torch.int32) if key.numel() < 2**31 else order
    return qlist.contiguous(), offsets.to(torch.int32)


def work_items(offsets: torch.Tensor, max_entries: int, chunk: int):
    """Split every block's query list into items of at most ``chunk`` queries, without a host sync.

    Returns ``(key, start, end)`` int32 of a fixed upper-bound length; surplus items are empty (start == end).
    """
    counts = (offsets[1:] - offsets[:-1]).long()
    n_chunks = (counts + chunk - 1) // chunk
    cum = torch.cumsum(n_chunks, 0)
    n_items = max_entries // chunk + counts.numel() + 1
    i = torch.arange(n_items, device=offsets.device)
    key = torch.searchsorted(cum, i, right=True)
    real = key < counts.numel()
    key = key.clamp_max(counts.numel() - 1)
    first = cum[key] - n_chunks[key]
    start = offsets[:-1].long()[key] + (i - first) * chunk
    end = torch.minimum(start + chunk, offsets[1:].long()[key])
    start = torch.where(real, start, end)
    return key.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


SEL_BWD_CHUNK = 256  # query positions per dK/dV work item
# ... and from SEL_BWD_LONG_ENTRIES (position, KV head, block) entries on: fewer, longer items (fewer fp32 atomics)
# still fill the GPU; H100 at 64k (4M entries): 12.7 ms against 13.3 (benchmarks/tile_sweep.py)
SEL_BWD_CHUNK_LONG, SEL_BWD_LONG_ENTRIES = 1024, 1 << 22
SEL_TMA = True  # the per-position loop kernels (G >= 16) fetch K/V blocks by TMA where flash.tma_ok allows
SEL_WIDE_STAGES = 2  # pipeline stages of 256-wide tiles (head dims above 128); H100 192/128 64k: fwd+bwd 146 -> 98 ms
# With forced blocks (the NSA core, G >= 16): the dK/dV pass stores every chosen block's dS tile and dq reads them
# with K (1 product, K only) instead of recomputing them from K and V (3 products): 32 KiB per query row and KV
# head at G = 16, n = 16, bf16 (2 GiB per KV head at 64k), at most SEL_DS_BUFFER_BYTES of them at once (see
# _backward_ds_handoff: groups of (sequence, KV head) pairs, or query chunks)
SEL_DQ_FROM_DS = True
SEL_DS_BUFFER_BYTES = 2 << 30
# Measured and dropped (H100 at 64k, twenty-fourth session): the dS-storing dK/dV pass with its block's K/V loaded
# in every step instead of held in (spilling) registers, 25.0 ms against 17.3; whole steps' dS tiles by TMA stores,
# 17.05 against 17.47 with the core's fwd+bwd unchanged (docs/benchmarks.md)

# G < 16: the forward KV-block-major (_forward_kmajor: each block's queries in full tiles, a merge per position)
# instead of the union walk of neighbouring positions, with at most SEL_FWD_BUFFER_BYTES of per-block partials
# (o in the input dtype, lse fp32) at once (groups of (sequence, KV head) pairs, or query chunks: rows of a
# fixed-length batch, local positions of a packed one's sequences). H100 at 64k, 8 KV heads, the NSA core's
# forward: 68.1 -> 43.7 ms at G = 8, 52.9 -> 24.2 at G = 4, 48.0 -> 14.6 at G = 2 (docs/benchmarks.md,
# twenty-fourth session)
SEL_FWD_KMAJOR = True
SEL_FWD_BUFFER_BYTES = 2 << 30
# G < 16 (context-parallel ring steps too): dq from the dS tiles that the dK/dV pass stores, as with forced blocks
# above, instead of the union walk recomputing them. H100 at 64k, 8 KV heads, the NSA core's forward+backward:
# 157 -> 129 ms at G = 8, 101 -> 75.6 at G = 4, 78.7 -> 50.2 at G = 2 (docs/benchmarks.md, twenty-fourth session)
SEL_DQ_FROM_DS_SMALL_G = True
# G < 16 (with SEL_DQ_FROM_DS_SMALL_G): the dK/dV pass, which holds each block's K, also forms each entry's dq share
# over the block (dS K, stored in the input dtype) and dq sums a position's shares (_sel_dq_sum_kernel), instead of
# dq gathering every listed block's K again (at G = 8 and 64k, 16 KiB a block, position and KV head from L2). H100 at
# 64k, 8 KV heads, the NSA core's forward+backward: 123.3 -> 121.3 ms at G = 8 (dK/dV + dq 34.8 -> 33.5), 73.9 ->
# 65.3 at G = 4 (25.5 -> 17.1) (benchmarks/switch_ab.py; docs/benchmarks.md, twenty-sixth session)
SEL_DQ_PARTIALS_SMALL_G = True
# warps of the merge's per-position programs (GP x dv elements each). H100 at 64k, G = 8 (64 / 8 heads): 2 warps
# 7.44 ms, 4 / 8 / 1 warps 7.83 / 9.21 / 9.69 (benchmarks/switch_ab.py --switch select.SEL_MERGE_WARPS)
SEL_MERGE_WARPS = 2


class _SelLaunch:
    """Grid and constants of one selected-attention call. ``q_offset``: query ``i`` sits at position
    ``i + q_offset``; ``k_base``: the key buffer holds positions ``[k_base, k_base + tk)`` (both 0 without context
    parallelism); blocks outside the buffer are skipped. ``forced``: ``forced.forced_constants`` when the window
    kernels attend to the forced blocks (the NSA core), taken only by the per-position loops without offsets
    (``self.forced`` says whether)."""

    def __init__(self, q, k, v, indices, block, cu_seqlens, max_t=None, q_offset=0, k_base=0, forced=None):
        b, t, hq, dk = q.shape
        tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        g = hq // hkv
        self.varlen = cu_seqlens is not None
        if self.varlen and (q_offset or k_base):
            raise ValueError("selected_attention: q_offset / k_base are for fixed-length batches only")
        nseq = cu_seqlens.numel() - 1 if self.varlen else b
        if not self.varlen:
            max_t = t
        elif max_t is None:
            max_t = max_seqlen(cu_seqlens)
        self.cu = cu_seqlens if self.varlen else q.new_zeros(1, dtype=torch.int32)
        self.max_t = max_t
        self.sizes = (t, tk, q_offset, k_base)
        self.lo, self.hi = k_base // block, triton.cdiv(k_base + tk, block)
        self.ns_max = triton.cdiv(max_t + q_offset, block)
        gp = triton.next_power_of_2(g)
        common = dict(HQ=hq, HKV=hkv, G=g, GP=gp, DK=dk, DV=dv, BDK=max(16, triton.next_power_of_2(dk)),
                      BDV=max(16, triton.next_power_of_2(dv)), BS=block, VARLEN=self.varlen)
        n = indices.shape[-1]
        wide = max(common["BDK"], common["BDV"]) > 128
        if wide:
            self.stages = wide_tile_stages(q, common["BDK"], common["BDV"], SEL_WIDE_STAGES)
        else:
            self.stages = 1 if not q.is_cuda or q.dtype == torch.float32 else 2
        # G >= 16 fills a matrix tile alone: one position per program, its own n blocks (measured on an H100 at
        # 64k: 16.4 / 16.9 ms forward / dq against 26.2 / 28.7 for the union walk of 4 positions). Fewer heads:
        # 64 rows of at most 16 positions, so that the union of their blocks stays close to n.
        self.loop = gp >= 16
        block_t = 1 if self.loop else max(1, min(16, 64 // gp))
        self.qmajor = dict(common, N=n, NP=triton.next_power_of_2(n))
        if not self.loop:
            self.qmajor["BLOCK_T"] = block_t
        # one position's tile is small: few warps keep more programs resident (G=16 on an H100: 1 / 2 warps best,
        # benchmarks/tile_sweep.py); G = 32 / 64 (more rows) get proportionally more so the accumulators fit
        if self.loop and not wide:
            self.warps_fwd, self.warps_dq = min(8, gp // 16), min(8, gp // 8)
        else:
            self.warps_fwd = self.warps_dq = 4
        # G=16's dq loop: 3 stages, 16.9-17.0 ms against 17.5-17.6 with 2 at 64k (H100; three sweeps, 2026-11-23
        # and runs 1 and 3 of docs/results/selection_h100_2026-11-24_session14); other G not measured
        self.stages_dq = 3 if self.loop and not wide and gp == 16 and self.stages == 2 else self.stages
        self.kmajor = dict(common, BLOCK_Q=max(1, 64 // gp))
        # the dS handoff's launches (G >= 16, so gp // 16 >= 1): dK/dV as without it; dq holds a [gp, dk] fp32
        # accumulator and streams K tiles (H100 at 64k, G = 16: 1 warp / 2 stages 7.47 ms, 2 / 3 7.59, 4 / 3 7.85)
        self.ds_dkdv = dict(num_warps=4, num_stages=self.stages)
        self.ds_dq = dict(num_warps=max(1, gp // 16), num_stages=2 if self.stages > 1 else 1)
        # the per-position loops fetch their K/V blocks by TMA: dq 16.9 -> 16.5 ms at G=16 (H100 at 64k,
        # benchmarks/tile_sweep.py --only sel_tma, session 14 run 9); not 256-wide tiles, whose boxes cost the core
        # 60.7 / 226 -> 65.2 / 248 ms fwd / fwd+bwd at dk/dv 192/128 (docs/benchmarks.md, twenty-third session)
        self.tma = self.loop and not wide and SEL_TMA and tma_ok(k, v)
        self.grid_q = (triton.cdiv(max_t, block_t), nseq * hkv)
        # forced blocks (forced.forced_constants) done by the window kernels: the loops walk the other blocks
        self.forced = forced if forced is not None and self.loop and not (q_offset or k_base) else None
        if self.forced is not None:
            self.qmajor.update(FORCED=True, INITIAL=forced["INITIAL"], LOCAL=forced["LOCAL"])
        # the KV-block-major forward's partials of one position and KV head: n x (o [GP, dv], lse [GP] fp32)
        self.fwd_row_bytes = n * gp * (dv * q.element_size() + 4)
        self.fwd_kmajor = SEL_FWD_KMAJOR and not self.loop

    def ds_handoff(self) -> bool:
        """Whether this call's dq comes from the dS tiles (or dq shares) that its dK/dV pass stores
        (``SEL_DQ_FROM_DS``: with the forced blocks at G >= 16, and at G < 16 with ``SEL_DQ_FROM_DS_SMALL_G``)."""
        small_g = SEL_DQ_FROM_DS_SMALL_G and not self.loop
        return SEL_DQ_FROM_DS and (self.forced is not None or small_g)

    def dq_shares(self) -> bool:
        """Whether the dq handoff stores per-block dq shares (``SEL_DQ_PARTIALS_SMALL_G``, G < 16) instead of dS."""
        return SEL_DQ_PARTIALS_SMALL_G and self.forced is None and not self.loop

    def kv(self, k, v):
        """The K/V block arguments of the query-major kernels: TMA descriptors of ``[BS, 1, BD]`` boxes, or none."""
        q = self.qmajor
        return kv_descriptors(k, v, dict(BLOCK_N=q["BS"], BDK=q["BDK"], BDV=q["BDV"])) if self.tma else {}


def selected_forward(q, k, v, indices, L: _SelLaunch, scale: float, gated_sum=None, partial=None):
    """``(o, lse)`` of the queries over the selected blocks inside this key buffer (no autograd); with
    ``gated_sum = (o_cmp, o_swa, gate)`` (contiguous, gate ``[b, t, hq, 3]``) ``(o, lse, out)``, ``out`` the NSA
    output ``gate . (o_cmp, o, o_swa)`` as :func:`gate.gate_forward` computes it. With ``L.forced``, ``partial``
    is the ``(o, lse)`` over the forced blocks (:func:`forced.window_forced_forward`), completed in place."""
    b, t, hq, _ = q.shape
    if L.forced is not None:
        if partial is None:
            raise ValueError("selected_forward: a launch with forced blocks needs partial=(o, lse) over them "
                             "(forced.window_forced_forward)")
        o, lse = partial
    else:
        o = torch.empty(b, t, hq, v.shape[-1], device=q.device, dtype=q.dtype)
        lse = torch.empty(b, t, hq, device=q.device, dtype=torch.float32)
    fused = {}
    if gated_sum is not None:
        out = torch.empty_like(o)
        fused = dict(OC=gated_sum[0], OW=gated_sum[1], GATE=gated_sum[2], OUT=out, GATED_SUM=True)
    if L.fwd_kmajor:
        _forward_kmajor(q, k, v, indices, L, scale, o, lse, fused)
    else:
        kernel = _sel_fwd_loop_kernel if L.loop else _sel_fwd_kernel
        kernel[L.grid_q](q, k, v, indices, o, lse, L.cu, *L.sizes, L.lo, L.hi, scale, **L.qmajor, **fused,
                         **L.kv(k, v), num_stages=L.stages, num_warps=L.warps_fwd)
    return (o, lse) if gated_sum is None else (o, lse, out)


def selected_backward(q, k, v, indices, do, lse, delta, L: _SelLaunch, scale: float, dq_dtype=None, dq=None,
                      gate=None, o=None):
    """``(dq, dk fp32, dv fp32)`` of this key buffer's share, given the final ``lse`` and
    ``delta = rowsum(o * do)`` (so ring steps can each add their part); with ``dq`` given, this call's dq is added
    onto it; ``gate``, ``o`` (and then ``delta`` None): as :func:`flash.masked_backward`. With ``L.forced``, ``dq``
    and ``delta`` come from :func:`forced.window_forced_dq`, which did the forced blocks' dq, and (with
    ``SEL_DQ_FROM_DS``) dq comes from the dS tiles that the dK/dV pass stores (:func:`_backward_ds_handoff`)."""
    if L.forced is not None and (dq is None or delta is None or o is not None):
        raise ValueError("selected_backward: a launch with forced blocks needs dq and delta from "
                         "forced.window_forced_dq (and o=None)")
    dq, add, gated = _grad_args(q, dq, gate, dq_dtype)
    delta, own_delta = _delta_args(o, delta, q)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    if L.ds_handoff():  # the forced blocks' dq came with the window's
        if own_delta:  # G < 16: the dK/dV pass, which runs first, needs delta
            delta.copy_(row_dot(o, do))
        return _backward_ds_handoff(q, k, v, indices, do, lse, delta, dq, add, dk, dv, L, scale, gated)
    kernel = _sel_dq_loop_kernel if L.loop else _sel_bwd_dq_kernel
    kernel[L.grid_q](q, k, v, indices, do, lse, delta, dq, L.cu, *L.sizes, L.lo, L.hi, scale, **L.qmajor,
                     DQ_ADD=add, **gated, **own_delta, **L.kv(k, v), num_stages=L.stages_dq, num_warps=L.warps_dq)
    qlist, items = _dkdv_items(indices, L)
    _sel_bwd_dkdv_kernel[(items[0].numel(),)](q, k, v, do, lse, delta, dk, dv, qlist, *items, L.cu, *L.sizes,
                                              L.ns_max, scale, **L.kmajor, **gated, num_stages=L.stages)
    return dq, dk, dv


def _dkdv_items(indices, L: _SelLaunch, entries: bool = False, positions: Optional[tuple] = None):
    """The dK/dV pass's inverted index and work items: ``(qlist, (key, start, end)[, offsets, entries])``; with
    ``positions = (s, e)`` only the queries at local positions ``[s, e)`` (a packed batch's query chunk)."""
    inv = invert_block_indices(indices, L.ns_max, L.cu if L.varlen else None, L.lo, L.hi, entries, positions)
    listed = indices.numel()
    if positions is not None:
        # at most this many entries are listed; sized by the whole batch, a packed batch's short last chunk took
        # 1024-entry items where the fixed-length one takes 256: one program walked the first block's whole list
        listed = min(listed, (min(positions[1], L.max_t) - positions[0]) * L.grid_q[1] * indices.shape[-1])
    chunk = SEL_BWD_CHUNK_LONG if listed >= SEL_BWD_LONG_ENTRIES else SEL_BWD_CHUNK
    return (inv[0], work_items(inv[1], listed, chunk)) + (inv[1:] if entries else ())


def _index_chunks(indices, L: _SelLaunch, row_bytes: int, budget: int):
    """How a pass that keeps ``row_bytes`` per position and KV head (all its list entries) in a buffer of at most
    ``budget`` bytes goes over the inverted index: ``(capacity, chunks)``, capacity the buffer's entries and chunks
    yielding ``(s, m, qlist, items, offsets, slot, p0, p1)``: positions ``[s, s + m)`` of (sequence, KV head)
    pairs ``[p0, p1)``, their index, work items and offsets (the buffer starts at pair p0's first entry), and
    ``slot`` (``indices``' shape: where each entry lies in the index's order). Pairs go in groups that fit (their
    lists are neighbours in the index, and each work item belongs to one pair), a pair that alone does not in query
    chunks, an index each: rows ``[s, s + m)`` of a fixed-length batch, local positions ``[s, s + m)`` of every
    sequence of a packed one (where its longest sequence does not fit)."""
    b, t, hkv, n = indices.shape
    if indices.numel() == 0:  # no query or no KV head: nothing to do
        return 0, iter(())
    pairs, span = L.grid_q[1], L.max_t
    rows = span if span * row_bytes <= budget else min(span, max(64, budget // row_bytes // 64 * 64))
    group = max(1, budget // (row_bytes * rows)) if rows == span else 1

    def chunks():
        slot = torch.empty(b, t, hkv, n, device=indices.device, dtype=torch.int32)
        for s in range(0, span, rows):
            if rows == span or L.varlen:  # the whole batch's entries, or a packed batch's at these positions
                part, window, at = indices, (s, s + rows) if rows < span else None, slice(None)
            else:
                part, window, at = indices[:, s:s + rows].contiguous(), None, slice(s, s + rows)
            qlist, items, offsets, entries = _dkdv_items(part, L, entries=True, positions=window)
            if at.start:
                qlist += s
            slot[:, at] = torch.empty_like(entries).scatter_(
                0, entries.long(), torch.arange(entries.numel(), device=indices.device, dtype=entries.dtype)
            ).view(part.shape)
            for p0 in range(0, pairs, group):
                yield s, min(rows, span - s), qlist, items, offsets, slot, p0, min(pairs, p0 + group)
    return min(group * rows * n, indices.numel()), chunks()


def _backward_ds_handoff(q, k, v, indices, do, lse, delta, dq, add, dk, dv, L: _SelLaunch, scale, gated):
    """dK/dV first, storing the dS tiles in the inverted index's order; dq from them and K (added onto ``dq`` with
    ``add``). At most ``SEL_DS_BUFFER_BYTES`` of tiles exist at once (:func:`_index_chunks`; partial dK/dV tiles of
    query chunks meet in fp32 as between items). Without forced blocks (G < 16) every listed block's tile, or with
    ``L.dq_shares()`` every listed block's dq share, which dq sums."""
    n, gp = indices.shape[-1], L.kmajor["GP"]
    shares = L.dq_shares()
    width = L.kmajor["BDK"] if shares else L.kmajor["BS"]  # a stored row: a dq share, or a dS tile over a block
    capacity, chunks = _index_chunks(indices, L, n * gp * width * q.element_size(), SEL_DS_BUFFER_BYTES)
    dsb = torch.empty(capacity, gp, width, device=q.device, dtype=q.dtype)
    # no initial and no local blocks forced: every listed block is stored and walked by dq
    forced = dict(INITIAL=L.forced["INITIAL"], LOCAL=L.forced["LOCAL"]) if L.forced else dict(INITIAL=0, LOCAL=0)
    kd = {"KD": L.kv(k, v)["KD"], "TMA": True} if L.tma else {}
    names = ("HQ", "HKV", "G", "GP", "N", "NP", "DK", "BDK", "VARLEN") + (() if shares else ("BS",))
    const = {key: L.qmajor[key] for key in names}
    for s, m, qlist, items, offsets, slot, p0, p1 in chunks:
        _sel_bwd_dkdv_kernel[(items[0].numel(),)](q, k, v, do, lse, delta, dk, dv, qlist, *items, L.cu, *L.sizes,
                                                  L.ns_max, scale, **L.kmajor, **gated, DSB=dsb, OFFS=offsets,
                                                  PAIR0=p0, PAIR1=p1, STORE_DS=not shares, STORE_DQ=shares,
                                                  **forced, **L.ds_dkdv)
        if shares:
            _sel_dq_sum_kernel[(m, p1 - p0)](indices, slot, dsb, dq, offsets, L.cu, *L.sizes[:2], s, p0, L.ns_max,
                                             L.lo, L.hi, scale, **const, ADD=add, num_warps=SEL_MERGE_WARPS)
        else:
            _sel_dq_ds_kernel[(m, p1 - p0)](k, indices, slot, dsb, dq, offsets, L.cu, *L.sizes, L.lo, L.hi, s, p0,
                                            L.ns_max, scale, **const, **forced, **kd, RP=max(16, const["GP"]),
                                            ADD=add, **L.ds_dq)
    return dq, dk, dv


def _forward_kmajor(q, k, v, indices, L: _SelLaunch, scale, o, lse, fused):
    """The forward at G < 16 (``L.fwd_kmajor``) into ``o [b, t, hq, dv]`` and ``lse [b, t, hq]`` (and with
    ``fused``, the gated-sum arguments of :func:`_store_output`, the NSA output): each block's queries attend to it
    in full matrix tiles (:func:`_sel_fwd_kmajor_kernel`), their per-block softmaxes (``[entries, GP, dv]`` in the
    input dtype and ``[entries, GP]`` fp32, in the index's order; at most ``SEL_FWD_BUFFER_BYTES`` at once,
    :func:`_index_chunks`) then merged per position (:func:`_sel_merge_kernel`)."""
    gp, dv = L.kmajor["GP"], v.shape[-1]
    capacity, chunks = _index_chunks(indices, L, L.fwd_row_bytes, SEL_FWD_BUFFER_BYTES)
    op = torch.empty(capacity, gp, dv, device=q.device, dtype=q.dtype)
    lp = torch.empty(capacity, gp, device=q.device, dtype=torch.float32)
    const = {key: L.qmajor[key] for key in ("HQ", "HKV", "G", "GP", "N", "NP", "DV", "BDV", "VARLEN")}
    for s, m, qlist, items, offsets, slot, p0, p1 in chunks:
        _sel_fwd_kmajor_kernel[(items[0].numel(),)](q, k, v, op, lp, qlist, *items, offsets, L.cu, *L.sizes,
                                                    L.ns_max, p0, p1, scale, **L.kmajor, num_warps=4,
                                                    num_stages=L.stages)
        _sel_merge_kernel[(m, p1 - p0)](indices, slot, op, lp, o, lse, offsets, L.cu, *L.sizes[:2], s, p0,
                                        L.ns_max, L.lo, L.hi, **const, **fused, num_warps=SEL_MERGE_WARPS)


class SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, block, scale, cu_seqlens, max_t, q_offset, k_base):
        q, k, v, indices = q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous()
        L = _SelLaunch(q, k, v, indices, block, cu_seqlens, max_t, q_offset, k_base)
        o, lse = selected_forward(q, k, v, indices, L, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.launch, ctx.scale = L, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, indices, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = selected_backward(q, k, v, indices, do, lse, None, ctx.launch, ctx.scale, o=o)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def selected_attention(q, k, v, indices, block: int, scale: float, cu_seqlens: Optional[torch.Tensor] = None,
                       max_t: Optional[int] = None, q_offset: int = 0, k_base: int = 0):
    """``(o [b, t, hq, dv], lse [b, t, hq])`` of each query over its selected blocks ``indices [b, t, hkv, n]``
    (block ids in the queries' frame, -1 = none). ``q_offset`` / ``k_base``: see :class:`_SelLaunch`; a query
    whose blocks all lie outside the key buffer gets o = 0 and lse = -inf."""
    return SelectedAttention.apply(q, k, v, indices, block, scale, cu_seqlens, max_t, q_offset, k_base)
