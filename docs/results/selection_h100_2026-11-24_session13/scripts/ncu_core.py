"""One forward+backward of the NSA core at 64k inside an NVTX range "profile", for Nsight Compute:

    ncu --nvtx --nvtx-include "profile/" -k regex:"^_" --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats -o DIR/core python3 -P ncu_core.py [--backward-here]

Without ``--backward-here`` only the forward's kernels fall inside the range (run 3): autograd runs the backward
on its own device thread, outside this thread's NVTX range; with it, autograd's multithreading is off so the
backward runs on this thread too.
"""
import sys

import torch
from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention

cfg = NSAConfig()
torch.manual_seed(0)
q, kvs, gate, ck, cv = core_inputs(65536, 64, 4, 128, 128, cfg, "cuda")


def core():
    return nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton")


grad = torch.randn_like(core())
for _ in range(2):
    core().backward(grad)
torch.cuda.synchronize()
if "--backward-here" in sys.argv:
    torch.autograd.set_multithreading_enabled(False)
torch.cuda.nvtx.range_push("profile")
core().backward(grad)
torch.cuda.synchronize()
torch.cuda.nvtx.range_pop()
