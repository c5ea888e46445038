"""The selected branch's forced blocks in the window kernels (``forced.FORCED_TILES``), A/B on one GPU.

    python -P benchmarks/forced_ab.py --t 65536 --rounds 3 --out forced_ab.json

Checks that both ways give the same core output and gradients (bf16), then times, alternating the two in each
round, what the NSA core launches for the window and selected branches: the forward (window kernel, then the
selected loop over all blocks / over the chosen ones from the forced partial) and the backward (window dq + dK/dV,
selected dq + dK/dV), each kernel group alone and together; at the end the whole core's forward and
forward+backward both ways (``nsa_parallel.bench``'s timing). ``--only sweep``: the window kernels' launch configs
with the forced blocks. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import math

import torch

from nsa_parallel.bench import ab_check, bench, core_case, emit, timed
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import flash as F
from nsa_parallel.kernels import forced as FB
from nsa_parallel.kernels import select as S


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="forced_ab.json")
    p.add_argument("--only", nargs="+", default=["check", "branches", "core"])
    p.add_argument("--sweep", nargs="+", default=None, metavar="R,K,W,S",
                   help="the sweep's launch configs (rows,keys,warps,stages; the first is the reference), default "
                        "SWEEP")
    args = p.parse_args()
    sweep = [tuple(int(x) for x in c.split(",")) for c in args.sweep] if args.sweep else SWEEP
    cfg, t, rows, only = NSAConfig(), args.t, [], set(args.only)
    q, kvs, gate, ck, cv, leaves, core, do = core_case(t, cfg)
    if "check" in only:
        emit(rows, args.out, check="core output and gradients, forced tiles on vs off",
             max_rel_err=ab_check(core, leaves, do, lambda on: setattr(FB, "FORCED_TILES", on)))
    scale = 1 / math.sqrt(128)
    qd = q.detach()
    ks, vs, kw, vw = (x.detach() for x in kvs[2:])
    gates = gate.detach().float().permute(3, 0, 1, 2).contiguous()
    g_slc, g_swa = gates[1], gates[2]
    if "branches" in only:
        from nsa_parallel.kernels.compress import compressed_attention
        from nsa_parallel.kernels.topn import select_blocks
        with torch.no_grad():
            kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
        _, lse_cmp = compressed_attention(qd, kc, vc, cfg, scale)
        idx = select_blocks(qd, kc, lse_cmp, cfg, scale)
        Lw = F._Launch(qd, kw, vw, 1, 0, cfg.window, None, None)
        fc = FB.forced_constants(cfg, Lw)
        for rnd in range(args.rounds):
            for on in (False, True):
                Ls = S._SelLaunch(qd, ks, vs, idx, cfg.select_block, None, forced=fc if on else None)
                d = torch.empty(2, 1, t, 64, device="cuda", dtype=torch.float32)
                if on:
                    def win_fwd():
                        return FB.window_forced_forward(qd, kw, vw, ks, vs, scale, Lw, fc)
                    ow, lw, *part = win_fwd()
                    os_, ls_ = S.selected_forward(qd, ks, vs, idx, Ls, scale, partial=[x.clone() for x in part])
                    # timed in place: a resumed walk does the same work whatever the partial holds
                    sel_fwd = lambda: S.selected_forward(qd, ks, vs, idx, Ls, scale, partial=part)  # noqa: E731

                    def win_bwd():
                        dq = FB.window_forced_dq(qd, kw, vw, ks, vs, do, lw, ls_, ow, os_, d[0], d[1], g_swa, g_slc,
                                                 scale, Lw, fc)
                        return dq, F.masked_dkdv(qd, kw, vw, do, lw, d[0], scale, Lw, gate=g_swa)
                    dq = win_bwd()[0]
                    sel_bwd = lambda: S.selected_backward(qd, ks, vs, idx, do, ls_, d[1], Ls, scale,  # noqa: E731
                                                          dq=dq, gate=g_slc)
                else:
                    win_fwd = lambda: F.masked_forward(qd, kw, vw, scale, Lw)  # noqa: E731
                    ow, lw = win_fwd()
                    sel_fwd = lambda: S.selected_forward(qd, ks, vs, idx, Ls, scale)  # noqa: E731
                    os_, ls_ = sel_fwd()
                    win_bwd = lambda: F.masked_backward(qd, kw, vw, do, lw, d[0], scale, Lw,  # noqa: E731
                                                        gate=g_swa, o=ow)
                    dq = win_bwd()[0]
                    sel_bwd = lambda: S.selected_backward(qd, ks, vs, idx, do, ls_, d[1], Ls, scale,  # noqa: E731
                                                          dq=dq, gate=g_slc, o=os_)
                emit(rows, args.out, round=rnd, forced=on, launch_forced=Ls.forced is not None,
                     window_fwd_ms=timed(win_fwd), selected_fwd_ms=timed(sel_fwd),
                     window_bwd_ms=timed(win_bwd), selected_bwd_ms=timed(sel_bwd))
    if "sweep" in only:  # launch configs of the window kernels with the forced blocks: (rows, keys, warps, stages)
        from nsa_parallel.kernels.compress import compressed_attention
        from nsa_parallel.kernels.topn import select_blocks
        with torch.no_grad():
            kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
        _, lse_cmp = compressed_attention(qd, kc, vc, cfg, scale)
        idx = select_blocks(qd, kc, lse_cmp, cfg, scale)
        want = None
        for rows_, keys, warps, stages in sweep:
            Lw = F._Launch(qd, kw, vw, 1, 0, cfg.window, None, None, block_m=rows_, block_n=keys)
            for name in ("fwd", "dq"):
                grid, const, _ = getattr(Lw, name)
                setattr(Lw, name, (grid, const, dict(num_warps=warps, num_stages=stages)))
            fc = FB.forced_constants(cfg, Lw)
            d = torch.empty(2, 1, t, 64, device="cuda", dtype=torch.float32)
            try:
                ow, lw, os_, ls_ = FB.window_forced_forward(qd, kw, vw, ks, vs, scale, Lw, fc)
                dq = FB.window_forced_dq(qd, kw, vw, ks, vs, do, lw, ls_, ow, os_, d[0], d[1], g_swa, g_slc, scale,
                                         Lw, fc)
            except Exception as e:  # e.g. out of shared memory
                emit(rows, args.out, sweep=(rows_, keys, warps, stages), error=str(e)[:200])
                continue
            got = [ow, lw, os_, ls_, dq]
            if want is None:
                want = [x.clone() for x in got]
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                      for a, b in zip(got, want))
            emit(rows, args.out, sweep=(rows_, keys, warps, stages), rel_err=err,
                 fwd_ms=timed(lambda: FB.window_forced_forward(qd, kw, vw, ks, vs, scale, Lw, fc)),
                 dq_ms=timed(lambda: FB.window_forced_dq(qd, kw, vw, ks, vs, do, lw, ls_, ow, os_, d[0], d[1],
                                                         g_swa, g_slc, scale, Lw, fc)))
    for on in (False, True) * (2 if "core" in only else 0):
        FB.FORCED_TILES = on
        fwd, fwdbwd = bench(core, torch.randn_like, leaves)
        emit(rows, args.out, forced=on, branch="core", fwd_ms=fwd, fwdbwd_ms=fwdbwd)


# (rows, keys, warps, stages); the shipped (64, 64, 4, 2) first: the reference of the others' outputs (session 16,
# run 2; run 3 swept the own block's key tile of the forced part at record commit 76bccd6)
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
         (128, 32, 4, 3), (256, 64, 8, 2), (128, 128, 8, 2)]

if __name__ == "__main__":
    main()
