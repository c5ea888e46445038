"""The NSA core with a previous commit's ``select.py`` against the tree's, A/B on one GPU.

    python -P benchmarks/select_ab.py --old-from REV                 # here: write benchmarks/_old_select.py
    python -P benchmarks/select_ab.py --t 65536 --rounds 3 --out select_ab.json     # on the GPU

Checks that both give the same core output and gradients (bf16, the bench's inputs), then times the core's forward
and forward+backward (``nsa_parallel.bench.bench``) with the old and the new selected-branch kernels, alternating in
each round. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    from nsa_parallel.bench import ab_check, bench, core_case, emit, old_vs_new
    args, old = old_vs_new(__doc__, ("select",), "select_ab.json", HERE)
    if old is None:
        return
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels import parallel as P
    old, = old
    new = {n: getattr(P, n) for n in ("_SelLaunch", "selected_forward", "selected_backward")}

    def use_new(on: bool) -> None:
        for n, f in new.items():
            setattr(P, n, f if on else getattr(old, n))

    rows = []
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig())
    emit(rows, args.out, check="core output and gradients, new vs old select.py",
         max_rel_err=ab_check(core, leaves, do, use_new))
    for rnd in range(args.rounds):
        for on in (False, True):
            use_new(on)
            fwd, fwdbwd = bench(core, lambda o: do, leaves)
            emit(rows, args.out, round=rnd, new=on, fwd_ms=fwd, fwdbwd_ms=fwdbwd)


if __name__ == "__main__":
    main()
