"""Where the NSA core's time goes on one GPU: CUDA time per kernel in one forward and in one forward+backward.

    python -P benchmarks/profile_core.py --t 65536 --out profile_core.json

The bench's inputs (``nsa_parallel.bench.core_case``: batch 1, 64 query / 4 KV heads unless ``--heads`` /
``--kv-heads`` say otherwise, d=128, bf16, paper config);
each phase runs a few times to warm up, then ``--iters`` times under ``torch.profiler``; the table gives each
kernel's CUDA time per iteration (ms), its launches per iteration and its share of the phase's kernel time, largest
first. Kernel names are Triton's (``_fwd_kernel``, ``_window_forced_dq_kernel``, ...) or cuBLAS / PyTorch's (phi,
copies, the index sort). JSON (rows per phase) to ``--out``.
"""
from __future__ import annotations

import argparse
import json

import torch
from nsa_parallel.bench import core_case, core_step, kernel_times
from nsa_parallel.kernels import NSAConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="profile_core.json")
    p.add_argument("--heads", type=int, default=64, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads")
    args = p.parse_args()
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig(), hq=args.heads, hkv=args.kv_heads)

    def fwd():
        with torch.no_grad():
            core()

    fwdbwd = core_step(core, leaves, do)
    result = dict(device=torch.cuda.get_device_name(), t=args.t, heads=args.heads, kv_heads=args.kv_heads,
                  iters=args.iters)
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        rows = [(k, us / 1000, n) for k, us, n in kernel_times(fn, args.iters, warmup=3)]
        whole = sum(ms for _, ms, _ in rows)
        result[name] = [dict(kernel=k, ms=ms, launches=n, share=ms / whole) for k, ms, n in rows]
        print(f"# {name}: {whole:.2f} ms of kernels per iteration")
        for k, ms, n in rows[:25]:
            print(f"{ms:8.3f} ms  {n:5.1f}x  {100 * ms / whole:5.1f}%  {k[:100]}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
