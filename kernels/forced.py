"""The selected branch's forced blocks as dense tiles, inside the window branch's query-major kernels.

Every query's selection holds its forced blocks: the first ``select_initial`` blocks of its sequence and the
``select_local`` most recent ones (its own block and those before it). Top-n lists are ascending, so a list reads
``[initial blocks that are not local | the chosen ones | local blocks]``, and which entries are forced follows from
the position alone. The per-position selected kernels (select.py, G >= 16) fetch every block of a list from L2 for
the 16 rows of one position; at 64k they are bound by those reads (~137 GB), and 3 of the paper's 16 blocks are
forced. Here the window kernels, whose tiles (``BLOCK_T`` positions x the group's heads, inside one selection
block) hold the queries already, attend to the forced blocks once per tile as well: the forward leaves the
selected branch's partial ``(o, lse)`` over them in that branch's output buffers, and the selected forward walks
only the chosen blocks, resuming from it (:func:`resume`, :func:`free_range`); dq likewise (``DQ_ADD``). The dK/dV
pass is unchanged: its inverted index covers every block and recomputes probabilities from the final lse.

Only the NSA core (kernels/parallel.py) takes this path, whose indices come from top-n with these forced blocks,
without context parallelism (a ring step's key buffer may not hold a query's forced blocks).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import (NO_WINDOW, _Launch, _attend, _bwd_rows, _dq_sum, _dq_tiles, _finish, _fwd_tiles, _load_lse2,
                    _load_tile, _own_delta, _q_tile, _store_tile)

FORCED_TILES = True  # forced blocks in the window kernels where forced_constants allows (False: in the lists' walk)


@triton.jit
def forced_blocks(t, BS: tl.constexpr, INITIAL: tl.constexpr, LOCAL: tl.constexpr):
    """``(a, first_local, own)`` for position ``t``: its forced blocks are ``[0, a)`` (initial, not local) and
    ``[first_local, own]`` (local)."""
    own = t // BS
    first_local = tl.maximum(own - LOCAL + 1, 0)
    return tl.minimum(first_local, INITIAL), first_local, own


@triton.jit
def free_range(t, n_valid, BS: tl.constexpr, INITIAL: tl.constexpr, LOCAL: tl.constexpr):
    """``[i_lo, i_hi)``: the entries of position ``t``'s ascending list (``n_valid`` valid ones) that are not
    forced."""
    a, first_local, own = forced_blocks(t, BS, INITIAL, LOCAL)
    return a, n_valid - (own - first_local + 1)


@triton.jit
def resume(O, LSE, row_off, rvalid, DV: tl.constexpr, BDV: tl.constexpr):
    """The online-softmax state ``(m in log2 units, l, acc)`` that a partial ``(o, lse)`` stands for."""
    acc = _load_tile(O, row_off, rvalid, DV, BDV).to(tl.float32)
    lse = tl.load(LSE + row_off, mask=rvalid, other=float("-inf"))
    seen = lse > float("-inf")
    return tl.where(seen, lse * 1.4426950408889634, -1.0e30), tl.where(seen, 1.0, 0.0), acc


@triton.jit
def _forced_attend(q, KS, VS, kbos, kvh, t0, T, tq, qk_scale, HKV: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, BLOCK_T: tl.constexpr, GP: tl.constexpr,
                   BS: tl.constexpr, FBN: tl.constexpr, INITIAL: tl.constexpr, LOCAL: tl.constexpr,
                   NOWIN: tl.constexpr):
    """``(o, lse)`` of a tile's rows over their forced blocks (the tile lies inside one selection block)."""
    a, first_local, own = forced_blocks(t0, BS, INITIAL, LOCAL)
    t_end = tl.minimum(t0 + BLOCK_T, T)
    m_i = tl.full([BLOCK_T * GP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T * GP, BDV], dtype=tl.float32)
    # blocks before the tile's own are whole for every row; only the own block needs the causal mask
    m_i, l_i, acc = _fwd_tiles(q, KS, VS, kbos, kvh, tq, 0, a * BS, t_end, m_i, l_i, acc, qk_scale, HKV, DK, DV,
                               BDK, BDV, FBN, 1, 0, NOWIN, False, None, None, False)
    m_i, l_i, acc = _fwd_tiles(q, KS, VS, kbos, kvh, tq, first_local * BS, own * BS, t_end, m_i, l_i, acc,
                               qk_scale, HKV, DK, DV, BDK, BDV, FBN, 1, 0, NOWIN, False, None, None, False)
    m_i, l_i, acc = _fwd_tiles(q, KS, VS, kbos, kvh, tq, own * BS, t_end, t_end, m_i, l_i, acc, qk_scale, HKV, DK,
                               DV, BDK, BDV, FBN, 1, 0, NOWIN, True, None, None, False)
    return _finish(acc, m_i, l_i)


@triton.jit
def _window_forced_fwd_kernel(Q, K, V, O, LSE, KS, VS, OS, LS, CU, CU_K, T_FIXED, TK_FIXED, scale,
                              HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                              DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF,
                              WINDOW: tl.constexpr, VARLEN: tl.constexpr, BS: tl.constexpr, FBN: tl.constexpr,
                              INITIAL: tl.constexpr, LOCAL: tl.constexpr, NOWIN: tl.constexpr, KD=None, VD=None,
                              TMA: tl.constexpr = False):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q = _load_tile(Q, row_off, rvalid, DK, BDK)
    qk_scale = scale * 1.4426950408889634
    o, lse = _attend(q, K, V, kbos, kvh, t0, T, TK, tq, qk_scale, HKV, DK, DV, BDK, BDV, BLOCK_T, GP, BLOCK_N,
                     KSTRIDE, KOFF, WINDOW, KD, VD, TMA)
    _store_tile(O, row_off, rvalid, o, DV, BDV)
    tl.store(LSE + row_off, lse, mask=rvalid)
    o, lse = _forced_attend(q, KS, VS, kbos, kvh, t0, T, tq, qk_scale, HKV, DK, DV, BDK, BDV, BLOCK_T, GP, BS, FBN,
                            INITIAL, LOCAL, NOWIN)
    _store_tile(OS, row_off, rvalid, o, DV, BDV)
    tl.store(LS + row_off, lse, mask=rvalid)


@triton.jit
def _window_forced_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, O, GATE, KS, VS, OS, LS, DS, GS, CU, CU_K, T_FIXED,
                             TK_FIXED, scale, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                             GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                             BDV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                             KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                             BS: tl.constexpr, FBN: tl.constexpr, INITIAL: tl.constexpr, LOCAL: tl.constexpr,
                             NOWIN: tl.constexpr, KD=None, VD=None,
                             TMA: tl.constexpr = False):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU_K, T_FIXED, TK_FIXED, HKV, BLOCK_T, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q, do, lse2, delta, g = _bwd_rows(Q, DO, LSE, DELTA, row_off, rvalid, DK, DV, BDK, BDV, GATE, True)
    delta = _own_delta(O, DELTA, do, row_off, rvalid, DV, BDV)
    qk_scale = scale * 1.4426950408889634
    dq = _dq_sum(q, do, lse2, delta, K, V, kbos, kvh, t0, T, TK, tq, qk_scale, HKV, DK, DV, BDK, BDV, BLOCK_T, GP,
                 BLOCK_N, KSTRIDE, KOFF, WINDOW, KD, VD, TMA) * g[:, None]
    # the selected branch's forced blocks, with that branch's lse, delta and gate, into the same dq
    lse2 = _load_lse2(LS, row_off, rvalid)
    g = tl.load(GS + row_off, mask=rvalid, other=0.0)
    delta = _own_delta(OS, DS, do, row_off, rvalid, DV, BDV)
    a, first_local, own = forced_blocks(t0, BS, INITIAL, LOCAL)
    t_end = tl.minimum(t0 + BLOCK_T, T)
    dq = _dq_tiles(q, do, lse2, delta, dq, KS, VS, kbos, kvh, tq, 0, a * BS, t_end, qk_scale, HKV, DK, DV, BDK, BDV,
                   FBN, 1, 0, NOWIN, False, None, None, False, g, True)
    dq = _dq_tiles(q, do, lse2, delta, dq, KS, VS, kbos, kvh, tq, first_local * BS, own * BS, t_end, qk_scale, HKV,
                   DK, DV, BDK, BDV, FBN, 1, 0, NOWIN, False, None, None, False, g, True)
    dq = _dq_tiles(q, do, lse2, delta, dq, KS, VS, kbos, kvh, tq, own * BS, t_end, t_end, qk_scale, HKV, DK, DV,
                   BDK, BDV, FBN, 1, 0, NOWIN, True, None, None, False, g, True)
    _store_tile(DQ, row_off, rvalid, dq * scale, DK, BDK)


def forced_constants(config, L_swa: _Launch) -> Optional[dict]:
    """The forced-block constants of the window kernels launched by ``L_swa``, or None where they cannot carry
    them (a tile's positions must lie in one selection block: ``BLOCK_T`` divides ``select_block``, a power of two
    for the Triton backend) or ``FORCED_TILES`` is off."""
    bs = config.select_block
    if not FORCED_TILES or any(bs % launch[1]["BLOCK_T"] for launch in (L_swa.fwd, L_swa.dq)):
        return None
    # key tiles of at most 64: the forced blocks' K/V tiles beside the window's own in shared memory
    return dict(BS=bs, FBN=min(64, bs), INITIAL=config.select_initial, LOCAL=config.select_local, NOWIN=NO_WINDOW)


def window_forced_forward(q, k_swa, v_swa, k_slc, v_slc, scale: float, L_swa: _Launch, forced: dict):
    """``(o_swa, lse_swa, o_slc, lse_slc)``: the window branch, and the selected branch over its forced blocks
    only (the partial that :func:`select.selected_forward` resumes from)."""
    b, t, hq, _ = q.shape
    o_swa = torch.empty(b, t, hq, v_swa.shape[-1], device=q.device, dtype=q.dtype)
    o_slc = torch.empty(b, t, hq, v_slc.shape[-1], device=q.device, dtype=q.dtype)
    lse_swa = torch.empty(b, t, hq, device=q.device, dtype=torch.float32)
    lse_slc = torch.empty_like(lse_swa)
    grid, const, opts = L_swa.fwd
    _window_forced_fwd_kernel[grid](q, k_swa, v_swa, o_swa, lse_swa, k_slc, v_slc, o_slc, lse_slc, *L_swa.args(),
                                    scale, **const, **forced, **L_swa.kv("fwd", k_swa, v_swa, const), **opts)
    return o_swa, lse_swa, o_slc, lse_slc


def window_forced_dq(q, k_swa, v_swa, k_slc, v_slc, do, lse_swa, lse_slc, o_swa, o_slc, delta_swa, delta_slc,
                     g_swa, g_slc, scale: float, L_swa: _Launch, forced: dict):
    """dq of the window branch and of the selected branch's forced blocks (gated, as the NSA core's backward needs
    it); writes each branch's ``delta = rowsum(o * do)`` into ``delta_swa`` / ``delta_slc``."""
    dq = torch.empty_like(q)
    grid, const, opts = L_swa.dq
    _window_forced_dq_kernel[grid](q, k_swa, v_swa, do, lse_swa, delta_swa, dq, o_swa, g_swa, k_slc, v_slc, o_slc,
                                   lse_slc, delta_slc, g_slc, *L_swa.args(), scale, **const, **forced,
                                   **L_swa.kv("dq", k_swa, v_swa, const), **opts)
    return dq
