"""Knob variants of the Triton decode step at 64k x 8 (64/4 heads, d=128, bf16) on one GPU: for each, the blocks and
output against the reference decode, per-kernel device times (torch profiler, 50 steps) and the step time from
CUDA-graph replays interleaved over 7 rounds (bench_decode._variants_us). Also, from this case's block scores, how
many (sequence, KV head) pairs the threshold top-n ranks directly at each chunk count (the rest take the argmaxes).

    python -P docs/results/decode_h100_2026-11-23_session9/scripts/profile_variants.py OUT.json
"""
import json
import sys

import torch

from nsa_parallel import bench_decode as bd
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import decode_triton as dt
from nsa_parallel.kernels.decode import nsa_decode

A = dict(TOPN_CHUNKS=0)  # one argmax per pick
P = dict(USE_PDL=True)
VARIANTS = {
    "before: argmax top-n, own/spill apart, a branch per iteration": dict(A, CMP_TILE_SUMS_DOT=False,
                                                                          SPARSE_STATIC_MODE=False),
    "default": {},
    "PDL": dict(P),
    "own/spill apart": dict(CMP_TILE_SUMS_DOT=False),
    "PDL, own/spill apart": dict(P, CMP_TILE_SUMS_DOT=False),
    "PDL, argmax top-n": dict(P, **A),
    "PDL, 2 window tiles per program": dict(P, WINDOW_TILES_PER_PROGRAM=2),
    "PDL, 2 selected blocks per program": dict(P, SPARSE_TILES_PER_PROGRAM=2),
    "PDL, 1 compressed program per SM": dict(P, PROGRAMS_PER_SM=1),
}


def with_knobs(knobs, fn):
    old = {k: getattr(dt, k) for k in knobs}
    for k, v in knobs.items():
        setattr(dt, k, v)
    try:
        return fn()
    finally:
        for k, v in old.items():
            setattr(dt, k, v)


def direct_share(scores, lens, cfg, chunks, cands):
    """Fraction of pairs whose candidates (blocks >= the K-th best chunk max) fit ``cands`` slots."""
    bsz, hkv, ns = scores.shape
    bns = 1 << (ns - 1).bit_length()
    k = cfg.select_topn - cfg.select_initial - cfg.select_local
    s = torch.full((bsz, hkv, bns), float("-inf"), device=scores.device)
    s[..., :ns] = scores
    j = torch.arange(bns, device=scores.device)
    own = ((lens - 1) // cfg.select_block)[:, None, None]
    free = (j >= cfg.select_initial) & (j <= own - cfg.select_local)
    s = torch.where(free, s, float("-inf"))
    cm = s.view(bsz, hkv, chunks, -1).amax(-1)
    tau = cm.sort(-1, descending=True).values[..., k - 1:k]
    n = ((s >= tau) & (s > float("-inf"))).sum(-1)
    return dict(fits=(n <= cands).float().mean().item(), mean_candidates=n.float().mean().item(),
                max_candidates=n.max().item())


def main(path):
    cfg = NSAConfig()
    t, bsz, hq, hkv, d = 65536, 8, 64, 4, 128
    cache, q, gate = bd.make_case(t, bsz, hq, hkv, d, cfg)
    step = lambda: nsa_decode(q, gate, cache, backend="triton")  # noqa: E731
    o_r, i_r = nsa_decode(q, gate, cache, backend="reference", return_indices=True)
    res = dict(device=torch.cuda.get_device_name(), case=dict(T=t, B=bsz, hq=hq, hkv=hkv, d=d), variants={})
    for name, knobs in VARIANTS.items():
        o, i = with_knobs(knobs, lambda: nsa_decode(q, gate, cache, backend="triton", return_indices=True))
        row = dict(knobs=knobs, same_blocks=(i == i_r).float().mean().item(),
                   max_rel_err=((o.float() - o_r.float()).abs().max() / o_r.float().abs().max()).item(),
                   kernels_us=with_knobs(knobs, lambda: bd._kernel_times(step, 50)))
        res["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    _, scores = dt.compressed_step(q, cache, d ** -0.5)
    res["direct_share"] = {f"{c}/{n}": direct_share(scores, cache.lens, cfg, c, n)
                           for c, n in ((32, 64), (64, 64), (128, 128))}
    print(json.dumps(res["direct_share"]), flush=True)
    us = bd._variants_us(step, VARIANTS, 20)
    for name, v in us.items():
        res["variants"][name]["step_us"] = v
        print(f"{v:7.2f} us  {name}", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
