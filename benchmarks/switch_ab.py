"""The NSA core with a module switch off and on, A/B on one GPU.

    python -P benchmarks/switch_ab.py --switch topn.TOPN_PREFILTER --t 65536 --rounds 2 --out switch_ab.json

``--switch MODULE.NAME`` names a boolean of ``nsa_parallel.kernels.MODULE`` read when a launch is set up (such as
``topn.TOPN_PREFILTER``). Checks that both settings give the same core output and gradients (bf16, the bench's
inputs), then times the core's forward and forward+backward (``nsa_parallel.bench.bench``) with the switch off and
on, alternating in each round, and puts it back as it was; with ``--kernels``, each setting's forward kernels
(``nsa_parallel.bench.kernel_times``, 3 calls) after the rounds. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import importlib


def main() -> None:
    from nsa_parallel.bench import ab_check, bench, core_case, emit, kernel_times
    from nsa_parallel.kernels import NSAConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="MODULE.NAME of a boolean in nsa_parallel.kernels")
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="switch_ab.json")
    p.add_argument("--kernels", action="store_true", help="also each setting's forward kernels (profiler)")
    p.add_argument("--head-dims", default="128/128", help="dk/dv, e.g. 192/128")
    args = p.parse_args()
    module, _, name = args.switch.rpartition(".")
    mod = importlib.import_module(f"nsa_parallel.kernels.{module}")
    if not isinstance(getattr(mod, name, None), bool):
        p.error(f"--switch {args.switch}: nsa_parallel.kernels.{module} has no boolean {name}")
    before = getattr(mod, name)

    def switch(on: bool) -> None:
        setattr(mod, name, on)

    rows = []
    try:
        dk, dv = (int(x) for x in args.head_dims.split("/"))
    except ValueError:
        p.error(f"--head-dims {args.head_dims!r}: expected dk/dv, e.g. 192/128")
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig(), d=dk, dv=dv)
    try:
        emit(rows, args.out, check=f"core output and gradients, {args.switch} on vs off",
             max_rel_err=ab_check(core, leaves, do, switch))
        for rnd in range(args.rounds):
            for on in (False, True):
                switch(on)
                fwd, fwdbwd = bench(core, lambda o: do, leaves)
                emit(rows, args.out, round=rnd, switch=args.switch, head_dims=args.head_dims, on=on, fwd_ms=fwd,
                     fwdbwd_ms=fwdbwd)
        for on in (False, True) if args.kernels else ():
            switch(on)
            emit(rows, args.out, switch=args.switch, on=on, forward_kernels_us=[
                (name[:80], round(us, 1), calls) for name, us, calls in kernel_times(core, 3)[:10]])
    finally:
        switch(before)


if __name__ == "__main__":
    main()
