"""A Gluon (``triton.experimental.gluon``) prototype of the selection-scores pass, against the shipped Triton kernel
(``compress._scores_kernel``): a measurement, not shipped code.

    python -P benchmarks/gluon_scores.py --t 65536 --out gluon_scores.json     # on a Hopper GPU
    python benchmarks/gluon_scores.py --compile-only                           # sm_90 compile check, no GPU

The question it answered (session 17, docs/benchmarks.md): at 64k a tile of the shipped kernel takes ~2000 SM
cycles, about the ~1000 of its ``kc q^T`` product (wgmma) plus the ~1000 of its exponentials (16 per SM and
cycle), as if the two never overlapped, and Triton 3.6 waits on every wgmma right after issuing it. Here
``overlap=True`` issues tile j+1's product asynchronously before tile j's exponentials (one warpgroup per program,
two accumulators of N = 128 columns: 8 positions x 16 heads). Answer: no gain (4.89-5.05 ms against the shipped
4.72-4.79); Nsight Compute (run 4) shows why: the special-function pipe is not the limit (math-pipe-throttle
stalls 0.01 cycles per issue), the warps wait on fixed-latency dependencies (1.4 of 4.8 cycles) and barriers at
two warps per scheduler. Three CTAs per SM (``overlap=False, stages=2``) gave 4.62 ms, 2-3% under the shipped.
The head sum stays in registers (the columns in ``compress._score_columns``' order, reshape + sum in the wgmma
layout); the slots -> blocks map (eq. 9) and its shift by one block are small layout conversions. Output
bit-identical to the shipped kernel's. Fixed-length batch of one, G = 16, head dim 128, bf16, the paper's A = 2
slots per compressed token, S = 4 per selection block.
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.9 / 3.6


@gluon.jit
def _tile_blocks(acc, lse2, carry, j, t0, T, TK, kvh, NS, sc_ptr, qk_scale, HKV: gl.constexpr, BT: gl.constexpr,
                 BC: gl.constexpr, S: gl.constexpr, A: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr,
                 L3: gl.constexpr):
    """Tile j's block scores from its ``kc q^T`` accumulator ``[BC tokens, BT * 16 columns]``: exponentials, the
    head sum (in-thread), visibility, slots -> blocks (eq. 9: a token's slots in its own block and the spill into
    the next, ``carry`` = the previous tile's last spill), and the store of ``[BC/S, BT]`` block scores. Returns
    this tile's last spill."""
    BJ: gl.constexpr = BC // S
    e = gl.exp2(acc * qk_scale - lse2[None, :])
    p = gl.sum(gl.sum(gl.reshape(e, [BC, BT // 4, 8, 4, 2]), axis=4), axis=2)  # [BC, BT/4, 4]: heads summed
    p = gl.reshape(p, [BC, BT])  # position ph * 4 + pl
    pl_: gl.constexpr = p.type.layout
    ci = j * BC + gl.arange(0, BC, layout=gl.SliceLayout(1, pl_))
    tp = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, pl_))
    vis = ((ci * KSTRIDE + KOFF)[:, None] <= tp[None, :]) & (ci < TK)[:, None]
    p3 = gl.reshape(gl.where(vis, p, 0.0), [BJ, S, BT])
    p3l: gl.constexpr = p3.type.layout
    r = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(2, p3l)))
    w_own = gl.minimum(A, S - r).to(gl.float32)
    w_spill = gl.maximum(r + A - S, 0).to(gl.float32)
    own = gl.convert_layout(gl.sum(p3 * w_own[None, :, None], axis=1), gl.SliceLayout(1, L3))  # [BJ, BT]
    spill = gl.convert_layout(gl.sum(p3 * w_spill[None, :, None], axis=1), gl.SliceLayout(0, L3))  # [m, BT]
    kk = gl.arange(0, BJ, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    mm = gl.arange(0, BJ, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    # block k takes block k - 1's spill (an exact 0/1 sum), block 0 the previous tile's last
    shifted = gl.sum(gl.where((kk[:, None] == mm[None, :] + 1)[:, :, None], spill[None, :, :], 0.0), axis=1)
    out_l: gl.constexpr = gl.SliceLayout(1, L3)
    kb0 = gl.arange(0, BJ, layout=gl.SliceLayout(1, out_l))
    blk = own + shifted + gl.where(kb0[:, None] == 0, gl.convert_layout(carry, gl.SliceLayout(0, out_l))[None, :], 0.0)
    kb = j * BJ + kb0
    tq = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, out_l))
    off = (tq.to(gl.int64) * HKV + kvh) * NS
    gl.store(sc_ptr + off[None, :] + kb[:, None], blk, mask=(kb < NS)[:, None] & (tq < T)[None, :])
    ms = gl.arange(0, BJ, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3)))
    return gl.sum(gl.where((ms == BJ - 1)[:, None], spill, 0.0), axis=0)


@gluon.jit
def _scores_gluon(q_ptr, lse_ptr, kc_desc, sc_ptr, T, TK, NS, qk_scale,
                  HQ: gl.constexpr, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BT: gl.constexpr,
                  BC: gl.constexpr, S: gl.constexpr, A: gl.constexpr, KSTRIDE: gl.constexpr, KOFF: gl.constexpr,
                  SEL_BLOCK: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    N: gl.constexpr = BT * G
    BJ: gl.constexpr = BC // S
    t0 = gl.program_id(0) * BT
    kvh = gl.program_id(1)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    L3: gl.constexpr = gl.BlockedLayout([1, BJ, 1], [4, 1, 8], [4, 1, 1], [2, 1, 0])  # [k, m, position]

    # the query rows in _score_columns' order: column ((ph * 8 + hh) * 4 + pl) * 2 + hl = head hh * 2 + hl of
    # position ph * 4 + pl, so each thread's accumulator columns hold all heads of its positions
    c = gl.arange(0, N, layout=gl.SliceLayout(1, ld_l))
    tq = t0 + (c // (G * 4)) * 4 + (c // 2) % 4
    hq = kvh * G + ((c // 8) % (G // 2)) * 2 + c % 2
    d = gl.arange(0, D, layout=gl.SliceLayout(0, ld_l))
    q = gl.load(q_ptr + ((tq.to(gl.int64) * HQ + hq) * D)[:, None] + d[None, :], mask=(tq < T)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [N, D], gl.NVMMASharedLayout.get_default_for([N, D], gl.bfloat16),
                                       q)
    cl = gl.arange(0, N, layout=gl.SliceLayout(0, acc_l))
    tql = t0 + (cl // (G * 4)) * 4 + (cl // 2) % 4
    hql = kvh * G + ((cl // 8) % (G // 2)) * 2 + cl % 2
    lse = gl.load(lse_ptr + tql.to(gl.int64) * HQ + hql, mask=tql < T, other=float("inf"))
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634

    kc_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BC, D], kc_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    carry = gl.zeros([BT], gl.float32, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    n_blocks = (gl.minimum(t0 + BT, T) - 1) // SEL_BLOCK + 1
    n_tiles = (n_blocks + BJ - 1) // BJ
    nbytes: gl.constexpr = BC * D * 2
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            mbarrier.expect(bars.index(i), nbytes)
            _tma_load(kc_desc, [i * BC, kvh * D], bars.index(i), kc_smem.index(i))
    zero = gl.zeros([BC, N], gl.float32, layout=acc_l)
    qT = q_smem.permute((1, 0))
    if OVERLAP:
        if n_tiles > 0:
            mbarrier.wait(bars.index(0), 0)
            acc = warpgroup_mma(kc_smem.index(0), qT, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            for j in range(n_tiles - 1):
                st1 = (j + 1) % STAGES
                mbarrier.wait(bars.index(st1), ((j + 1) // STAGES) & 1)
                # tile j+1's product runs while tile j's exponentials do
                nxt = warpgroup_mma(kc_smem.index(st1), qT, zero, use_acc=False, is_async=True)
                st = j % STAGES
                if j + STAGES < n_tiles:  # tile j's product is done: its buffer takes tile j + STAGES
                    mbarrier.expect(bars.index(st), nbytes)
                    _tma_load(kc_desc, [(j + STAGES) * BC, kvh * D], bars.index(st), kc_smem.index(st))
                carry = _tile_blocks(acc, lse2, carry, j, t0, T, TK, kvh, NS, sc_ptr, qk_scale, HKV, BT, BC, S, A,
                                     KSTRIDE, KOFF, L3)
                acc = warpgroup_mma_wait(0, deps=(nxt,))
            carry = _tile_blocks(acc, lse2, carry, n_tiles - 1, t0, T, TK, kvh, NS, sc_ptr, qk_scale, HKV, BT, BC, S, A,
                         KSTRIDE, KOFF, L3)
    else:
        for j in range(n_tiles):
            st = j % STAGES
            mbarrier.wait(bars.index(st), (j // STAGES) & 1)
            acc = warpgroup_mma(kc_smem.index(st), qT, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            if j + STAGES < n_tiles:
                mbarrier.expect(bars.index(st), nbytes)
                _tma_load(kc_desc, [(j + STAGES) * BC, kvh * D], bars.index(st), kc_smem.index(st))
            carry = _tile_blocks(acc, lse2, carry, j, t0, T, TK, kvh, NS, sc_ptr, qk_scale, HKV, BT, BC, S, A, KSTRIDE,
                                 KOFF, L3)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def launch(q, kc, lse, scale, cfg, stages=3, overlap=True, bt=8, maxnreg=None):
    """Block scores ``[1, t, hkv, ns]`` fp32 by the Gluon kernel (entries after a query's own block undefined)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _, t, hq, d = q.shape
    tc, hkv = kc.shape[1], kc.shape[2]
    bc = 64
    layout = gl.NVMMASharedLayout.get_default_for([bc, d], gl.bfloat16)
    k2 = kc.view(tc, hkv * d)
    kc_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bc, d], layout)
    ns = cfg.num_select_blocks(t)
    sc = torch.empty(1, t, hkv, ns, device=q.device, dtype=torch.float32)
    _scores_gluon[(triton.cdiv(t, bt), hkv)](
        q, lse, kc_desc, sc, t, tc, ns, scale * 1.4426950408889634, HQ=hq, HKV=hkv, G=hq // hkv, D=d, BT=bt, BC=bc,
        S=cfg.stride_slots_per_select_block, A=cfg.stride_slots_per_compress_block, KSTRIDE=cfg.compress_stride,
        KOFF=cfg.compress_block - 1, SEL_BLOCK=cfg.select_block, STAGES=stages, OVERLAP=overlap, num_warps=4,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return sc


# run 3: the first three (two CTAs per SM); run 5: three CTAs per SM (2 stages: 66 KB of shared memory; the overlap
# capped at 168 registers)
VARIANTS = [dict(overlap=True, stages=3), dict(overlap=True, stages=2), dict(overlap=False, stages=3),
            dict(overlap=False, stages=2), dict(overlap=True, stages=2, maxnreg=168)]


def compile_only() -> None:
    """Compile every variant for sm_90 without a GPU (ptxas ships with Triton); print registers and shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from nsa_parallel.bench import cubin_resources
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    sig = dict(q_ptr="*bf16", lse_ptr="*fp32", kc_desc=f"tensordesc<bf16[64, 128],{layout}>", sc_ptr="*fp32",
               T="i32", TK="i32", NS="i32", qk_scale="fp32")
    for var in VARIANTS:
        const = dict(HQ=64, HKV=4, G=16, D=128, BT=8, BC=64, S=4, A=2, KSTRIDE=16, KOFF=31, SEL_BLOCK=64,
                     STAGES=var["stages"], OVERLAP=var["overlap"], num_warps=4)
        src = GluonASTSource(_scores_gluon, dict(sig, **{k: "constexpr" for k in const}), const)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, **({"maxnreg": var["maxnreg"]} if "maxnreg" in var else {})))
        print(var, "shared", ck.metadata.shared, cubin_resources(ck), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="gluon_scores.json")
    p.add_argument("--compile-only", action="store_true")
    args = p.parse_args()
    if args.compile_only:
        return compile_only()
    from nsa_parallel.bench import compressed_case, emit, timed
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels import compress as C
    from nsa_parallel.kernels.topn import select_topn
    cfg, rows = NSAConfig(), []
    for t in sorted({4099, args.t}):
        q, kc, vc, scale = compressed_case(t, cfg)
        _, lse = C.compressed_attention(q, kc, vc, cfg, scale)
        ref = C.selection_scores(q, kc, lse, cfg, scale)
        ns = ref.shape[-1]
        valid = (torch.arange(ns, device="cuda")[None, :] <= torch.arange(t, device="cuda")[:, None] // 64)
        valid = valid[None, :, None, :].expand_as(ref)
        idx_ref = select_topn(ref, cfg)
        if t == args.t:
            emit(rows, args.out, t=t, variant="triton (shipped)", ms=timed(lambda: C.selection_scores(q, kc, lse, cfg,
                                                                                                    scale)))
        for var in VARIANTS:
            try:
                sc = launch(q, kc, lse, scale, cfg, **var)
                torch.cuda.synchronize()
            except Exception as e:  # a variant that does not compile or fit
                emit(rows, args.out, t=t, variant=var, error=str(e)[-400:])
                continue
            err = ((sc[valid] - ref[valid]).abs().max() / ref[valid].abs().max()).item()
            differ = (select_topn(sc, cfg) != idx_ref).any(-1).float().mean().item()
            r = dict(t=t, variant=var, rel_err=err, topn_rows_differing=differ)
            if t == args.t:
                r["ms"] = timed(lambda: launch(q, kc, lse, scale, cfg, **var))
            emit(rows, args.out, **r)
        if t == args.t:
            emit(rows, args.out, t=t, variant="triton (shipped)", ms=timed(lambda: C.selection_scores(q, kc, lse, cfg,
                                                                                                    scale)))


if __name__ == "__main__":
    main()
