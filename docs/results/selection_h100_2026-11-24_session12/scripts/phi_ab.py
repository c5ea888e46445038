"""phi (kernels/compression.py) at 64k / 128k on one GPU: the unfolded blocks (compress_blocks(unfold_blocks(x)),
the code before this session) against chunk products (Compression.forward), fwd and fwd+bwd median ms, and the
largest relative difference of output and gradients between the two in bf16 (a record of run 2, not shipped)."""
import json
import sys

import torch
import triton

from nsa_parallel.kernels import Compression, unfold_blocks

rows = []
for t in (65536, 131072):
    torch.manual_seed(0)
    phi = Compression(4, 128, 32, 16, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, t, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves = [x, *phi.parameters()]
    ways = dict(unfolded=lambda: phi.compress_blocks(unfold_blocks(x, 32, 16)), chunks=lambda: phi(x))
    g = torch.randn_like(ways["chunks"]())
    outs = {}
    for name, fn in ways.items():
        y = fn()
        outs[name] = [y.detach()] + list(torch.autograd.grad(y, leaves, g))
    err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
              for a, b in zip(outs["chunks"], outs["unfolded"]))
    for name, fn in ways.items():
        fwd = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        fb = triton.testing.do_bench(lambda: fn().backward(g), warmup=25, rep=200, return_mode="median",
                                     grad_to_none=leaves)
        rows.append(dict(t=t, way=name, fwd_ms=fwd, fwdbwd_ms=fb, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(sys.argv[1], "w"),
          indent=1)
