"""The selected branch's dq from the dS tiles its dK/dV pass stores (``select.SEL_DQ_FROM_DS``) against dq
recomputed from K and V, A/B on one GPU.

    python -P benchmarks/ds_handoff_ab.py --t 65536 --rounds 3 --budgets 2 16 --sweep --out ds_handoff_ab.json

Checks that both give the same core output and gradients (bf16, the bench's inputs), lists the selected branch's
backward kernels (torch.profiler, one forward+backward) and the peak memory with the handoff off and on (at each
``--budgets`` value of ``select.SEL_DS_BUFFER_BYTES``, GiB), then per round times the core's forward and
forward+backward (``nsa_parallel.bench.bench``) for each; ``--sweep`` times the handoff's dq kernel launch (warps x
stages) through the whole forward+backward. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="ds_handoff_ab.json")
    args = ap.parse_args()
    import torch

    from nsa_parallel.bench import ab_check, bench, core_case, emit, kernel_times, peak_mem
    from nsa_parallel.kernels import NSAConfig, select

    default = select.SEL_DS_BUFFER_BYTES

    def use_new(on, budget=None) -> None:
        select.SEL_DQ_FROM_DS = bool(on)
        select.SEL_DS_BUFFER_BYTES = default if budget is None else int(budget * 2**30)

    rows = []
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig())
    emit(rows, args.out, check="core output and gradients, dq from stored dS vs recomputed",
         max_rel_err=ab_check(core, leaves, do, use_new))

    def step():
        return torch.autograd.grad(core(), leaves, do)

    cases = [(False, None)] + [(True, b) for b in args.budgets]
    for on, budget in cases:
        use_new(on, budget)
        sel = [(k, us) for k, us, _ in kernel_times(step, 3) if "_sel_" in k]
        emit(rows, args.out, new=on, budget_gib=budget, kernels_ms={k: round(us / 1e3, 3) for k, us in sel},
             peak_gib=peak_mem(core))
    for rnd in range(args.rounds):
        for on, budget in cases:
            use_new(on, budget)
            fwd, fwdbwd = bench(core, lambda o: do, leaves)
            emit(rows, args.out, round=rnd, new=on, budget_gib=budget, fwd_ms=fwd, fwdbwd_ms=fwdbwd)
    if args.sweep:  # the handoff's two launches (_SelLaunch.ds_dkdv / ds_dq), each with the other as shipped
        use_new(True, args.budgets[-1])
        init = select._SelLaunch.__init__
        grid = [("ds_dq", "_sel_dq_ds", w, st) for w in (1, 2) for st in (2, 3)] + \
            [("ds_dkdv", "_sel_bwd_dkdv", w, st) for w in (4, 8) for st in (1, 2, 3)]
        for attr, kernel, warps, stages in grid:
            def patched(self, *a, _a=attr, _w=warps, _s=stages, **kw):
                init(self, *a, **kw)
                setattr(self, _a, dict(num_warps=_w, num_stages=_s))
            select._SelLaunch.__init__ = patched
            ms = [round(us / 1e3, 3) for k, us, _ in kernel_times(step, 3) if kernel in k]
            emit(rows, args.out, sweep=attr, warps=warps, stages=stages, kernel_ms=ms)
        select._SelLaunch.__init__ = init

if __name__ == "__main__":
    main()
