"""How close the selected branch's forward loop is to the L2 roofline of its own gathers, on one GPU.

    python -P benchmarks/l2_probe.py --t 65536 --out l2_probe.json

The NSA core runs once on the bench's inputs (``nsa_parallel.bench.core_case``); the selected forward's launch
(indices, grid, constants) is captured and replayed by probe kernels that walk the same blocks of the same
positions in the same order (the non-forced entries of each position's list, as ``_sel_fwd_loop_kernel`` does):

- ``real``: the shipped loop kernel itself (its launch config);
- ``dots``: its two products per block, no softmax (does the softmax's latency cost anything?);
- ``load``: the K and V blocks summed into an fp32 tile, no products, at 2-8 warps and 1-4 stages (the gathers'
  own roofline: if one of these moves the same bytes much faster than ``real``, the loop has headroom);
- ``load_seq``: as many blocks read backwards from the position's own (no gather; neighbouring positions read the
  same blocks, so this is an upper bound with reuse, not L2's streaming rate).

The twenty-third session's run (docs/results/h100_2026-12-07_session23) also timed two listed blocks a step
(``select.SEL_FWD_PAIRED``, since removed: slower at every launch config).

Each row: ms (``triton.testing.do_bench`` median), the K/V bytes the entries move and the rate in TB/s. JSON lines
to stdout and ``--out``. A measurement script: nothing here is shipped.
"""
from __future__ import annotations

import argparse

import triton
import triton.language as tl

from nsa_parallel.kernels.forced import free_range
from nsa_parallel.kernels.flash import _load_tile, _q_tile
from nsa_parallel.kernels.select import _listed_block_kv, _position_blocks


@triton.jit
def _probe_kernel(Q, K, V, IDX, O, LSE, CU, T_FIXED, TK_FIXED, QOFF, KBASE, LO, HI, scale,
                  HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr,
                  NP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                  BDV: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr, KD=None, VD=None,
                  TMA: tl.constexpr = False, FORCED: tl.constexpr = False, INITIAL: tl.constexpr = 0,
                  LOCAL: tl.constexpr = 0, MODE: tl.constexpr = 0, SEQ: tl.constexpr = False):
    # MODE 0: the two products of each block (no softmax); MODE 1: K + V summed into an fp32 tile
    bos, T, kbos, TK, kvh, t0, tq, hq, rvalid = _q_tile(CU, CU, T_FIXED, TK_FIXED, HKV, 1, G, GP, VARLEN)
    if t0 >= T:
        return
    row_off, list_start, i_lo, i_hi = _position_blocks(IDX, bos, t0, kvh, hq, LO, HI, HQ, HKV, N, NP)
    if FORCED:
        i_lo, i_hi = free_range(t0, i_hi, BS, INITIAL, LOCAL)
    if MODE != 1:
        q = _load_tile(Q, row_off, rvalid, DK, BDK)
        acc = tl.zeros([GP, BDV], dtype=tl.float32)
        for i in range(i_lo, i_hi):
            pos, k, v = _listed_block_kv(IDX, list_start, i, K, V, kbos, KBASE, TK, kvh, HKV, DK, DV, BDK, BDV, BS,
                                         KD, VD, TMA)
            s = tl.dot(q, tl.trans(k))
            acc = tl.dot(s.to(v.dtype), v, acc)
        out = tl.sum(acc, 1)
    else:
        acc = tl.zeros([BS, BDK], dtype=tl.float32)
        r = tl.arange(0, BS)
        d = tl.arange(0, BDK)
        for i in range(i_lo, i_hi):
            if SEQ:  # consecutive blocks from the position's own: the same count of blocks, no gather
                blk = (t0 // BS - i).to(tl.int64)
                blk = tl.where(blk < 0, blk + T // BS, blk)
            else:
                blk = tl.load(IDX + list_start + i).to(tl.int64)
            off = ((kbos + blk * BS + r)[:, None] * HKV + kvh) * DK + d[None, :]
            acc += tl.load(K + off).to(tl.float32) + tl.load(V + off).to(tl.float32)
        out = tl.sum(acc, 0)
    tl.store(LSE + row_off, tl.sum(out) + tl.zeros([GP], dtype=tl.float32), mask=rvalid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="l2_probe.json")
    p.add_argument("--quick", action="store_true", help="fewer launch configs (a short device call)")
    p.add_argument("--dry", action="store_true", help="each probe once on the CPU (TRITON_INTERPRET=1), no timing")
    args = p.parse_args()
    import torch

    from nsa_parallel.bench import core_case, emit
    if args.dry:  # emit names the CUDA device
        def emit(rows, out, **row):
            print(row)
    from nsa_parallel.kernels import NSAConfig, parallel, select

    seen = {}
    real_fwd = parallel.selected_forward

    def capture(q, k, v, indices, L, scale, **kw):
        seen.update(q=q, k=k, v=v, indices=indices, L=L, scale=scale, kw=kw)
        return real_fwd(q, k, v, indices, L, scale, **kw)

    parallel.selected_forward = capture
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig(), dev="cpu" if args.dry else "cuda",
                                                       **(dict(d=32) if args.dry else {}))
    with torch.no_grad():
        core()
    parallel.selected_forward = real_fwd
    q, k, v, idx, L, scale = (seen[n] for n in ("q", "k", "v", "indices", "L", "scale"))
    cfg = NSAConfig()
    # the non-forced valid entries, as free_range walks them
    t = torch.arange(idx.shape[1], device=idx.device)
    own = t // cfg.select_block
    valid = (idx >= 0)
    forced = (idx < cfg.select_initial) | (idx > (own - cfg.select_local)[None, :, None, None])
    entries = int((valid & ~forced).sum())
    block_bytes = cfg.select_block * (k.shape[-1] + v.shape[-1]) * k.element_size()
    moved = entries * block_bytes
    rows = []
    emit(rows, args.out, t=args.t, entries=entries, kv_gb=moved / 1e9, grid=list(L.grid_q),
         real_config=dict(warps=L.warps_fwd, stages=L.stages))
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    common = (q, k, v, idx, o, lse, L.cu, *L.sizes, L.lo, L.hi, scale)

    def timed(fn):
        if args.dry:
            fn()
            return 1.0
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")

    def rate(name, ms, **kw):
        emit(rows, args.out, probe=name, ms=round(ms, 3), tb_s=round(moved / ms / 1e9, 2), **kw)

    fused = seen["kw"]
    real_args = {}
    if fused.get("gated_sum") is not None:
        oc, ow, g = fused["gated_sum"]
        real_args = dict(OC=oc, OW=ow, GATE=g, OUT=torch.empty_like(q), GATED_SUM=True)
    # the loop resumes from (and completes in place) the window kernel's partial over the forced blocks: timed
    # again and again on the same buffers, which changes the values, not the work
    po, plse = fused["partial"] if fused.get("partial") else (o, lse)

    def real():
        select._sel_fwd_loop_kernel[L.grid_q](q, k, v, idx, po, plse, *common[6:], **L.qmajor, **real_args,
                                              **L.kv(k, v), num_stages=L.stages, num_warps=L.warps_fwd)
    rate("real", timed(real))
    for warps, stages in ((1, 2),) if args.quick else ((1, 2), (1, 3), (2, 2)):
        rate("dots", timed(lambda: _probe_kernel[L.grid_q](*common, **L.qmajor, **L.kv(k, v), MODE=0, num_warps=warps,
                                                           num_stages=stages)), warps=warps, stages=stages)
    const = dict(L.qmajor)
    for seq in (False, True):
        for warps in (4, 8) if args.quick else (2, 4, 8):
            for stages in (2,) if args.quick else (1, 2, 3, 4):
                try:
                    ms = timed(lambda: _probe_kernel[L.grid_q](*common, **const, MODE=1, SEQ=seq, num_warps=warps,
                                                               num_stages=stages))
                except Exception as e:  # noqa: BLE001  (out of resources at some configs)
                    emit(rows, args.out, probe="load_seq" if seq else "load", warps=warps, stages=stages,
                         error=repr(e)[:200])
                    continue
                rate("load_seq" if seq else "load", ms, warps=warps, stages=stages)


if __name__ == "__main__":
    main()
