"""Would the forward's L2-bound selected loop run beside its compute-bound kernels on a second stream? (probe)

    python -P benchmarks/overlap_fwd.py --t 65536 --out overlap_fwd.json

The NSA core runs once on the bench's inputs (``nsa_parallel.bench.core_case``); the forward's four stages are
captured with their arguments and replayed: the compressed forward (``cmp``), selection scores + top-n (``scores``),
the window kernel with the forced blocks (``window``) and the selected loop with the gated sum (``sel``). Each is
timed alone, then ``sel`` beside each of the others on two CUDA streams (``sel`` on the high-priority one, or the
low one), the pair's time against the sum of the two alone. The compressed forward's own tiles (8 warps, 255
registers: a program holds a whole SM's register file, so nothing fits beside it) are also tried with 4-warp tiles,
which leave room for selected-loop programs on the same SM. The replays ignore the stages' data dependencies (the
same captured indices every time): this measures whether the kernels share the GPU well, nothing more.

Each row: ms (``triton.testing.do_bench`` median). JSON lines to stdout and ``--out``. A measurement script:
nothing here is shipped.
"""
from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default="overlap_fwd.json")
    args = p.parse_args()
    import torch
    import triton

    from nsa_parallel.bench import core_case, emit
    from nsa_parallel.kernels import NSAConfig, flash, parallel

    seen = {}

    def capture(name):
        real = getattr(parallel, name)

        def wrapped(*a, **kw):
            seen[name] = (real, a, kw)
            return real(*a, **kw)
        setattr(parallel, name, wrapped)
        return real

    names = ("masked_forward", "select_blocks", "window_forced_forward", "selected_forward")
    reals = {n: capture(n) for n in names}
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig())
    with torch.no_grad():
        core()
    for n in names:
        setattr(parallel, n, reals[n])
    stage = {}
    for key, n in zip(("cmp", "scores", "window", "sel"), names):
        fn, a, kw = seen[n]
        stage[key] = (lambda fn=fn, a=a, kw=kw: fn(*a, **kw))
    # the compressed forward with other tiles: (rows, keys, warps, stages)
    _, (q_, kc, vc, scale, L) = seen["masked_forward"][:2]
    c = L.const
    for tiles in ((128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 4, 2)):
        flash.COMPRESSED_FWD_TILES, before = tiles, flash.COMPRESSED_FWD_TILES
        L2 = flash._Launch(q_, kc, vc, c["KSTRIDE"], c["KOFF"], c["WINDOW"], None, None)
        flash.COMPRESSED_FWD_TILES = before
        stage["cmp_" + "x".join(map(str, tiles))] = (lambda L2=L2: reals["masked_forward"](q_, kc, vc, scale, L2))
    rows = []

    def timed(fn):
        return triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median")

    alone = {}
    for key, fn in stage.items():
        try:
            alone[key] = timed(fn)
        except Exception as e:  # noqa: BLE001  (a tile that does not fit)
            emit(rows, args.out, alone=key, error=repr(e)[:200])
            continue
        emit(rows, args.out, alone=key, ms=round(alone[key], 3))
    hi, lo = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)

    def beside(a, b, a_first):
        def fn():
            cur = torch.cuda.current_stream()
            hi.wait_stream(cur)
            lo.wait_stream(cur)
            for s, f in ((hi, a), (lo, b)) if a_first else ((lo, b), (hi, a)):
                with torch.cuda.stream(s):
                    f()
            cur.wait_stream(hi)
            cur.wait_stream(lo)
        return fn

    for other in [k for k in alone if k != "sel"]:
        for a_first in (True, False):
            ms = timed(beside(stage["sel"], stage[other], a_first))
            emit(rows, args.out, pair=f"sel (high priority) + {other}", sel_launched_first=a_first, ms=round(ms, 3),
                 sum_alone=round(alone["sel"] + alone[other], 3))
        ms = timed(beside(stage[other], stage["sel"], True))
        emit(rows, args.out, pair=f"{other} (high priority) + sel", sel_launched_first=False, ms=round(ms, 3),
             sum_alone=round(alone["sel"] + alone[other], 3))


if __name__ == "__main__":
    main()
