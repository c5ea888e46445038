"""Variants of the position-masked flash forward (compressed and window branches) on one Hopper GPU: a measurement.

    python -P benchmarks/flash_fwd_variants.py --t 65536 --out flash_fwd_variants.json [--only cmp swa]

Each variant is the shipped ``flash._fwd_kernel`` (fixed length) with one schedule change, checked against the
shipped kernel's output (bf16 tolerance) and timed (median of >= 10 runs):
- ``tma``: K/V tiles fetched by TMA descriptors instead of pointer loads;
- ``ws``: the unmasked middle loop as ``tl.range(..., warp_specialize=True)`` (Triton's automatic producer /
  consumer warp split), with pointer or TMA loads;
- ``pp``: the unmasked loop software-pipelined by hand: tile j+1's ``q k^T`` is issued before tile j's softmax, so
  the tensor cores can run under the exponentials (the overlap FA3 gets inside a warpgroup).
It also prints what Gluon's Hopper module offers in this Triton (the route to hand-written wgmma pipelines).
"""
from __future__ import annotations

import argparse
import inspect
import math

import torch
import triton
import triton.language as tl

from nsa_parallel.bench import emit, timed
from nsa_parallel.kernels import Compression, NSAConfig
from nsa_parallel.kernels import flash as F


def rel(a, b):
    """Max abs error over max |b|, on the entries where ``b`` is finite (rows with no key have lse = -inf)."""
    a, b = a.float(), b.float()
    ok = b.isfinite()
    if not torch.equal(ok, a.isfinite()):
        return float("inf")
    return ((a - b)[ok].abs().max() / b[ok].abs().max().clamp_min(1e-6)).item()


@triton.jit
def _kv(K, V, KD, VD, seq, kbos, kvh, j0, j_hi, HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr):
    """Keys ``j0 .. j0 + BLOCK_N`` and their K/V tiles (TMA pads rows past the tensor's end with zeros)."""
    j = j0 + tl.arange(0, BLOCK_N)
    if TMA:
        k = KD.load([seq, j0, kvh, 0]).reshape(BLOCK_N, D)
        v = VD.load([seq, j0, kvh, 0]).reshape(BLOCK_N, D)
    else:
        _, _, _, k, v = F._kv_tile(K, V, kbos, kvh, j0, j_hi, HKV, D, D, D, D, BLOCK_N)
    return j, k, v


@triton.jit
def _tiles(q, K, V, KD, VD, seq, kbos, kvh, tq, j_start, j_end, j_hi, m_i, l_i, acc, qk_scale,
           HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF,
           WINDOW: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    for j0 in tl.range(j_start, j_end, BLOCK_N, warp_specialize=WS):
        j, k, v = _kv(K, V, KD, VD, seq, kbos, kvh, j0, j_hi, HKV, D, BLOCK_N, TMA)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            vis = F._visible((j * KSTRIDE + KOFF)[None, :], tq[:, None], WINDOW) & (j < j_hi)[None, :]
            s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc = F._softmax_step(s, v, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _tiles_pp(q, K, V, KD, VD, seq, kbos, kvh, j_start, j_end, j_hi, m_i, l_i, acc, qk_scale,
              HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Unmasked tiles with the next tile's scores issued before this tile's softmax."""
    if j_end > j_start:
        _, k, v = _kv(K, V, KD, VD, seq, kbos, kvh, j_start, j_hi, HKV, D, BLOCK_N, TMA)
        s = tl.dot(q, tl.trans(k))
        for j0 in range(j_start + BLOCK_N, j_end, BLOCK_N):
            _, k_n, v_n = _kv(K, V, KD, VD, seq, kbos, kvh, j0, j_hi, HKV, D, BLOCK_N, TMA)
            s_n = tl.dot(q, tl.trans(k_n))
            m_i, l_i, acc = F._softmax_step(s, v, m_i, l_i, acc, qk_scale)
            s, v = s_n, v_n
        m_i, l_i, acc = F._softmax_step(s, v, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _fwd_variant(Q, K, V, KD, VD, O, LSE, CU, T, TK, scale, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                 GP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 KSTRIDE: tl.constexpr, KOFF, WINDOW: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
                 PP: tl.constexpr):
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = F._q_tile(CU, CU, T, TK, HKV, BLOCK_T, G, GP, False)
    seq = tl.program_id(1) // HKV
    row_off = (bos + tq.to(tl.int64)) * HQ + hq
    q = F._load_tile(Q, row_off, rvalid, D, D)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_T * GP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T * GP, D], dtype=tl.float32)
    j_lo, j_hi = F._key_range(t0, T, TK, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    fa, fb = F._full_keys(t0, T, j_lo, j_hi, BLOCK_T, BLOCK_N, KSTRIDE, KOFF, WINDOW)
    m_i, l_i, acc = _tiles(q, K, V, KD, VD, seq, kbos, kvh, tq, j_lo, fa, j_hi, m_i, l_i, acc, qk_scale, HKV, D,
                           BLOCK_N, KSTRIDE, KOFF, WINDOW, True, TMA, False)
    if PP:
        m_i, l_i, acc = _tiles_pp(q, K, V, KD, VD, seq, kbos, kvh, fa, fb, j_hi, m_i, l_i, acc, qk_scale, HKV, D,
                                  BLOCK_N, TMA)
    else:
        m_i, l_i, acc = _tiles(q, K, V, KD, VD, seq, kbos, kvh, tq, fa, fb, j_hi, m_i, l_i, acc, qk_scale, HKV, D,
                               BLOCK_N, KSTRIDE, KOFF, WINDOW, False, TMA, WS)
    m_i, l_i, acc = _tiles(q, K, V, KD, VD, seq, kbos, kvh, tq, tl.maximum(fa, fb), j_hi, j_hi, m_i, l_i, acc,
                           qk_scale, HKV, D, BLOCK_N, KSTRIDE, KOFF, WINDOW, True, TMA, False)
    o, lse = F._finish(acc, m_i, l_i)
    F._store_tile(O, row_off, rvalid, o, D, D)
    tl.store(LSE + row_off, lse, mask=rvalid)


def gluon_probe(rows, out):
    """What this Triton's Gluon offers for Hopper (names and the wgmma call's signature)."""
    try:
        from triton.experimental import gluon  # noqa: F401
        import triton.experimental.gluon.language as gl
        from triton.experimental.gluon.language.nvidia import hopper
        sig = {n: str(inspect.signature(getattr(hopper, n))) for n in ("warpgroup_mma", "warpgroup_mma_wait")
               if hasattr(hopper, n)}
        emit(rows, out, probe="gluon", hopper=[n for n in dir(hopper) if not n.startswith("_")],
             tma=[n for n in dir(hopper.tma) if not n.startswith("_")],
             mbarrier=[n for n in dir(hopper.mbarrier) if not n.startswith("_")],
             gl_has=[n for n in ("warp_specialize", "allocate_shared_memory", "NVMMASharedLayout",
                                 "NVMMADistributedLayout", "barrier", "static_range") if hasattr(gl, n)],
             signatures=sig)
    except Exception as e:
        emit(rows, out, probe="gluon", error=repr(e)[:300])
    emit(rows, out, probe="tl.range", signature=str(inspect.signature(tl.range.__init__)))


def sweep(name, q, k, v, scale, kstride, koff, window, configs, rows, out):
    from triton.tools.tensor_descriptor import TensorDescriptor
    b, t, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    o_ref, lse_ref = F.position_masked_attention(q, k, v, scale, kstride, koff, window)
    L = F._Launch(q, k, v, kstride, koff, window, None, None, None)
    grid, const, opts = L.fwd
    o, lse = torch.empty_like(o_ref), torch.empty_like(lse_ref)
    ship = lambda: F._fwd_kernel[grid](q, k, v, o, lse, *L.args(), scale, **const, **opts)  # noqa: E731
    emit(rows, out, branch=name, variant="shipped", tiles=[const["BLOCK_T"] * const["GP"], const["BLOCK_N"],
                                                           opts.get("num_warps", 4), opts["num_stages"]],
         ms=timed(ship))
    cu = torch.zeros(1, device=q.device, dtype=torch.int32)
    for variant in ("ptr", "tma", "ws", "tma_ws", "pp", "tma_pp"):
        for rows_, keys, warps, stages in configs:
            tma, ws, pp = "tma" in variant, "ws" in variant, "pp" in variant
            gp, block_t = F._tiles(hq // hkv, rows_)
            kd = TensorDescriptor.from_tensor(k, [1, keys, 1, d])
            vd = TensorDescriptor.from_tensor(v, [1, keys, 1, d])
            try:
                o2, lse2 = torch.empty_like(o_ref), torch.empty_like(lse_ref)
                fn = lambda: _fwd_variant[(triton.cdiv(t, block_t), b * hkv)](  # noqa: E731
                    q, k, v, kd, vd, o2, lse2, cu, t, tk, scale, HQ=hq, HKV=hkv, G=hq // hkv, GP=gp, D=d,
                    BLOCK_T=block_t, BLOCK_N=keys, KSTRIDE=kstride, KOFF=koff, WINDOW=window, TMA=tma, WS=ws,
                    PP=pp, num_warps=warps, num_stages=stages)
                fn()
                err = max(rel(o2, o_ref), rel(lse2, lse_ref))
                emit(rows, out, branch=name, variant=variant, tiles=[rows_, keys, warps, stages], ms=timed(fn),
                     rel_err=err)
            except Exception as e:
                emit(rows, out, branch=name, variant=variant, tiles=[rows_, keys, warps, stages],
                     error=repr(e)[-300:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="flash_fwd_variants.json")
    p.add_argument("--only", nargs="+", default=["cmp", "swa"])
    p.add_argument("--configs", nargs="+", default=["128,128,8,3", "128,64,8,3", "128,128,8,2"],
                   help="rows,keys,warps,stages")
    args = p.parse_args()
    rows = []
    gluon_probe(rows, args.out)
    cfg, hq, hkv, d, dev, dt, t = NSAConfig(), 64, 4, 128, "cuda", torch.bfloat16, args.t
    torch.manual_seed(0)
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    k, v = (torch.randn(1, t, hkv, d, device=dev, dtype=dt) for _ in "kv")
    scale = 1 / math.sqrt(d)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    if "cmp" in args.only:
        with torch.no_grad():
            ck, cv = (Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dt)
                      for _ in "kv")
            kc, vc = ck(k).contiguous(), cv(v).contiguous()
        sweep("cmp", q, kc, vc, scale, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW, configs, rows,
              args.out)
    if "swa" in args.only:
        sweep("swa", q, k, v, scale, 1, 0, cfg.window, configs, rows, args.out)


if __name__ == "__main__":
    main()
