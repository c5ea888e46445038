"""Exponentials partly on the FMA units (``flash.exp2_poly``, FlashAttention-4's trick), A/B on one GPU.

    python -P benchmarks/exp_ab.py --t 65536 --rounds 3 --out exp_ab.json

Switches: ``compress.SCORES_EXP`` (selection scores: 0 all on the special-function units, 1 all polynomial, 2 half,
3 a quarter), ``flash.FLASH_EXP`` (compressed forward) and ``flash.FLASH_EXP_WINDOW`` (window + forced blocks
forward): 0 or 2 (every odd key's by the polynomial). Checks each variant's output against the shipped one, then
times them alternating within each round; at the end the core's forward and forward+backward with the variants
given by ``--core`` (``nsa_parallel.bench``'s timing). JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import math

import torch

from nsa_parallel.bench import bench, core_case, emit, timed
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import compress as C
from nsa_parallel.kernels import flash as F
from nsa_parallel.kernels import forced as FB
from nsa_parallel.kernels.topn import select_topn


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="exp_ab.json")
    p.add_argument("--only", nargs="+", default=["scores", "cmp", "window", "core"])
    p.add_argument("--core", nargs="+", default=["0,0,0", "2,2,2", "3,2,2"],
                   help="SCORES_EXP,FLASH_EXP,FLASH_EXP_WINDOW triples for the core timing")
    args = p.parse_args()
    cfg, t, rows, only = NSAConfig(), args.t, [], set(args.only)
    q, kvs, gate, ck, cv, leaves, core, do = core_case(t, cfg)
    scale = 1 / math.sqrt(128)
    qd = q.detach()
    ks, vs, kw, vw = (x.detach() for x in kvs[2:])
    with torch.no_grad():
        kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
    Lc = F._Launch(qd, kc, vc, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW, None, None)
    o_c, lse_c = F.masked_forward(qd, kc, vc, scale, Lc)
    Lw = F._Launch(qd, kw, vw, 1, 0, cfg.window, None, None)
    fc = FB.forced_constants(cfg, Lw)
    ns = cfg.num_select_blocks(t)
    valid = (torch.arange(ns, device="cuda")[None, :] <= torch.arange(t, device="cuda")[:, None] // cfg.select_block)
    valid = valid[None, :, None, :].expand(1, t, 4, ns)

    def scores():
        return C.selection_scores(qd, kc, lse_c, cfg, scale)

    def cmp():
        return F.masked_forward(qd, kc, vc, scale, Lc)

    def window():
        return FB.window_forced_forward(qd, kw, vw, ks, vs, scale, Lw, fc)

    cases = []
    if "scores" in only:
        C.SCORES_EXP = 0
        s0 = scores()
        i0 = select_topn(s0, cfg)
        for e in (1, 2, 3):
            C.SCORES_EXP = e
            s = scores()
            emit(rows, args.out, check="scores", exp=e, max_rel_err=rel(s[valid], s0[valid]),
                 topn_rows_differing=(select_topn(s, cfg) != i0).any(-1).float().mean().item())
        cases += [("scores", e, lambda e=e: setattr(C, "SCORES_EXP", e), scores) for e in (0, 1, 2, 3)]
        C.SCORES_EXP = 0
        del s0, s
    for name, attr, fn in (("cmp", "FLASH_EXP", cmp), ("window", "FLASH_EXP_WINDOW", window)):
        if name in only:
            setattr(F, attr, 0)
            want = fn()
            setattr(F, attr, 2)
            emit(rows, args.out, check=name, exp=2, max_rel_err=[rel(a, b) for a, b in zip(fn(), want)])
            setattr(F, attr, 0)
            cases += [(name, e, lambda e=e, attr=attr: setattr(F, attr, e), fn) for e in (0, 2)]
    for rnd in range(args.rounds):
        for name, e, switch, fn in cases:
            switch()
            emit(rows, args.out, round=rnd, kernel=name, exp=e, ms=timed(fn))
        C.SCORES_EXP = F.FLASH_EXP = F.FLASH_EXP_WINDOW = 0
    if "core" in only:
        for rnd in range(2):
            for triple in args.core:
                C.SCORES_EXP, F.FLASH_EXP, F.FLASH_EXP_WINDOW = (int(x) for x in triple.split(","))
                fwd, fwdbwd = bench(core, torch.randn_like, leaves)
                emit(rows, args.out, round=rnd, kernel="core", exps=triple, fwd_ms=fwd, fwdbwd_ms=fwdbwd)


if __name__ == "__main__":
    main()
