"""Selection path sweep on one GPU (a measurement, not a test), plus a per-kernel profile of the whole NSA core.

    python -P benchmarks/selection_sweep.py --t 65536 --out DIR [--only scores topn profile]

- scores: rows per program, compressed tokens per key tile, warps and stages of the selection-scores kernel, each
  checked against the shipped launch.
- topn: scores per program and warps of the top-n kernel; every variant must give the shipped blocks exactly.
- profile: ``torch.profiler`` of one forward and one forward+backward of the NSA core, CUDA time per kernel name.
Results stream to stdout as JSON lines and to DIR/*.json. (Commit 8defe4f also swept a head-loop selection-scores
kernel against the shipped one: no faster, removed; docs/benchmarks.md.)
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import compress as C
from nsa_parallel.kernels import topn as TN
from nsa_parallel.kernels.compress import compressed_attention


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


class Log:
    def __init__(self, path):
        self.path, self.rows = path, []

    def emit(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=self.rows), f, indent=1)


def sweep_scores(q, kc, lse, cfg, scale, log):
    """The scores kernel's rows per program, compressed tokens per key tile, warps and stages; each variant's
    block scores against the shipped launch's (max error relative to the largest score)."""
    t = q.shape[1]
    own = torch.arange(cfg.num_select_blocks(t), device=q.device)[None, :] <= \
        torch.arange(t, device=q.device)[:, None] // cfg.select_block
    m = own[:, None, :].expand(t, kc.shape[2], own.shape[1])
    saved = C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES
    want = C.selection_scores(q, kc, lse, cfg, scale)
    for launch in (saved, (128, 128, 8, 2), (128, 128, 8, 3), (256, 64, 8, 2), (256, 128, 8, 2), (128, 32, 8, 2),
                   (64, 128, 4, 2)):
        C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES = launch
        try:
            got = C.selection_scores(q, kc, lse, cfg, scale)
            err = ((got[0] - want[0])[m].abs().max() / want[0][m].abs().max()).item()
            got = None
            ms = bench(lambda: C.selection_scores(q, kc, lse, cfg, scale))
            log.emit(what="scores", rows_tokens_warps_stages=launch, ms=ms, rel_err=err)
        except Exception as e:  # a launch that does not compile or fit is a result too
            log.emit(what="scores", rows_tokens_warps_stages=launch, error=str(e)[:300])
    C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES = saved


def sweep_topn(scores, cfg, log):
    saved = TN.TOPN_ELEMENTS, TN.TOPN_WARPS
    want = None
    for elems, warps in ((4096, 4), (4096, 8), (4096, 2), (2048, 4), (2048, 2), (1024, 1), (1024, 2),
                         (2048, 1), (8192, 8), (8192, 4), (16384, 8)):
        TN.TOPN_ELEMENTS, TN.TOPN_WARPS = elems, warps
        try:
            idx = TN.select_topn(scores, cfg)
            if want is None:
                want = idx
            same = torch.equal(idx, want)
            ms = bench(lambda: TN.select_topn(scores, cfg))
            log.emit(what="topn", elements=elems, warps=warps, ms=ms, equal=same)
        except Exception as e:
            log.emit(what="topn", elements=elems, warps=warps, error=str(e)[:300])
    TN.TOPN_ELEMENTS, TN.TOPN_WARPS = saved


def profile(q, kvs, gate, ck, cv, cfg, log):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    def core():
        return nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton")
    grad = torch.randn_like(core())
    for name, fn in (("fwd", core), ("fwdbwd", lambda: core().backward(grad))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        rows = []
        for e in p.key_averages():
            cuda_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if cuda_us > 0:
                rows.append(dict(kernel=e.key[:120], calls=e.count, ms=cuda_us / 1e3))
        rows.sort(key=lambda r: -r["ms"])
        log.emit(what="profile", pass_=name, total_ms=sum(r["ms"] for r in rows), kernels=rows[:40])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default=".")
    p.add_argument("--only", nargs="+", default=["scores", "topn", "profile"])
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "selection_sweep.json"))
    cfg, hq, hkv, d, t = NSAConfig(), 64, 4, 128, args.t
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, "cuda")
    scale = 1 / math.sqrt(d)
    if "scores" in args.only or "topn" in args.only:
        with torch.no_grad():
            kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
            _, lse = compressed_attention(q.detach(), kc, vc, cfg, scale)
            if "scores" in args.only:
                sweep_scores(q.detach(), kc, lse, cfg, scale, log)
            if "topn" in args.only:
                sweep_topn(C.selection_scores(q.detach(), kc, lse, cfg, scale), cfg, log)
    if "profile" in args.only:
        profile(q, kvs, gate, ck, cv, cfg, log)


if __name__ == "__main__":
    main()
