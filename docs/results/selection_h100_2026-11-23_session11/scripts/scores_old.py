"""The selection-scores kernel as of commit 84d75fb (q kc^T products, heads summed across lanes), kept beside the
new one for a same-run A/B (scores_ab.py). A record of what was measured, not shipped code."""
import torch
import triton
import triton.language as tl

from nsa_parallel.kernels.compress import SCORES_STAGES, SCORES_WARPS, SCORES_WIDE_STAGES
from nsa_parallel.kernels.config import NSAConfig
from nsa_parallel.kernels.flash import _load_lse2, _load_tile, _q_tile, _tiles
from nsa_parallel.kernels.interface import check_triton_config
from nsa_parallel.kernels.varlen import max_seqlen

SCORES_BLOCK_M, SCORES_TOKENS, SCORES_ONE_PASS = 128, 64, True


@triton.jit
def overlap_weights(A: tl.constexpr, S: tl.constexpr):
    """Stride-slot overlap (eq. 9) of compressed token ``j*S + r`` (``r < S``; A slots per token, S per selection
    block, A <= S) with selection block j and with block j + 1: ``(w_own [S], w_spill [S])`` fp32."""
    r = tl.arange(0, S)
    return tl.minimum(A, S - r).to(tl.float32), tl.maximum(r + A - S, 0).to(tl.float32)


@triton.jit
def _scores_kernel(Q, KC, LSE, SC, CU, CU_K, T_FIXED, TK_FIXED, NS, QOFF, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   DK: tl.constexpr, BDK: tl.constexpr, BLOCK_T: tl.constexpr, BJ: tl.constexpr,
                   S: tl.constexpr, A: tl.constexpr, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
                   SEL_BLOCK: tl.constexpr, VARLEN: tl.constexpr, ONE_PASS: tl.constexpr):
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
        w_own, w_spill = overlap_weights(A, S)
        kk = tl.arange(0, BJ)
        carry = tl.zeros([BLOCK_T], dtype=tl.float32)  # the previous tile's last block's spill
        for j0 in range(0, n_blocks, BJ):
            ci = j0 * S + tl.arange(0, BJ * S)  # the compressed tokens of this tile of selection blocks
            cvalid = ci < TK
            kc = tl.load(KC + ((kbos + ci.to(tl.int64)) * HKV + kvh)[:, None] * DK + dk[None, :],
                         mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
            s = tl.dot(q, tl.trans(kc)) * qk_scale
            vis = cvalid[None, :] & ((ci * KSTRIDE + KOFF)[None, :] <= tq[:, None] + QOFF) & rvalid[:, None]
            p = tl.sum(tl.reshape(tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0), [BLOCK_T, GP, BJ, S]), axis=1)
            own = tl.sum(p * w_own[None, None, :], axis=2)  # [BLOCK_T, BJ]
            spill = tl.sum(p * w_spill[None, None, :], axis=2)
            # block k takes block k - 1's spill: a shift along the block axis, as an exact 0/1 sum
            shifted = tl.sum(tl.where(kk[None, :, None] == kk[None, None, :] + 1, spill[:, None, :], 0.0), axis=2)
            blk = own + shifted + tl.where(kk[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(kk[None, :] == BJ - 1, spill, 0.0), axis=1)
            j = j0 + kk
            out = SC + ((bos + tpos.to(tl.int64)) * HKV + kvh)[:, None] * NS + j[None, :]
            tl.store(out, blk, mask=(tpos < T)[:, None] & (j < NS)[None, :])
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


def selection_scores_old(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                     max_t=None, q_offset: int = 0):
    """Block importance ``[b, t, hkv, ns_max]`` fp32 (entries of blocks after a query's own are undefined).

    With ``q_offset`` (fixed-length only) query ``i`` sits at position ``i + q_offset`` and the block ids are
    global: ``ns_max`` counts the blocks up to the last query."""
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
    gp, block_t = _tiles(g, SCORES_BLOCK_M)
    scores = torch.empty(b, t, hkv, ns, device=q.device, dtype=torch.float32)
    nseq = cu_seqlens.numel() - 1 if varlen else b
    dummy = q.new_zeros(1, dtype=torch.int32)
    _scores_kernel[(triton.cdiv(max_t, block_t), nseq * hkv)](
        q.contiguous(), k_cmp.contiguous(), lse_cmp, scores, cu_seqlens if varlen else dummy,
        cmp_cu_seqlens if varlen else dummy, t, k_cmp.shape[1], ns, q_offset, scale,
        HQ=hq, HKV=hkv, G=g, GP=gp, DK=dk, BDK=max(16, triton.next_power_of_2(dk)), BLOCK_T=block_t,
        BJ=max(1, SCORES_TOKENS // s), S=s, A=config.stride_slots_per_compress_block, KSTRIDE=config.compress_stride,
        KOFF=config.compress_block - 1, SEL_BLOCK=config.select_block, VARLEN=varlen,
        ONE_PASS=SCORES_ONE_PASS and config.compress_block <= config.select_block,
        num_warps=SCORES_WARPS,
        num_stages=1 if q.dtype == torch.float32 else (SCORES_WIDE_STAGES if dk > 128 else SCORES_STAGES))
    return scores
