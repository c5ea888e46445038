"""Tokens computed under context parallelism with document masking: every document padded to split over the ranks
(before the thirtieth session) against :func:`nsa_parallel.documents.plan_cp_documents` (short ones held whole).

    python benchmarks/cp_document_plans.py [--samples 20] [--out cp_document_plans.json]

CPU only, exact counts (no timing): per sample length, CP size and document-length distribution (exponential with
the given mean, as web text roughly is; documents cut at the sample's end), over ``--samples`` random samples at the
paper's configuration: the share of padding in the tokens computed, and the busiest rank's tokens over the mean
(the ranks wait for each other at every split document's exchanges), and how many times fewer tokens the busiest
rank computes than before (evenly padded, every rank computed the mean). A table to stdout, JSON lines to
``--out``.
"""
from __future__ import annotations

import argparse
import json

import torch


def sample_bounds(length: int, mean: float, gen: torch.Generator):
    """Document bounds of one sample: exponential lengths (at least 1 token) until ``length`` is filled."""
    bounds = [0]
    while bounds[-1] < length:
        n = 1 + int(torch.empty(1).exponential_(1.0 / mean, generator=gen))
        bounds.append(min(length, bounds[-1] + n))
    return bounds


def padded_everywhere(bounds, cp: int, config):
    """The earlier layout: every document split, padded to ``multiple`` and at least ``least`` tokens."""
    from nsa_parallel.documents import cp_document_lengths
    multiple, least = cp_document_lengths(cp, config)
    return sum(max(least, -(-(e - s) // multiple) * multiple) for s, e in zip(bounds, bounds[1:]))


def main() -> None:
    from nsa_parallel.documents import plan_cp_documents
    from nsa_parallel.kernels import NSAConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg, rows = NSAConfig(), []
    print(f"{'length':>8} {'CP':>3} {'mean doc':>8} | {'padded share':>12} | {'plan share':>10} {'imbalance':>9} | "
          f"{'busiest rank':>12}")
    for length in (65536, 131072, 1048576):
        for cp in (2, 4, 8):
            for mean in (1000, 4000, 16000):
                gen = torch.Generator().manual_seed(length + cp + mean)
                old = new = real = worst = 0
                for _ in range(args.samples):
                    bounds = sample_bounds(length, mean, gen)
                    plan = plan_cp_documents(bounds, cp, cfg)
                    old += padded_everywhere(bounds, cp, cfg)
                    new += plan.computed()
                    real += length
                    worst += cp * max(plan.tokens(r) for r in range(cp))
                row = dict(length=length, cp=cp, mean_document=mean, samples=args.samples,
                           padded_share=1 - real / old, plan_share=1 - real / new, plan_imbalance=worst / new,
                           busiest_rank_fewer=old / worst)
                rows.append(row)
                print(f"{length:>8} {cp:>3} {mean:>8} | {row['padded_share']:>12.3f} | {row['plan_share']:>10.4f} "
                      f"{row['plan_imbalance']:>9.4f} | {row['busiest_rank_fewer']:>11.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
