"""Selection scores with one q.k pass per tile (overlap weights) against one pass per stride slot, on one GPU.

    python -P benchmarks/scores_passes.py --seqlens 16384 65536 --out scores_passes.json

Checks that both give the same block scores and top-n, then times (median of ``triton.testing.do_bench``) the
scores kernel alone and the whole NSA core forward and forward+backward with each (64 query / 4 KV heads, d=128,
bf16, paper hyperparameters).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import compress as cmp
from nsa_parallel.kernels.topn import select_topn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536])
    p.add_argument("--out", default="scores_passes.json")
    args = p.parse_args()
    cfg, hq, hkv, d, dev, dt = NSAConfig(), 64, 4, 128, "cuda", torch.bfloat16
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = []
    for t in args.seqlens:
        torch.manual_seed(0)
        q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, dev, dt)
        scale = 1 / math.sqrt(d)
        with torch.no_grad():
            kc, vc = ck(kvs[0]), cv(kvs[1])
            _, lse = cmp.compressed_attention(q, kc, vc, cfg, scale)
        row, out = {"T": t}, {}
        for one in (False, True):
            cmp.SCORES_ONE_PASS = one
            name = "one_pass" if one else "per_slot"
            with torch.no_grad():
                sc = cmp.selection_scores(q, kc, lse, cfg, scale)
                out[name] = (sc, select_topn(sc, cfg))
                row[f"scores_ms_{name}"] = bench(lambda: cmp.selection_scores(q, kc, lse, cfg, scale))
            sc = None
            core = lambda: nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                         backend="triton")
            row[f"fwd_ms_{name}"] = bench(core)
            g = torch.randn_like(core())
            row[f"fwdbwd_ms_{name}"] = bench(lambda: core().backward(g))
        (a, ia), (b, ib) = out["per_slot"], out["one_pass"]
        own = torch.arange(a.shape[-1], device=dev)[None, :] <= (torch.arange(t, device=dev)[:, None] // 64)
        diff = (a - b).abs()[0].permute(1, 0, 2)[:, own]  # visible blocks only
        row["scores_max_rel_err"] = (diff.max() / a[0].permute(1, 0, 2)[:, own].abs().max()).item()
        row["same_blocks"] = (ia == ib).float().mean().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
