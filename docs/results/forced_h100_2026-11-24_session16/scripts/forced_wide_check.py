"""Run 17 (record): the NSA core with the forced blocks in the window kernels against whole-list walks
(forced.FORCED_TILES off), output and every gradient for one fixed output gradient, at wide heads and G = 16 / 32.
Run 16 was the same script with a fresh random output gradient per path (a bug of the script: its gradients could
not match). Run on the GPU machine from the repository root after `source benchmarks/gpu_env.sh`:

    python3 -P docs/results/forced_h100_2026-11-24_session16/scripts/forced_wide_check.py
"""
import math

import torch

from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import forced as FB
from nsa_parallel.kernels.parallel import nsa_triton

cfg = NSAConfig()
for (t, hq, hkv, dk, dv) in [(2048, 16, 1, 192, 128), (2048, 16, 1, 256, 256), (2048, 32, 1, 192, 128),
                             (2048, 64, 2, 128, 128)]:
    g = torch.Generator().manual_seed(0)
    mk = lambda n, h, d: torch.randn(1, n, h, d, generator=g).cuda().bfloat16().requires_grad_(True)  # noqa: E731
    tc = cfg.num_compressed(t)
    x = [mk(t, hq, dk), mk(tc, hkv, dk), mk(tc, hkv, dv), mk(t, hkv, dk), mk(t, hkv, dv), mk(t, hkv, dk),
         mk(t, hkv, dv)]
    gate = torch.rand(1, t, hq, 3, generator=g).cuda().bfloat16().requires_grad_(True)
    do = torch.randn(1, t, hq, dv, generator=g).cuda().bfloat16()
    res = {}
    for on in (False, True):
        FB.FORCED_TILES = on
        out = nsa_triton(*x, gate, cfg, 1 / math.sqrt(dk))
        res[on] = [out.o] + list(torch.autograd.grad(out.o, [*x, gate], do))
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(res[True], res[False])]
    print((t, hq, hkv, dk, dv), "forced vs whole lists: o / grads max rel diff", " ".join(f"{e:.1e}" for e in errs))
