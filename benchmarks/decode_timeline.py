"""Where the time of one chained decoding step goes, and which chained variant is fastest (one GPU).

    python benchmarks/decode_timeline.py --context 65536 --batch 8 --out timeline.json

1. Times (CUDA graphs of 20 steps, as ``nsa_parallel.bench_decode``) the five-kernel step and the chained launch
   under every combination of the variant knobs below, each checked against the five-kernel output first.
2. For the default chained launch and the fastest variant: one step with ``decode_triton.CHAIN_TIMES`` set, each
   program writing (start, waited, end) of the GPU's nanosecond timer, summarised per phase: programs, first and
   last start, mean wait, mean run, last end, all relative to the first program's start.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json

import torch

from nsa_parallel.bench_decode import _graph_ms, make_case
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import decode_triton as dt
from nsa_parallel.kernels.decode import nsa_decode

VARIANTS = {"CHAIN_PAIR_COMBINE": (True, False), "CHAIN_TICKET": (True, False), "CMP_STAGES": (2, 3),
            "SCORES_BJ": (64, 256), "PROGRAMS_PER_SM": (2, 3)}
PHASES = ("compressed", "window", "scores", "top-n", "selected", "combine")


def _set(knobs: dict) -> dict:
    old = {k: getattr(dt, k) for k in knobs}
    for k, v in knobs.items():
        setattr(dt, k, v)
    return old


def timeline(q, gate, cache) -> list:
    """Per-phase summary (microseconds from the first program's start) of one chained step."""
    p = dt._Plan(q, cache)
    nch = -(-p.nsmax // dt.SCORES_BJ)
    pairs = p.bsz * p.hkv
    counts = [pairs * p.splits, pairs * (p.npart - p.nslc), pairs * nch, pairs, pairs * p.nslc,
              pairs if dt.CHAIN_PAIR_COMBINE else pairs * p.G]
    assert sum(counts) == dt.chained_programs(pairs, p.splits, p.npart, nch, p.G)
    times = torch.zeros(sum(counts), 3, dtype=torch.int64, device="cuda")
    dt.CHAIN_TIMES = times
    try:
        nsa_decode(q, gate, cache)
        nsa_decode(q, gate, cache)  # the second: compiled, caches warm
        torch.cuda.synchronize()
    finally:
        dt.CHAIN_TIMES = None
    t = times.double()
    t0 = t[:, 0].min()
    t = (t - t0) / 1e3
    rows, first = [], 0
    for name, n in zip(PHASES, counts):
        x = t[first:first + n]
        waited = torch.where(x[:, 1] > 0, x[:, 1], x[:, 0])  # phases that do not wait leave it 0
        rows.append(dict(phase=name, programs=n, first_start=x[:, 0].min().item(), last_start=x[:, 0].max().item(),
                         mean_wait=(waited - x[:, 0]).mean().item(), mean_run=(x[:, 2] - waited).mean().item(),
                         last_end=x[:, 2].max().item()))
        first += n
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--out", default="decode_timeline.json")
    args = ap.parse_args(argv)
    cache, q, gate = make_case(args.context, args.batch, args.heads, args.kv_heads, 128, NSAConfig())
    step = lambda: nsa_decode(q, gate, cache)  # noqa: E731
    old = _set(dict(CHAINED=False))
    want = step().float()
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), context=args.context,
               batch=args.batch, five_kernels_us=_graph_ms(step, steps=20) * 1e3, variants=[])
    print(f"five kernels: {res['five_kernels_us']:.1f} us", flush=True)
    _set(old)
    default = {k: getattr(dt, k) for k in VARIANTS}
    for values in itertools.product(*VARIANTS.values()):
        knobs = dict(zip(VARIANTS, values))
        old = _set(knobs)
        err = ((step().float() - want).abs().max() / want.abs().max()).item()
        row = dict(knobs, max_rel_err_vs_five=err, us=_graph_ms(step, steps=20) * 1e3)
        _set(old)
        res["variants"].append(row)
        print(json.dumps(row), flush=True)
    best = min(res["variants"], key=lambda r: r["us"])
    for name, knobs in (("default", default), ("best", {k: best[k] for k in VARIANTS})):
        old = _set(knobs)
        res[f"timeline_{name}"] = dict(knobs=knobs, phases=timeline(q, gate, cache))
        _set(old)
        print(name, json.dumps(knobs))
        for r in res[f"timeline_{name}"]["phases"]:
            print("  " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
