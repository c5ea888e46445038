"""TMA or pointer loads in the flash kernels (``flash.TMA_KERNELS``), A/B on one GPU: a measurement.

    python -P benchmarks/tma_ab.py --t 65536 --rounds 3 --out tma_ab.json

Checks that TMA and pointer loads give the same core output and gradients (bf16 tolerance, ``flash.USE_TMA``),
then times, alternating the variants in each round: each flash branch's forward and backward (``masked_forward``,
``masked_backward`` with ``o=``: the kernels the core launches) with TMA tiles in none, fwd, fwd+dq of its kernels
(``flash.TMA_KERNELS``; session 15's run 3 also had the dK/dV kernel's q/dO rows by TMA and run 4 the
selection-scores kernel's tokens, both slower and removed); the selected branch's per-position loops with and
without TMA (``select.SEL_TMA``); at the end the whole NSA core's forward and forward+backward without and with
TMA (``nsa_parallel.bench``'s timing: medians over >= 10 runs). JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import math

import torch

from nsa_parallel.bench import ab_check, bench, core_case, emit, timed
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import flash as F
from nsa_parallel.kernels import select as S


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="tma_ab.json")
    p.add_argument("--only", nargs="+", default=["check", "flash", "sel", "core"],
                   help="check: TMA vs pointers on the core; flash / sel: the branches' kernels; core: the NSA core")
    args = p.parse_args()
    cfg, t, rows = NSAConfig(), args.t, []
    q, kvs, gate, ck, cv, leaves, core, do = core_case(t, cfg)
    p_only = set(args.only)
    if "check" in p_only:
        emit(rows, args.out, check="core output and gradients, TMA vs pointers",
             max_rel_err=ab_check(core, leaves, do, lambda on: setattr(F, "USE_TMA", on)))
    scale = 1 / math.sqrt(128)
    with torch.no_grad():
        kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
    qd = q.detach()
    branches = dict(cmp=(kc, vc, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW),
                    swa=(kvs[4].detach(), kvs[5].detach(), 1, 0, cfg.window))
    for rnd in range(args.rounds if "flash" in p_only else 0):
        for kernels in VARIANTS:
            F.TMA_KERNELS = frozenset(kernels)
            for name, (k, v, kstride, koff, window) in branches.items():
                L = F._Launch(qd, k, v, kstride, koff, window, None, None)
                o, lse = F.masked_forward(qd, k, v, scale, L)
                fwd = timed(lambda: F.masked_forward(qd, k, v, scale, L))
                bwd = timed(lambda: F.masked_backward(qd, k, v, do, lse, None, scale, L, o=o))
                emit(rows, args.out, round=rnd, tma="+".join(kernels) or "none", branch=name, launch_tma=L.tma,
                     fwd_ms=fwd, bwd_ms=bwd)
    F.TMA_KERNELS = frozenset(ALL)
    if "sel" in p_only:  # the selected branch's per-position loops (G = 16), select.SEL_TMA
        from nsa_parallel.kernels.compress import compressed_attention
        from nsa_parallel.kernels.topn import select_blocks
        k, v = kvs[2].detach(), kvs[3].detach()
        _, lse_cmp = compressed_attention(qd, kc, vc, cfg, scale)
        idx = select_blocks(qd, kc, lse_cmp, cfg, scale)
        for rnd in range(args.rounds):
            for tma in (False, True):
                S.SEL_TMA = tma
                L = S._SelLaunch(qd, k, v, idx, cfg.select_block, None)
                o, lse = S.selected_forward(qd, k, v, idx, L, scale)
                fwd = timed(lambda: S.selected_forward(qd, k, v, idx, L, scale))
                bwd = timed(lambda: S.selected_backward(qd, k, v, idx, do, lse, None, L, scale, o=o))
                emit(rows, args.out, round=rnd, tma=tma, branch="sel", launch_tma=L.tma, fwd_ms=fwd, bwd_ms=bwd)
        S.SEL_TMA = True
    for tma in (False, True) * (2 if "core" in p_only else 0):
        F.USE_TMA = tma
        fwd, fwdbwd = bench(core, torch.randn_like, leaves)
        emit(rows, args.out, tma=tma, branch="core", fwd_ms=fwd, fwdbwd_ms=fwdbwd)


ALL = ("fwd", "dq")
VARIANTS = ((), ("fwd",), ALL)

if __name__ == "__main__":
    main()
