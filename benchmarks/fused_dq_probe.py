"""Probe: the flash backward's dq inside the dK/dV kernel, added onto an fp32 buffer by per-element atomics or by
TMA reductions (``cp.reduce.async.bulk``, Triton's ``tensor_descriptor.atomic_add``), against the shipped dq
kernel + dK/dV kernel; compressed and window branches of the NSA core (G=16, d=128, gated as in the core).

    python3 -P benchmarks/fused_dq_probe.py --t 65536 --out DIR      (GPU)
    TRITON_INTERPRET=1 python benchmarks/fused_dq_probe.py --t 256 --check   (CPU: the atomics path's numbers)
"""
import argparse
import json
import math
import os

import torch
import triton

from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import flash as F


def fused(q, k, v, do, lse, delta, scale, L, gate, dq32, tma, dqt):
    split = L.q_split > 0
    dk = torch.zeros_like(k, dtype=torch.float32) if split else torch.empty_like(k)
    dv = torch.zeros_like(v, dtype=torch.float32) if split else torch.empty_like(v)
    grid, const, opts = L.dkdv
    dq = dq32
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        dq = TensorDescriptor.from_tensor(dq32.view(-1, *dq32.shape[-2:]), [const["BLOCK_T"], const["GP"],
                                                                           const["BDK"]])
    F._bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *L.args(), scale, **const, Q_SPLIT=L.q_split,
                             GATE=gate, GATED=True, DQ=dq, FUSED_DQ=True, DQ_TMA=tma, DQ_T=dqt, **opts)
    return dk.to(k.dtype), dv.to(v.dtype)


def rel(x, y):
    return ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default=".")
    p.add_argument("--check", action="store_true", help="numbers only (CPU interpreter: atomics path, fp32)")
    a = p.parse_args()
    rows = []
    dev = "cpu" if a.check else "cuda"
    dt = torch.float32 if a.check else torch.bfloat16

    def emit(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        if not a.check:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), open(os.path.join(a.out, "fused_dq_probe.json"), "w"), indent=1)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")

    cfg, t, hq, hkv, d = NSAConfig(), a.t, 64 if not a.check else 32, 4 if not a.check else 2, 128
    torch.manual_seed(0)
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    do = torch.randn(1, t, hq, d, device=dev, dtype=dt)
    gate = torch.rand(1, t, hq, device=dev)
    scale = 1 / math.sqrt(d)
    tc = cfg.num_compressed(t)
    window = cfg.window if not a.check else 64
    for name, tk, kstride, koff, win in (("cmp", tc, cfg.compress_stride, cfg.compress_block - 1, F.NO_WINDOW),
                                         ("swa", t, 1, 0, window)):
        k = torch.randn(1, tk, hkv, d, device=dev, dtype=dt)
        v = torch.randn(1, tk, hkv, d, device=dev, dtype=dt)
        L = F._Launch(q, k, v, kstride, koff, win, None, None)
        o, lse = F.masked_forward(q, k, v, scale, L)
        delta = F.row_dot(o, do)
        ref = F.masked_backward(q, k, v, do, lse, None, scale, L, gate=gate, o=o)
        if not a.check:
            ms = bench(lambda: F.masked_backward(q, k, v, do, lse, None, scale, L, gate=gate, o=o))
            emit(branch=name, variant="shipped dq (+ delta) + dkdv", ms=ms,
                 ms_dq=bench(lambda: F.masked_dq(q, k, v, do, lse, None, scale, L, gate=gate, o=o)),
                 ms_dkdv=bench(lambda: F.masked_dkdv(q, k, v, do, lse, delta, scale, L, gate=gate)))
        if a.check:
            variants = [((64, 128, 8, 3), False, dqt) for dqt in (False, True)]
        elif name == "cmp":
            variants = [((64, 128, 8, 3), False, False)] + [(tiles, True, dqt) for tiles in (
                (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)) for dqt in (False, True)]
        else:
            variants = [((64, 128, 8, 3), True, False), ((64, 128, 8, 2), True, False), ((64, 64, 4, 2), True, False)]
        for tiles, tma, dqt in variants:
            try:
                Lf = F._Launch(q, k, v, kstride, koff, win, None, None, dkdv_tiles=tiles)
                dq32 = torch.zeros(q.shape, device=dev, dtype=torch.float32)
                dk, dv = fused(q, k, v, do, lse, delta, scale, Lf, gate, dq32, tma, dqt)
                err = [rel(dq32, ref[0]), rel(dk, ref[1]), rel(dv, ref[2])]
                r = dict(branch=name, variant="fused", tiles=tiles, tma=tma, dq_t=dqt, rel_err_dq_dk_dv=err)
                if not a.check:
                    def run():
                        dq32.zero_()
                        fused(q, k, v, do, lse, delta, scale, Lf, gate, dq32, tma, dqt)
                    r["ms_with_zero"] = bench(run)
                    r["ms_kernel"] = bench(lambda: fused(q, k, v, do, lse, delta, scale, Lf, gate, dq32,
                                                         tma, dqt))
                emit(**r)
            except Exception as e:  # noqa: BLE001 - a probe: record and go on
                emit(branch=name, variant="fused", tiles=tiles, tma=tma, dq_t=dqt, error=str(e)[:400])


if __name__ == "__main__":
    main()
