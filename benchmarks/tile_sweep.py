"""Tile / warp / pipeline-stage sweep of the attention kernels on one GPU (a measurement, not a test).

    python -P benchmarks/tile_sweep.py --t 65536 --out tile_sweep.json [--only cmp swa sel]
        [--kernels fwd dq dkdv] [--configs 64,64,4,2 64,128,8,2 ...]   (rows, keys, warps, stages)

For the compressed and window branches (flash.py) and the selected branch (select.py) it runs each kernel with
every candidate launch config, checks the result against the shipped config (bf16 tolerance), and times it (median
of ``triton.testing.do_bench``). The selected branch runs both of its query-major kernels on G=16: the union walk
of neighbouring positions (the kernel for small G) and one program per (position, KV head) looping over that
position's own n blocks. Results stream to stdout as JSON lines and to ``--out``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import triton
import triton.language as tl

from nsa_parallel.bench import emit
from nsa_parallel.kernels import Compression, NSAConfig
from nsa_parallel.kernels import flash as F
from nsa_parallel.kernels import select as S
from nsa_parallel.kernels.compress import compressed_attention
from nsa_parallel.kernels.topn import select_blocks


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def sweep_flash(name, q, k, v, scale, kstride, koff, window, configs, rows, out, kernels=("fwd", "dq", "dkdv")):
    o_ref, lse_ref = F.position_masked_attention(q, k, v, scale, kstride, koff, window)
    do = torch.randn_like(o_ref)
    delta = (o_ref.float() * do.float()).sum(-1)
    ref_grads = None
    for kern in kernels:
        for bm, bn, w, st in configs:
            t0 = time.time()
            try:
                L = F._Launch(q, k, v, kstride, koff, window, None, None, None, block_m=bm, block_n=bn,
                              dkdv_tiles=(bm, bn, w, st))
                kw = dict(**L.const, num_stages=st, num_warps=w)
                if kern == "fwd":
                    o, lse = torch.empty_like(o_ref), torch.empty_like(lse_ref)
                    fn = lambda: F._fwd_kernel[L.grid_q](q, k, v, o, lse, *L.args(), scale, **kw)  # noqa: E731
                    fn()
                    err = rel(o, o_ref)
                elif kern == "dq":
                    dq = torch.empty_like(q)
                    fn = lambda: F._bwd_dq_kernel[L.grid_q](q, k, v, do, lse_ref, delta, dq, *L.args(),  # noqa: E731
                                                            scale, **kw)
                    fn()
                    if ref_grads is None:
                        ref_grads = {"dq": dq.clone()}
                    err = rel(dq, ref_grads["dq"])
                else:
                    split = L.q_split > 0
                    dt = torch.float32 if split else k.dtype
                    dk_, dv_ = torch.zeros_like(k, dtype=dt), torch.zeros_like(v, dtype=dt)

                    def fn():
                        if split:
                            dk_.zero_()
                            dv_.zero_()
                        grid, const, opts = L.dkdv
                        F._bwd_dkdv_kernel[grid](q, k, v, do, lse_ref, delta, dk_, dv_, *L.args(), scale,
                                                 Q_SPLIT=L.q_split, **const, **opts)
                    fn()
                    ref_grads = ref_grads or {}
                    if "dk" not in ref_grads:
                        ref_grads["dk"] = dk_.float().clone()
                    err = rel(dk_, ref_grads["dk"])
                ms = bench(fn)
                emit(rows, out, branch=name, kernel=kern, block_m=bm, block_n=bn, warps=w, stages=st, ms=ms,
                     rel_err=err, secs=time.time() - t0)
            except Exception as e:  # out of shared memory etc.: record and go on
                emit(rows, out, branch=name, kernel=kern, block_m=bm, block_n=bn, warps=w, stages=st,
                     error=str(e)[:200])


@triton.jit
def _tma_rows(T, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """The TMA experiment's program: position, sequence, KV head, row, its G query rows' offsets, channels."""
    t = tl.program_id(0)
    seq = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    row = seq.to(tl.int64) * T + t
    return t, seq, kvh, row, row * HQ + kvh * G + tl.arange(0, G), tl.arange(0, D)


@triton.jit
def _tma_block(KD, VD, IDX, row, seq, kvh, i, HKV: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
               BS: tl.constexpr):
    """Positions and K / V tiles of the position's ``i``-th selected block, by TMA."""
    blk = tl.load(IDX + (row * HKV + kvh) * N + i)
    return (blk * BS + tl.arange(0, BS), KD.load([seq, blk * BS, kvh, 0]).reshape(BS, D),
            VD.load([seq, blk * BS, kvh, 0]).reshape(BS, D))


@triton.jit
def _sel_fwd_tma(Q, KD, VD, IDX, O, LSE, T, scale, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                 N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Experiment: the per-position loop with K/V blocks fetched by TMA descriptors (fixed length, G = 16)."""
    t, seq, kvh, row, row_off, d = _tma_rows(T, HQ, HKV, G, D)
    q = tl.load(Q + row_off[:, None] * D + d[None, :])
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G], dtype=tl.float32)
    acc = tl.zeros([G, D], dtype=tl.float32)
    nv = tl.minimum(N, t // BS + 1)
    for i in range(0, nv):
        pos, k, v = _tma_block(KD, VD, IDX, row, seq, kvh, i, HKV, N, D, BS)
        s = tl.dot(q, tl.trans(k))
        s = tl.where((pos <= t)[None, :], s, float("-inf"))
        m_i, l_i, acc = F._softmax_step(s, v, m_i, l_i, acc, qk_scale)
    o, lse = F._finish(acc, m_i, l_i)
    tl.store(O + row_off[:, None] * D + d[None, :], o.to(O.dtype.element_ty))
    tl.store(LSE + row_off, lse)


@triton.jit
def _sel_dq_tma(Q, KD, VD, IDX, DO, LSE, DELTA, DQ, T, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                G: tl.constexpr, N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    t, seq, kvh, row, row_off, d = _tma_rows(T, HQ, HKV, G, D)
    q = tl.load(Q + row_off[:, None] * D + d[None, :])
    do = tl.load(DO + row_off[:, None] * D + d[None, :])
    lse2 = tl.load(LSE + row_off) * 1.4426950408889634
    delta = tl.load(DELTA + row_off)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([G, D], dtype=tl.float32)
    nv = tl.minimum(N, t // BS + 1)
    for i in range(0, nv):
        pos, k, v = _tma_block(KD, VD, IDX, row, seq, kvh, i, HKV, N, D, BS)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where((pos <= t)[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + row_off[:, None] * D + d[None, :], (dq * scale).to(DQ.dtype.element_ty))


def sweep_select_tma(q, k, v, idx, scale, rows, out):
    """The per-position loop with TMA loads (Hopper), fwd and dq, several warps / stages."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    L0 = S._SelLaunch(q, k, v, idx, 64, None)
    o_ref, lse_ref = S.selected_forward(q, k, v, idx, L0, scale)
    do = torch.randn_like(o_ref)
    delta = F.row_dot(o_ref, do)
    dq_ref, _, _ = S.selected_backward(q, k, v, idx, do, lse_ref, delta, L0, scale)
    kd = TensorDescriptor.from_tensor(k, [1, 64, 1, d])
    vd = TensorDescriptor.from_tensor(v, [1, 64, 1, d])
    c = dict(HQ=hq, HKV=hkv, G=hq // hkv, N=idx.shape[-1], D=d, BS=64)
    for w in (1, 2, 4):
        for st in (2, 3, 4):
            for kern in ("fwd", "dq"):
                try:
                    if kern == "fwd":
                        o, lse = torch.empty_like(o_ref), torch.empty_like(lse_ref)
                        fn = lambda: _sel_fwd_tma[(t, b * hkv)](q, kd, vd, idx, o, lse, t, scale, **c,  # noqa
                                                                num_warps=w, num_stages=st)
                        fn()
                        err = rel(o, o_ref)
                    else:
                        dq = torch.empty_like(q)
                        fn = lambda: _sel_dq_tma[(t, b * hkv)](q, kd, vd, idx, do, lse_ref, delta, dq, t,  # noqa
                                                               scale, **c, num_warps=w, num_stages=st)
                        fn()
                        err = rel(dq, dq_ref)
                    emit(rows, out, branch="sel", kernel=f"{kern}_loop_tma", warps=w, stages=st, ms=bench(fn),
                         rel_err=err)
                except Exception as e:
                    emit(rows, out, branch="sel", kernel=f"{kern}_loop_tma", warps=w, stages=st, error=str(e)[:300])


def sweep_select(q, k, v, idx, scale, rows, out, query_major=True):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    L0 = S._SelLaunch(q, k, v, idx, 64, None)
    o_ref, lse_ref = S.selected_forward(q, k, v, idx, L0, scale)
    do = torch.randn_like(o_ref)
    delta = (o_ref.float() * do.float()).sum(-1)
    dq_ref, dk_ref, dv_ref = S.selected_backward(q, k, v, idx, do, lse_ref, delta, L0, scale)
    # union walk of neighbouring positions with several tile heights, and the per-position loop
    variants = [("union", bt, w, L0.stages) for bt in (1, 4) for w in (2, 4)]
    variants += [("loop", 1, w, st) for w in (1, 2, 4) for st in (1, 2, 3)]
    variants = variants if query_major else []
    for kind, bt, w, st in variants:
        for kern in ("fwd", "dq"):
            try:
                qm = dict(L0.qmajor)
                if kind == "union":
                    qm["BLOCK_T"] = bt
                else:
                    qm.pop("BLOCK_T", None)
                grid = (triton.cdiv(t, bt), b * hkv)
                fk = {("union", "fwd"): S._sel_fwd_kernel, ("loop", "fwd"): S._sel_fwd_loop_kernel,
                      ("union", "dq"): S._sel_bwd_dq_kernel, ("loop", "dq"): S._sel_dq_loop_kernel}[kind, kern]
                if kern == "fwd":
                    o, lse = torch.empty_like(o_ref), torch.empty_like(lse_ref)
                    fn = lambda: fk[grid](q, k, v, idx, o, lse, L0.cu, *L0.sizes, L0.lo, L0.hi, scale,  # noqa
                                          **qm, num_stages=st, num_warps=w)
                    fn()
                    err = rel(o, o_ref)
                else:
                    dq = torch.empty_like(q)
                    fn = lambda: fk[grid](q, k, v, idx, do, lse_ref, delta, dq, L0.cu, *L0.sizes, L0.lo,  # noqa
                                          L0.hi, scale, **qm, num_stages=st, num_warps=w)
                    fn()
                    err = rel(dq, dq_ref)
                emit(rows, out, branch="sel", kernel=f"{kern}_{kind}", block_t=bt, warps=w, stages=st,
                     ms=bench(fn), rel_err=err)
            except Exception as e:
                emit(rows, out, branch="sel", kernel=f"{kern}_{kind}", block_t=bt, warps=w, stages=st,
                     error=str(e)[:200])
    # KV-block-major dK/dV: rows per step, warps, stages, work-item size
    qlist, offsets = S.invert_block_indices(idx, L0.ns_max, None, L0.lo, L0.hi)
    for chunk in (256, 1024):
        items = S.work_items(offsets, idx.numel(), chunk)
        for bq, w, st in ((4, 4, 2), (8, 8, 2), (4, 8, 2), (8, 4, 2), (4, 4, 3), (8, 8, 3), (2, 4, 2)):
            try:
                km = dict(L0.kmajor, BLOCK_Q=bq)
                dk_ = torch.zeros_like(k, dtype=torch.float32)
                dv_ = torch.zeros_like(v, dtype=torch.float32)

                def fn():
                    dk_.zero_()
                    dv_.zero_()
                    S._sel_bwd_dkdv_kernel[(items[0].numel(),)](
                        q, k, v, do, lse_ref, delta, dk_, dv_, qlist, *items, L0.cu, *L0.sizes, L0.ns_max,
                        scale, **km, num_stages=st, num_warps=w)
                fn()
                emit(rows, out, branch="sel", kernel="dkdv", chunk=chunk, block_q=bq, warps=w, stages=st,
                     ms=bench(fn), rel_err=max(rel(dk_, dk_ref), rel(dv_, dv_ref)))
            except Exception as e:
                emit(rows, out, branch="sel", kernel="dkdv", chunk=chunk, block_q=bq, warps=w, stages=st,
                     error=str(e)[:200])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="tile_sweep.json")
    p.add_argument("--only", nargs="+", default=["sel", "cmp", "swa"])
    p.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkdv"], help="flash kernels to sweep")
    p.add_argument("--configs", nargs="+", default=None, help="flash launches as rows,keys,warps,stages")
    p.add_argument("--sel-dkdv-only", action="store_true", help="selected branch: only the dK/dV launches")
    args = p.parse_args()
    cfg, hq, hkv, d, dev, dt, t = NSAConfig(), 64, 4, 128, "cuda", torch.bfloat16, args.t
    torch.manual_seed(0)
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    k, v = (torch.randn(1, t, hkv, d, device=dev, dtype=dt) for _ in "kv")
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        ck, cv = (Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dt) for _ in "kv")
        kc, vc = ck(k).contiguous(), cv(v).contiguous()
    rows = []
    configs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3)]
    if args.configs:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    if "sel" in args.only:
        with torch.no_grad():
            _, lse = compressed_attention(q, kc, vc, cfg, scale)
            idx = select_blocks(q, kc, lse, cfg, scale)
        sweep_select(q, k, v, idx, scale, rows, args.out, not args.sel_dkdv_only)
    if "sel_tma" in args.only:
        with torch.no_grad():
            _, lse = compressed_attention(q, kc, vc, cfg, scale)
            idx = select_blocks(q, kc, lse, cfg, scale)
        sweep_select_tma(q, k, v, idx, scale, rows, args.out)
    if "scores" in args.only:  # the selection-scores kernel's rows per program, warps, stages
        from nsa_parallel.kernels import compress as C
        with torch.no_grad():
            _, lse = compressed_attention(q, kc, vc, cfg, scale)
            defaults = C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES
            want = C.selection_scores(q, kc, lse, cfg, scale)
            own = torch.arange(want.shape[-1], device=dev)[None, :] <= torch.arange(t, device=dev)[:, None] // 64
            for bm, w, st in ((64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 4, 3), (128, 8, 2), (128, 8, 3), (256, 8, 2)):
                C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES = bm, w, st
                try:
                    got = C.selection_scores(q, kc, lse, cfg, scale)
                    err = ((got - want)[0].permute(1, 0, 2)[:, own].abs().max()
                           / want[0].permute(1, 0, 2)[:, own].abs().max()).item()
                    got = None
                    fn = lambda: C.selection_scores(q, kc, lse, cfg, scale)  # noqa: E731
                    emit(rows, args.out, branch="scores", kernel="scores", block_m=bm, warps=w, stages=st,
                         ms=bench(fn), rel_err=err)
                except Exception as e:
                    emit(rows, args.out, branch="scores", kernel="scores", block_m=bm, warps=w, stages=st,
                         error=str(e)[:200])
            C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES = defaults
    if "cmp" in args.only:
        sweep_flash("cmp", q, kc, vc, scale, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW, configs,
                    rows, args.out, args.kernels)
    if "swa" in args.only:
        sweep_flash("swa", q, k, v, scale, 1, 0, cfg.window, configs, rows, args.out, args.kernels)


if __name__ == "__main__":
    main()
