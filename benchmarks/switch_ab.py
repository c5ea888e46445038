"""The NSA core with a module switch off and on, A/B on one GPU.

    python -P benchmarks/switch_ab.py --switch topn.TOPN_PREFILTER --t 65536 --rounds 2 --out switch_ab.json

``--switch MODULE.NAME`` names a setting of ``nsa_parallel.kernels.MODULE`` read when a launch is set up (such as
``topn.TOPN_PREFILTER``): a boolean (off, then on) or, with ``--values A B``, any two JSON values (such as
``--switch topn.TOPN_CANDIDATES --values 4 3``). Checks that both settings give the same core output and
gradients (bf16, the bench's inputs; with the count of block entries that differ, near ties a rounding change
flips), then times the core's forward and forward+backward
(``nsa_parallel.bench.bench``) with the first and the second setting, alternating in each round, and puts the
setting back as it was; with ``--kernels``, each setting's kernels (``nsa_parallel.bench.kernel_times``, 3 calls:
the forward, or with ``--backward`` forward+backward) after the rounds. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    from nsa_parallel.bench import (ab_block_flips, ab_check, bench, core_case, core_step, emit, head_dims,
                                    kernel_setting, kernel_times)
    from nsa_parallel.kernels import NSAConfig, nsa_attention
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="MODULE.NAME of a setting in nsa_parallel.kernels")
    p.add_argument("--values", nargs=2, type=json.loads, default=None, metavar=("A", "B"),
                   help="the two settings as JSON (e.g. 2 1, null 1); default false true, for a boolean")
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="switch_ab.json")
    p.add_argument("--kernels", action="store_true", help="also each setting's kernels (profiler; with --backward "
                                                          "forward+backward, else forward)")
    p.add_argument("--backward", action="store_true", help="--kernels profiles forward+backward")
    p.add_argument("--head-dims", type=head_dims, default=(128, 128), help="dk/dv, e.g. 192/128")
    p.add_argument("--heads", type=int, default=64, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads")
    args = p.parse_args()
    try:
        mod, name = kernel_setting(args.switch)
    except ValueError as e:
        p.error(f"--switch {args.switch}: {e}")
    before = getattr(mod, name)
    if args.values is None and not isinstance(before, bool):
        p.error(f"--switch {args.switch} is {before!r}, not a boolean: give --values A B")
    values = args.values if args.values is not None else [False, True]
    dk, dv = args.head_dims

    def switch(second: bool) -> None:
        setattr(mod, name, values[int(second)])

    rows = []
    cfg = NSAConfig()
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, cfg, hq=args.heads, hkv=args.kv_heads, d=dk, dv=dv)
    step = core_step(core, leaves, do)
    indices = lambda: nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                    backend="triton", return_block_indices=True)[1]
    try:
        # a large max_rel_err with flipped blocks: near ties (see bench.ab_block_flips), not necessarily a bug
        emit(rows, args.out, check=f"core output and gradients, {args.switch} = {values[1]!r} vs {values[0]!r}",
             max_rel_err=ab_check(core, leaves, do, switch), **ab_block_flips(indices, switch))
        for rnd in range(args.rounds):
            for second in (False, True):
                switch(second)
                fwd, fwdbwd = bench(core, lambda o: do, leaves)
                emit(rows, args.out, round=rnd, switch=args.switch, head_dims=f"{dk}/{dv}",
                     heads=f"{args.heads}/{args.kv_heads}", value=values[int(second)], fwd_ms=fwd, fwdbwd_ms=fwdbwd)
        for second in (False, True) if args.kernels else ():
            switch(second)
            key = "fwdbwd_kernels_us" if args.backward else "forward_kernels_us"
            emit(rows, args.out, switch=args.switch, value=values[int(second)], **{key: [
                (k[:80], round(us, 1), calls) for k, us, calls in kernel_times(step if args.backward else core,
                                                                               3)[:12]]})
    finally:
        setattr(mod, name, before)


if __name__ == "__main__":
    main()
