"""A Gluon (``triton.experimental.gluon``) prototype of the compressed branch's forward, against the shipped Triton
kernel: a measurement, not shipped code.

    python -P benchmarks/gluon_cmp_fwd.py --t 65536 --out gluon_cmp_fwd.json     # on a Hopper GPU
    python benchmarks/gluon_cmp_fwd.py --compile-only                           # sm_90 compile check, no GPU

Fixed-length batch of one, G = 16 query heads per KV head, head dim 128, bf16; 128 rows (BLOCK_T positions x the
16 heads of one KV head) per program, compressed keys in tiles of BN from a TMA ring of STAGES buffers (mbarriers),
async wgmma, only tiles at the causal edge masked. Two kernels: ``_cmp_fwd``, Triton's own schedule written out (8
warps, each product waited for at once), and ``_cmp_fwd_ws``, FA3's structure: a one-warp TMA producer and two
consumer warpgroups of 64 rows that share the ring (``ws=True``), with FA3's intra-warpgroup overlap (``overlap``:
tile j's q.k^T issued before tile j-1's p.v, so tile j's softmax runs while the p.v does) and ping-pong turns
between the consumers (``pingpong``) as options. Every variant's output and lse are checked against
``flash.masked_forward`` before timing. (Session 16's runs 7-8 also timed the plain kernel with the overlap: 17c5f23.)
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

# Triton 3.6 (the device) names the TMA load async_copy_global_to_shared; 3.9 (here) async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_constexpr_function = getattr(triton, "constexpr_function", None) or getattr(gl, "constexpr_function", None)


@gluon.jit
def _edge_mask(s, kj, rows_t, n_keys, KSTRIDE: gl.constexpr, KOFF: gl.constexpr):
    """Scores of keys ``kj`` that rows at positions ``rows_t`` do not see (or that do not exist) -> -inf."""
    vis = ((kj[None, :] * KSTRIDE + KOFF) <= rows_t[:, None]) & (kj < n_keys)[None, :]
    return gl.where(vis, s, float("-inf"))


@gluon.jit
def _softmax_tile(s, j, n_full, cols, rows_t, n_keys, m_i, l_i, qk_scale, BN: gl.constexpr, KSTRIDE: gl.constexpr,
                KOFF: gl.constexpr):
    """One tile's online-softmax step on raw scores ``s``: ``(p, alpha, m, l)``; only tiles at the causal edge
    (from ``n_full`` on) are masked, under a uniform branch."""
    if j >= n_full:
        s = _edge_mask(s, j * BN + cols, rows_t, n_keys, KSTRIDE, KOFF)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _loop_state(p0, M: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, G: gl.constexpr, s_layout: gl.constexpr,
                o_layout: gl.constexpr):
    """Softmax state ``(m, l, acc)`` of ``M`` rows from position ``p0``, a zero score tile, the rows' positions and
    the key-tile columns."""
    return (gl.full([M], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout)),
            gl.zeros([M], gl.float32, layout=gl.SliceLayout(1, s_layout)),
            gl.zeros([M, D], gl.float32, layout=o_layout), gl.zeros([M, BN], gl.float32, layout=s_layout),
            p0 + gl.arange(0, M, layout=gl.SliceLayout(1, s_layout)) // G,
            gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))


@gluon.jit
def _pv_step(acc, alpha, p, v_tile, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """``acc * alpha + p v``, waited for (the schedule without overlap)."""
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_tile, acc, is_async=True)
    return warpgroup_mma_wait(0, deps=(acc,))


@gluon.jit
def _store_rows(acc, m_i, l_i, o_ptr, lse_ptr, p0, T, kvh, HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
                M: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, WARPS: gl.constexpr,
                COALESCE: gl.constexpr):
    """o and lse of ``M`` rows (positions from ``p0`` x the G heads of KV head ``kvh``) from the softmax state."""
    seen = l_i > 0
    lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o = acc / gl.convert_layout(gl.where(seen, l_i, 1.0), gl.SliceLayout(1, o_layout))[:, None]
    if COALESCE:  # 16-byte row pieces per thread instead of the accumulator's 4-byte ones
        st_layout: gl.constexpr = _store_layout(WARPS)
        o = gl.convert_layout(o, st_layout)
    else:
        st_layout: gl.constexpr = o_layout
    ro = gl.arange(0, M, layout=gl.SliceLayout(1, st_layout))
    co = gl.arange(0, D, layout=gl.SliceLayout(0, st_layout))
    tqo = p0 + ro // G
    row = tqo.to(gl.int64) * HQ + kvh * G + ro % G
    gl.store(o_ptr + row[:, None] * D + co[None, :], o.to(gl.bfloat16), mask=(tqo < T)[:, None])
    rl = gl.arange(0, M, layout=gl.SliceLayout(1, s_layout))
    tql = p0 + rl // G
    gl.store(lse_ptr + tql.to(gl.int64) * HQ + kvh * G + rl % G, lse, mask=tql < T)


@gluon.jit
def _cmp_fwd(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, T, TC, qk_scale,
             HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
             BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr,
             COALESCE: gl.constexpr, num_warps: gl.constexpr):
    M: gl.constexpr = BLOCK_T * G
    t0 = gl.program_id(0) * BLOCK_T
    kvh = gl.program_id(1)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    # q rows (position, head) -> smem, once
    r = gl.arange(0, M, layout=gl.SliceLayout(1, ld_layout))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    tq = t0 + r // G
    q_off = (tq.to(gl.int64) * HQ + kvh * G + r % G) * D
    q = gl.load(q_ptr + q_off[:, None] + c[None, :], mask=(tq < T)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [M, D], gl.NVMMASharedLayout.get_default_for([M, D], gl.bfloat16),
                                       q)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, D], v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    t_last = gl.minimum(t0 + BLOCK_T, T) - 1
    n_keys = gl.where(t_last >= KOFF, gl.minimum(TC, (t_last - KOFF) // KSTRIDE + 1), 0)
    n_tiles = (n_keys + BN - 1) // BN
    n_full = gl.where(t0 >= KOFF, gl.minimum(TC, (t0 - KOFF) // KSTRIDE + 1), 0) // BN  # tiles every row sees
    nbytes: gl.constexpr = 2 * BN * D * 2
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            mbarrier.expect(bars.index(i), nbytes)
            _tma_load(k_desc, [i * BN, kvh * D], bars.index(i), k_smem.index(i))
            _tma_load(v_desc, [i * BN, kvh * D], bars.index(i), v_smem.index(i))

    m_i, l_i, acc, s_zero, rows_t, cols = _loop_state(t0, M, BN, D, G, s_layout, o_layout)

    for j in range(0, n_tiles):
        st = j % STAGES
        mbarrier.wait(bars.index(st), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m_i, l_i = _softmax_tile(s, j, n_full, cols, rows_t, n_keys, m_i, l_i, qk_scale, BN, KSTRIDE,
                                           KOFF)
        acc = _pv_step(acc, alpha, p, v_smem.index(st), o_layout, p_layout)
        nxt = j + STAGES
        if nxt < n_tiles:
            mbarrier.expect(bars.index(st), nbytes)
            _tma_load(k_desc, [nxt * BN, kvh * D], bars.index(st), k_smem.index(st))
            _tma_load(v_desc, [nxt * BN, kvh * D], bars.index(st), v_smem.index(st))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    _store_rows(acc, m_i, l_i, o_ptr, lse_ptr, t0, T, kvh, HQ, G, D, M, s_layout, o_layout, num_warps, COALESCE)


@_constexpr_function
def _store_layout(warps):
    """Rows of 8 contiguous elements per thread (16-byte stores) over ``warps`` warps."""
    return gl.BlockedLayout([1, 8], [4, 8], [int(getattr(warps, "value", warps)), 1], [1, 0])


@_constexpr_function
def _warpgroup_mma_layout(n):
    """A one-warpgroup wgmma accumulator of N = n (made in Python: list literals inside a partition's function
    arrive as tuples that the layout constructor rejects, Triton 3.9)."""
    n = int(getattr(n, "value", n))
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _kv_ring(k_desc, v_desc, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """The K/V ring of the warp-specialized kernels: ``STAGES`` K and V buffers, a "full" mbarrier per stage (the
    producer's TMA bytes) and an "empty" one (both consumers release the stage)."""
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, D], v_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return k_smem, v_smem, full, empty


@gluon.jit
def _ws_producer(part, k_desc, v_desc, q_smem, k_smem, v_smem, full, empty, turn, o_ptr, lse_ptr, T, TC, qk_scale,
                 t0, kvh, n_tiles, HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BN: gl.constexpr,
                 KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                 PINGPONG: gl.constexpr, COALESCE: gl.constexpr):
    """One warp: K/V tiles into the ring, each stage once both consumers released it (``part`` and the arguments
    after ``n_tiles`` are unused: worker partitions share one signature)."""
    for j in range(n_tiles):
        st = j % STAGES
        mbarrier.wait(empty.index(st), ((j // STAGES) & 1) ^ 1)  # a fresh barrier counts as released
        mbarrier.expect(full.index(st), 2 * BN * D * 2)
        _tma_load(k_desc, [j * BN, kvh * D], full.index(st), k_smem.index(st))
        _tma_load(v_desc, [j * BN, kvh * D], full.index(st), v_smem.index(st))


@gluon.jit
def _overlap_tiles(qa, k_smem, v_smem, full, empty, turn, part, it, n_tiles, n_full, cols, rows_t, n_keys, m_i, l_i,
                   acc, s_zero, qk_scale, BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr,
                   STAGES: gl.constexpr, PINGPONG: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """A consumer's walk over ``n_tiles`` K/V tiles of the ring from its ``it``-th fill, FA3's intra-warpgroup
    overlap: tile j's q.k^T is issued with tile j-1's p.v, and tile j's softmax runs while that p.v does.
    ``PINGPONG``: the two consumers take turns to issue (``turn`` mbarriers). Returns ``(acc, m, l)``."""
    if n_tiles > 0:
        st = it % STAGES
        mbarrier.wait(full.index(st), (it // STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(part), 0)
        s = warpgroup_mma(qa, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - part), count=1)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m_i, l_i = _softmax_tile(s, 0, n_full, cols, rows_t, n_keys, m_i, l_i, qk_scale, BN, KSTRIDE,
                                           KOFF)
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        for j in range(1, n_tiles):
            st = (it + j) % STAGES
            pst = (it + j - 1) % STAGES
            mbarrier.wait(full.index(st), ((it + j) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(part), j & 1)
            s = warpgroup_mma(qa, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p16, v_smem.index(pst), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - part), count=1)
            s = warpgroup_mma_wait(1, deps=(s,))  # q.k^T of tile j done; p.v of tile j-1 may still run
            p, alpha, m_i, l_i = _softmax_tile(s, j, n_full, cols, rows_t, n_keys, m_i, l_i, qk_scale, BN,
                                               KSTRIDE, KOFF)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index(pst), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        last = (it + n_tiles - 1) % STAGES
        acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _ws_consume(part, k_desc, v_desc, q_smem, k_smem, v_smem, full, empty, turn, o_ptr, lse_ptr, T, TC, qk_scale, t0,
                kvh, n_tiles,
                HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, KSTRIDE: gl.constexpr,
                KOFF: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                COALESCE: gl.constexpr):
    """One warpgroup: 64 rows (4 positions x 16 heads) of the program, over every K/V tile of the ring.
    ``OVERLAP``: tile j's q.k^T issued with tile j-1's p.v (tile j's softmax runs while the p.v does);
    ``PINGPONG``: the two consumers take turns to issue their products (``turn`` mbarriers), so one's softmax
    overlaps the other's products."""
    M: gl.constexpr = 64
    s_layout: gl.constexpr = _warpgroup_mma_layout(BN)
    o_layout: gl.constexpr = _warpgroup_mma_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    p0 = t0 + part * (M // G)
    p_last = gl.minimum(p0 + M // G, T) - 1
    n_keys = gl.where(p_last >= KOFF, gl.minimum(TC, (p_last - KOFF) // KSTRIDE + 1), 0)
    n_full = gl.where(p0 >= KOFF, gl.minimum(TC, (p0 - KOFF) // KSTRIDE + 1), 0) // BN
    m_i, l_i, acc, s_zero, rows_t, cols = _loop_state(p0, M, BN, D, G, s_layout, o_layout)
    qs = q_smem.index(part)
    if OVERLAP:
        acc, m_i, l_i = _overlap_tiles(qs, k_smem, v_smem, full, empty, turn, part, 0, n_tiles, n_full, cols, rows_t,
                                       n_keys, m_i, l_i, acc, s_zero, qk_scale, BN, KSTRIDE, KOFF, STAGES, PINGPONG,
                                       o_layout, p_layout)
    else:
        for j in range(n_tiles):
            st = j % STAGES
            mbarrier.wait(full.index(st), (j // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(part), j & 1)
            s = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - part), count=1)
            s = warpgroup_mma_wait(0, deps=(s,))
            p, alpha, m_i, l_i = _softmax_tile(s, j, n_full, cols, rows_t, n_keys, m_i, l_i, qk_scale, BN, KSTRIDE,
                                             KOFF)
            acc = _pv_step(acc, alpha, p, v_smem.index(st), o_layout, p_layout)
            mbarrier.arrive(empty.index(st), count=1)
    _store_rows(acc, m_i, l_i, o_ptr, lse_ptr, p0, T, kvh, HQ, G, D, M, s_layout, o_layout, 4, COALESCE)


@gluon.jit
def _cmp_fwd_ws(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, T, TC, qk_scale,
                HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
                BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, COALESCE: gl.constexpr,
                num_warps: gl.constexpr):
    """Warp-specialized: the default partition (4 warps) and a worker (4 warps) each own 64 of the 128 rows and
    share the K/V ring that a one-warp producer fills (FA3's structure, without its explicit ping-pong)."""
    t0 = gl.program_id(0) * BLOCK_T
    kvh = gl.program_id(1)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2, 64, D], q_layout)
    for part in gl.static_range(2):
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, ld_layout))
        c = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
        tq = t0 + part * (64 // G) + r // G
        q_off = (tq.to(gl.int64) * HQ + kvh * G + r % G) * D
        q_smem.index(part).store(gl.load(q_ptr + q_off[:, None] + c[None, :], mask=(tq < T)[:, None], other=0.0))
    fence_async_shared()
    k_smem, v_smem, full, empty = _kv_ring(k_desc, v_desc, BN, D, STAGES)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first
    t_last = gl.minimum(t0 + BLOCK_T, T) - 1
    n_keys = gl.where(t_last >= KOFF, gl.minimum(TC, (t_last - KOFF) // KSTRIDE + 1), 0)
    n_tiles = (n_keys + BN - 1) // BN
    # the argument tuples written out in the call: a tuple assigned to a name first turns its constexprs into
    # tensors (Triton 3.9)
    gl.warp_specialize([
        (_ws_consume, (0, k_desc, v_desc, q_smem, k_smem, v_smem, full, empty, turn, o_ptr, lse_ptr, T, TC, qk_scale,
                       t0, kvh, n_tiles, HQ, G, D, BN, KSTRIDE, KOFF, STAGES, OVERLAP, PINGPONG,
                       COALESCE)),
        (_ws_consume, (1, k_desc, v_desc, q_smem, k_smem, v_smem, full, empty, turn, o_ptr, lse_ptr, T, TC, qk_scale,
                       t0, kvh, n_tiles, HQ, G, D, BN, KSTRIDE, KOFF, STAGES, OVERLAP, PINGPONG,
                       COALESCE)),
        (_ws_producer, (1, k_desc, v_desc, q_smem, k_smem, v_smem, full, empty, turn, o_ptr, lse_ptr, T, TC, qk_scale,
                        t0, kvh, n_tiles, HQ, G, D, BN, KSTRIDE, KOFF, STAGES, OVERLAP, PINGPONG,
                       COALESCE)),
    ], [4, 1], [CONSUMER_REGS, 24])


@gluon.jit
def _work_tile(w, T, HKV: gl.constexpr, BLOCK_T: gl.constexpr, BN: gl.constexpr, KSTRIDE: gl.constexpr,
               KOFF: gl.constexpr, TC):
    """Work item ``w`` of the persistent kernel, longest first: ``(t0, kvh, n_tiles)``."""
    n_pb = (T + BLOCK_T - 1) // BLOCK_T
    t0 = (n_pb - 1 - w // HKV) * BLOCK_T
    t_last = gl.minimum(t0 + BLOCK_T, T) - 1
    n_keys = gl.where(t_last >= KOFF, gl.minimum(TC, (t_last - KOFF) // KSTRIDE + 1), 0)
    return t0, w % HKV, (n_keys + BN - 1) // BN


@gluon.jit
def _wsp_producer(part, k_desc, v_desc, k_smem, v_smem, full, empty, q_ptr, o_ptr, lse_ptr, T, TC, qk_scale, n_work,
                  HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
                  BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr):
    """Persistent producer: the K/V tiles of this program's work items, one ring for all of them."""
    it = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        t0, kvh, n_tiles = _work_tile(w, T, HKV, BLOCK_T, BN, KSTRIDE, KOFF, TC)
        for j in range(n_tiles):
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(full.index(st), 2 * BN * D * 2)
            _tma_load(k_desc, [j * BN, kvh * D], full.index(st), k_smem.index(st))
            _tma_load(v_desc, [j * BN, kvh * D], full.index(st), v_smem.index(st))
            it += 1


@gluon.jit
def _wsp_consume(part, k_desc, v_desc, k_smem, v_smem, full, empty, q_ptr, o_ptr, lse_ptr, T, TC, qk_scale, n_work,
                 HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
                 BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr):
    """Persistent consumer warpgroup: 64 rows of each work item, q held in registers as the wgmma's A operand (no
    shared q buffer to hand between work items), FA3's intra-warpgroup overlap."""
    M: gl.constexpr = 64
    s_layout: gl.constexpr = _warpgroup_mma_layout(BN)
    o_layout: gl.constexpr = _warpgroup_mma_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    ld_layout: gl.constexpr = _store_layout(4)
    r = gl.arange(0, M, layout=gl.SliceLayout(1, ld_layout))
    c = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    it = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        t0, kvh, n_tiles = _work_tile(w, T, HKV, BLOCK_T, BN, KSTRIDE, KOFF, TC)
        p0 = t0 + part * (M // G)
        tq = p0 + r // G
        q = gl.load(q_ptr + ((tq.to(gl.int64) * HQ + kvh * G + r % G) * D)[:, None] + c[None, :],
                    mask=(tq < T)[:, None], other=0.0)
        qa = gl.convert_layout(q, q_layout)
        p_last = gl.minimum(p0 + M // G, T) - 1
        n_keys = gl.where(p_last >= KOFF, gl.minimum(TC, (p_last - KOFF) // KSTRIDE + 1), 0)
        n_full = gl.where(p0 >= KOFF, gl.minimum(TC, (p0 - KOFF) // KSTRIDE + 1), 0) // BN
        m_i, l_i, acc, s_zero, rows_t, cols = _loop_state(p0, M, BN, D, G, s_layout, o_layout)
        acc, m_i, l_i = _overlap_tiles(qa, k_smem, v_smem, full, empty, full, part, it, n_tiles, n_full, cols,
                                       rows_t, n_keys, m_i, l_i, acc, s_zero, qk_scale, BN, KSTRIDE, KOFF, STAGES,
                                       False, o_layout, p_layout)
        it += n_tiles
        _store_rows(acc, m_i, l_i, o_ptr, lse_ptr, p0, T, kvh, HQ, G, D, M, s_layout, o_layout, 4, False)


@gluon.jit
def _cmp_fwd_wsp(q_ptr, k_desc, v_desc, o_ptr, lse_ptr, T, TC, qk_scale, n_work,
                 HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BLOCK_T: gl.constexpr,
                 BN: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr, STAGES: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent warp-specialized kernel: one program per SM walks work items (BLOCK_T positions x one KV head),
    longest first; the producer runs ahead into the next item while the consumers finish and store this one."""
    k_smem, v_smem, full, empty = _kv_ring(k_desc, v_desc, BN, D, STAGES)
    gl.warp_specialize([
        (_wsp_consume, (0, k_desc, v_desc, k_smem, v_smem, full, empty, q_ptr, o_ptr, lse_ptr, T, TC, qk_scale,
                        n_work, HQ, HKV, G, D, BLOCK_T, BN, KSTRIDE, KOFF, STAGES)),
        (_wsp_consume, (1, k_desc, v_desc, k_smem, v_smem, full, empty, q_ptr, o_ptr, lse_ptr, T, TC, qk_scale,
                        n_work, HQ, HKV, G, D, BLOCK_T, BN, KSTRIDE, KOFF, STAGES)),
        (_wsp_producer, (1, k_desc, v_desc, k_smem, v_smem, full, empty, q_ptr, o_ptr, lse_ptr, T, TC, qk_scale,
                         n_work, HQ, HKV, G, D, BLOCK_T, BN, KSTRIDE, KOFF, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


def launch(q, kc, vc, scale, cfg, block_t=8, bn=128, stages=2, overlap=True, warps=8, ws=False, regs=240,
           maxnreg=168, pingpong=False, coalesce=False, persistent=False):
    """``(o, lse)`` of the compressed branch by the Gluon kernel: q ``[1, t, hq, 128]``, kc / vc ``[1, tc, hkv, 128]``
    (bf16, G = hq / hkv = 16)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _, t, hq, d = q.shape
    tc, hkv = kc.shape[1], kc.shape[2]
    layout = gl.NVMMASharedLayout.get_default_for([bn, d], gl.bfloat16)
    k2, v2 = kc.view(tc, hkv * d), vc.view(tc, hkv * d)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d], layout)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d], layout)
    o = torch.empty_like(q)
    lse = torch.empty(1, t, hq, device=q.device, dtype=torch.float32)
    if persistent:
        n_work = triton.cdiv(t, block_t) * hkv
        grid = (min(n_work, torch.cuda.get_device_properties(q.device).multi_processor_count),)
        _cmp_fwd_wsp[grid](
            q, k_desc, v_desc, o, lse, t, tc, scale * 1.4426950408889634, n_work, HQ=hq, HKV=hkv, G=hq // hkv, D=d,
            BLOCK_T=block_t, BN=bn, KSTRIDE=cfg.compress_stride, KOFF=cfg.compress_block - 1, STAGES=stages,
            CONSUMER_REGS=regs, num_warps=4, maxnreg=maxnreg)
        return o, lse
    if ws:
        opts = dict(num_warps=4, maxnreg=maxnreg)
        _cmp_fwd_ws[(triton.cdiv(t, block_t), hkv)](
            q, k_desc, v_desc, o, lse, t, tc, scale * 1.4426950408889634, HQ=hq, HKV=hkv, G=hq // hkv, D=d,
            BLOCK_T=block_t, BN=bn, KSTRIDE=cfg.compress_stride, KOFF=cfg.compress_block - 1, STAGES=stages,
            CONSUMER_REGS=regs, OVERLAP=overlap, PINGPONG=pingpong, COALESCE=coalesce, **opts)
        return o, lse
    _cmp_fwd[(triton.cdiv(t, block_t), hkv)](
        q, k_desc, v_desc, o, lse, t, tc, scale * 1.4426950408889634, HQ=hq, HKV=hkv, G=hq // hkv, D=d,
        BLOCK_T=block_t, BN=bn, KSTRIDE=cfg.compress_stride, KOFF=cfg.compress_block - 1, STAGES=stages,
        COALESCE=coalesce, num_warps=warps)
    return o, lse


# session 16: run 7 the plain kernel, run 8 with edge-only masks, run 9 warp-specialized, run 10 + overlap /
# ping-pong, run 11 tiles and stages of the best, run 13 16-byte output stores, run 14 (this list) persistent
VARIANTS = [dict(ws=True, overlap=True, stages=3), dict(persistent=True, stages=3), dict(persistent=True, stages=2),
            dict(persistent=True, stages=3, regs=232)]


def compile_only() -> None:
    """Compile every variant for sm_90 without a GPU (ptxas ships with Triton) and print registers and spills."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = dict(q_ptr="*bf16", k_desc="tensordesc<bf16[128, 128]>", v_desc="tensordesc<bf16[128, 128]>",
               o_ptr="*bf16", lse_ptr="*fp32", T="i32", TC="i32", qk_scale="fp32")
    for var in VARIANTS:
        bn = var.get("bn", 128)
        layout = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.bfloat16)
        s = dict(sig, k_desc=f"tensordesc<bf16[{bn}, 128],{layout}>", v_desc=f"tensordesc<bf16[{bn}, 128],{layout}>")
        const = dict(HQ=64, HKV=4, G=16, D=128, BLOCK_T=8, BN=bn, KSTRIDE=16, KOFF=31, STAGES=var["stages"],
                     COALESCE=var.get("coalesce", False))
        if var.get("persistent"):
            sig_p = dict(s, n_work="i32")
            const.pop("COALESCE")
            const.update(CONSUMER_REGS=var.get("regs", 240), num_warps=4)
            src = GluonASTSource(_cmp_fwd_wsp, dict(sig_p, **{k: "constexpr" for k in const}), const)
            ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
            _print_usage(var, ck)
            continue
        if var.get("ws"):
            const.update(CONSUMER_REGS=var.get("regs", 240), OVERLAP=var["overlap"],
                         PINGPONG=var.get("pingpong", False), num_warps=4)
            opts, fn = dict(num_warps=4, maxnreg=var.get("maxnreg", 168)), _cmp_fwd_ws
        else:
            const.update(num_warps=8)
            opts, fn = dict(num_warps=8), _cmp_fwd
        src = GluonASTSource(fn, dict(s, **{k: "constexpr" for k in const}), const)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        _print_usage(var, ck)


def _print_usage(var, ck) -> None:
    from nsa_parallel.bench import cubin_resources
    print(var, cubin_resources(ck), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="gluon_cmp_fwd.json")
    p.add_argument("--compile-only", action="store_true")
    args = p.parse_args()
    if args.compile_only:
        return compile_only()
    from nsa_parallel.bench import compressed_case, emit, timed
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels import flash as F
    cfg, t, rows = NSAConfig(), args.t, []
    q, kc, vc, scale = compressed_case(t, cfg)
    L = F._Launch(q, kc, vc, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW, None, None)
    o_ref, lse_ref = F.masked_forward(q, kc, vc, scale, L)
    emit(rows, args.out, variant="triton (shipped)", ms=timed(lambda: F.masked_forward(q, kc, vc, scale, L)))
    for var in VARIANTS:
        try:
            o, lse = launch(q, kc, vc, scale, cfg, **var)
            torch.cuda.synchronize()
        except Exception as e:  # a variant that does not compile or fit
            emit(rows, args.out, variant=var, error=str(e)[-300:])
            continue
        fin = torch.isfinite(lse_ref)
        err_o = ((o.float() - o_ref.float()).abs().max() / o_ref.float().abs().max()).item()
        err_l = (lse[fin] - lse_ref[fin]).abs().max().item()
        emit(rows, args.out, variant=var, o_rel_err=err_o, lse_abs_err=err_l,
             ms=timed(lambda: launch(q, kc, vc, scale, cfg, **var)))
    emit(rows, args.out, variant="triton (shipped)", ms=timed(lambda: F.masked_forward(q, kc, vc, scale, L)))


if __name__ == "__main__":
    main()
