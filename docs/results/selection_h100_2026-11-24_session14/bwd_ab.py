"""Backward alone of the NSA core at one length (median of do_bench, one forward kept for all repeats): a finer
A/B than the bench's fwd+bwd for changes that touch only the backward. Prints one JSON line."""
import json
import sys

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention

t, tag = int(sys.argv[1]), sys.argv[2]
cfg = NSAConfig()
q, kvs, gate, ck, cv = core_inputs(t, 64, 4, 128, 128, cfg, "cuda")
leaves = [q, *kvs, gate, *ck.parameters(), *cv.parameters()]
o = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton")
do = torch.randn_like(o)
bwd = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)  # noqa: E731
ms = triton.testing.do_bench(bwd, warmup=10, rep=400, return_mode="median")
print(json.dumps(dict(tag=tag, t=t, bwd_ms=ms)), flush=True)
