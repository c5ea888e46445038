"""The flash dK/dV kernel (compressed and window branches), A/B on one GPU: a previous commit's ``flash.py`` against
the tree's.

    python -P benchmarks/dkdv_ab.py --old-from REV                                # here: write benchmarks/_old_flash.py
    python -P benchmarks/dkdv_ab.py --t 65536 --rounds 3 --out dkdv_ab.json       # on the GPU

The NSA core's shapes (64 query / 4 KV heads, d=128, bf16, paper config; gated as in the core): per branch, dK/dV
of both versions (largest relative difference), then their times alternating in each round. JSON lines to stdout and
``--out``.
"""
from __future__ import annotations

import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    from nsa_parallel.bench import emit, old_vs_new, timed
    args, old = old_vs_new(__doc__, ("flash",), "dkdv_ab.json", HERE)
    if old is None:
        return
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels import flash as F
    old, = old
    cfg, t, rows = NSAConfig(), args.t, []
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, do = mk(1, t, 64, 128), mk(1, t, 64, 128)
    gate = torch.rand(1, t, 64, device="cuda")
    scale = 1 / math.sqrt(128)
    tc = cfg.num_compressed(t)
    branches = dict(compressed=(mk(1, tc, 4, 128), mk(1, tc, 4, 128), cfg.compress_stride, cfg.compress_block - 1,
                                F.NO_WINDOW),
                    window=(mk(1, t, 4, 128), mk(1, t, 4, 128), 1, 0, cfg.window))
    for name, (k, v, kstride, koff, window) in branches.items():
        L = F._Launch(q, k, v, kstride, koff, window, None, None)
        Lo = old._Launch(q, k, v, kstride, koff, window, None, None)
        o, lse = F.masked_forward(q, k, v, scale, L)
        delta = F.row_dot(o, do)
        new_fn = lambda: F.masked_dkdv(q, k, v, do, lse, delta, scale, L, gate=gate)  # noqa: E731
        old_fn = lambda: old.masked_dkdv(q, k, v, do, lse, delta, scale, Lo, gate=gate)  # noqa: E731
        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                  for a, b in zip(new_fn(), old_fn()))
        emit(rows, args.out, branch=name, check="dK/dV new vs old", max_rel_diff=err)
        for rnd in range(args.rounds):
            emit(rows, args.out, branch=name, round=rnd, old_ms=timed(old_fn), new_ms=timed(new_fn))


if __name__ == "__main__":
    main()
