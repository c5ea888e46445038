"""Experiment (H100): pipeline stages of the 256-wide tiles used for head dims above 128 (the NSA paper's dk=192):
compressed and window branches (flash.WIDE_STAGES), selected branch (select.SEL_WIDE_STAGES), selection scores
(compress.SCORES_WIDE_STAGES); forward and forward+backward, each checked against the shipped setting.

    python -P benchmarks/wide_tiles.py --t 65536 --heads 64 --kv-heads 4 --out wide.json
"""
import argparse
import json
import math

import torch

from nsa_parallel.bench import bench
from nsa_parallel.kernels import NSAConfig, compress, flash, select
from nsa_parallel.kernels.compress import compressed_attention, selection_scores
from nsa_parallel.kernels.select import selected_attention
from nsa_parallel.kernels.topn import select_blocks


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=192)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--out", default="wide.json")
    a = p.parse_args()
    cfg, dev, dt = NSAConfig(), "cuda", torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt).requires_grad_(True)  # noqa: E731
    q = mk(1, a.t, a.heads, a.dk)
    kc, vc = mk(1, cfg.num_compressed(a.t), a.kv_heads, a.dk), mk(1, cfg.num_compressed(a.t), a.kv_heads, a.dv)
    kw, vw = mk(1, a.t, a.kv_heads, a.dk), mk(1, a.t, a.kv_heads, a.dv)
    scale = 1 / math.sqrt(a.dk)
    branches = {"cmp": lambda: compressed_attention(q, kc, vc, cfg, scale)[0],
                "swa": lambda: flash.position_masked_attention(q, kw, vw, scale, 1, 0, cfg.window)[0]}
    gout = torch.randn(1, a.t, a.heads, a.dv, device=dev, dtype=dt)

    def grads(fn):
        for x in (q, kc, vc, kw, vw, ks, vs):
            x.grad = None
        o = fn()
        o.backward(gout)
        return [o.detach().float()] + [x.grad.float() for x in (q, kc, vc, kw, vw, ks, vs) if x.grad is not None]

    with torch.no_grad():
        _, lse = compressed_attention(q, kc, vc, cfg, scale)
        idx = select_blocks(q, kc, lse, cfg, scale)
    ks, vs = mk(1, a.t, a.kv_heads, a.dk), mk(1, a.t, a.kv_heads, a.dv)
    branches["slc"] = lambda: selected_attention(q, ks, vs, idx, cfg.select_block, scale)[0]
    want = {name: grads(fn) for name, fn in branches.items()}
    want_scores = selection_scores(q.detach(), kc.detach(), lse, cfg, scale)
    rows = []
    for stages in (1, 2, 3):
        # the three knobs for 256-wide tiles (the first run also swept 8 warps: slower everywhere, see docs)
        flash.WIDE_STAGES, select.SEL_WIDE_STAGES, compress.SCORES_WIDE_STAGES = stages, stages, stages
        for name, fn in branches.items():
            row = {"branch": name, "stages": stages}
            try:
                got = grads(fn)
                row["max_rel_err"] = max(((g - w).abs().max() / w.abs().max()).item()
                                         for g, w in zip(got, want[name]))
                row["fwd_ms"], row["fwdbwd_ms"] = bench(fn, torch.randn_like)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record it
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        row = {"branch": "scores", "stages": stages}
        try:
            got = selection_scores(q.detach(), kc.detach(), lse, cfg, scale)
            row["max_abs_err"] = (got - want_scores).abs().max().item()
            row["fwd_ms"], _ = bench(lambda: selection_scores(q.detach(), kc.detach(), lse, cfg, scale))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
