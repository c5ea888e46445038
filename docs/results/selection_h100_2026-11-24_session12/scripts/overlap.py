"""The NSA core with and without its second CUDA stream (kernels/overlap.py), on one GPU (a measurement, not a test).

    python -P benchmarks/overlap.py --seqlens 65536 131072 --out DIR

For each length: the core's output and every gradient with ``OVERLAP`` off and on (they must be bitwise equal:
the same kernels add into dq in the same order), then fwd and fwd+bwd medians of both, interleaved so clock drift
hits both alike. Also lists registers, spills and shared memory of every compiled kernel: two thread blocks share
an SM only where both fit. Results stream to stdout as JSON lines and to DIR/overlap.json.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from nsa_parallel.bench import bench, core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import compress, flash, gate, overlap, select, topn


class Log:
    def __init__(self, path):
        self.path, self.rows = path, []

    def emit(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=self.rows), f, indent=1)


def kernel_resources():
    """Registers / spills / shared bytes / warps of every compiled variant of the core's Triton kernels."""
    rows = []
    for mod in (compress, flash, gate, select, topn):
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if not isinstance(fn, triton.runtime.JITFunction) or not caches:
                continue
            for entry in caches.values():
                for k in (entry[0] if isinstance(entry, tuple) else entry).values():
                    md = k.metadata
                    rows.append(dict(kernel=f"{mod.__name__.split('.')[-1]}.{name}", regs=k.n_regs,
                                     spills=k.n_spills, shared=md.shared, warps=md.num_warps,
                                     stages=md.num_stages))
    return rows


def run(t, log, reps):
    cfg, hq, hkv, d = NSAConfig(), 64, 4, 128
    torch.manual_seed(0)
    q, kvs, g, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, "cuda")
    leaves = [q, *kvs, g, *ck.parameters(), *cv.parameters()]
    core = lambda: nsa_attention(q, *kvs, g, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                 backend="triton")
    grad = torch.randn_like(core())

    def grads(on):
        overlap.OVERLAP = on
        for x in leaves:
            x.grad = None
        out = core()
        out.backward(grad)
        torch.cuda.synchronize()
        return [out.detach().clone()] + [x.grad.clone() for x in leaves]

    off_, on_ = grads(False), grads(True)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(off_, on_))
    log.emit(what="equal", t=t, max_abs_diff=diff)
    del off_, on_
    res = {False: [], True: []}
    for _ in range(reps):
        for on in (False, True):
            overlap.OVERLAP = on
            res[on].append(bench(core, torch.randn_like, leaves))
    for on in (False, True):
        fwd = sorted(r[0] for r in res[on])[reps // 2]
        fb = sorted(r[1] for r in res[on])[reps // 2]
        log.emit(what="time", t=t, overlap=on, fwd_ms=fwd, fwdbwd_ms=fb, all=res[on])
    overlap.OVERLAP = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--reps", type=int, default=3, help="interleaved repeats of each timing (median reported)")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "overlap.json"))
    for t in args.seqlens:
        run(t, log, args.reps)
    log.emit(what="kernels", rows=kernel_resources())


if __name__ == "__main__":
    main()
