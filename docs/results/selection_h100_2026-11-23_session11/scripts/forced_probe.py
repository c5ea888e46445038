"""Probe (a measurement, not shipped code): what the selected forward / dq kernels cost without the forced blocks
(first + 2 local, shared by the 64 positions of a block), and what a dense pass over about that many keys costs.

    python3 -P docs/results/selection_h100_2026-11-23_session11/scripts/forced_probe.py --out DIR
"""
import argparse
import json
import math
import os

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import flash as F
from nsa_parallel.kernels import select as S
from nsa_parallel.kernels.compress import compressed_attention
from nsa_parallel.kernels.topn import select_blocks


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    cfg, hq, hkv, d, t = NSAConfig(), 64, 4, 128, a.t
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, "cuda")
    scale = 1 / math.sqrt(d)
    rows = []
    with torch.no_grad():
        q = q.detach()
        k, v = kvs[2].detach().contiguous(), kvs[3].detach().contiguous()
        kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
        _, lse = compressed_attention(q, kc, vc, cfg, scale)
        idx = select_blocks(q, kc, lse, cfg, scale)
        own = (torch.arange(t, device=q.device) // cfg.select_block)[None, :, None, None]
        forced = (idx >= 0) & ((idx < cfg.select_initial) | (idx > own - cfg.select_local))
        rest = torch.where(forced | (idx < 0), 1 << 30, idx).sort(-1).values
        rest = torch.where(rest == (1 << 30), -1, rest).to(torch.int32).contiguous()
        rows.append(dict(forced_fraction=(forced.sum() / (idx >= 0).sum()).item()))
        do = torch.randn(1, t, hq, d, device=q.device, dtype=q.dtype)
        for name, ind in (("all", idx), ("non_forced", rest)):
            L = S._SelLaunch(q, k, v, ind, cfg.select_block, None)
            o, l2 = S.selected_forward(q, k, v, ind, L, scale)
            delta = (o.float() * do.float()).sum(-1)
            dq = torch.empty_like(q)
            fwd = bench(lambda: S.selected_forward(q, k, v, ind, L, scale))
            dqk = bench(lambda: S._sel_dq_loop_kernel[L.grid_q](q, k, v, ind, do, l2, delta, dq, L.cu, *L.sizes,
                                                                L.lo, L.hi, scale, **L.qmajor, num_stages=L.stages,
                                                                num_warps=L.warps_dq))
            rows.append(dict(indices=name, sel_fwd_ms=fwd, sel_dq_ms=dqk))
            print(rows[-1], flush=True)
        # a dense pass over ~192 keys per query (window 192 as a stand-in for block 0 + 2 local blocks)
        Lw = F._Launch(q, k, v, 1, 0, 192, None, None)
        o, l2 = F.masked_forward(q, k, v, scale, Lw)
        delta = (o.float() * do.float()).sum(-1)
        rows.append(dict(dense_192_fwd_ms=bench(lambda: F.masked_forward(q, k, v, scale, Lw)),
                         dense_192_dq_ms=bench(lambda: F._bwd_dq_kernel[Lw.dq[0]](
                             q, k, v, do, l2, delta, torch.empty_like(q), *Lw.args(), scale, **Lw.dq[1],
                             **Lw.dq[2]))))
        print(rows[-1], flush=True)
    with open(os.path.join(a.out, "forced_probe.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
