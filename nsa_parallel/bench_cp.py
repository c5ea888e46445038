"""Benchmark NSA with context parallelism on the GPUs of one host, against one GPU and dense ring attention.

    torchrun --nproc_per_node 2 -m nsa_parallel.bench_cp --seqlens 131072 262144 --out cp.json

For each total length T: checks that the CP output and gradients equal one GPU's on the same sequence (bf16), then
times forward and forward+backward of the whole NSA core on one GPU and per rank with CP (both selection exchanges,
both layouts), reports parallel efficiency ``E = t(1 GPU) / (P x t(per rank))``, the bytes each rank receives per
layer and the time the exchanges take alone, and times dense causal attention on one GPU and as torch's
experimental ring (``context_parallel`` over SDPA). B=1, 64 query heads / 4 KV heads, d=128, paper config.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from .distributed import all_done


def _timed(fn, iters: int, warmup: int = 2) -> float:
    """Median wall ms of ``fn`` across ranks (each iteration counts as its slowest rank)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        t = torch.tensor(time.perf_counter() - t0, device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    times.sort()
    return 1e3 * times[len(times) // 2]


def _inputs(t, hq, hkv, d, cfg, seed=0):
    from nsa_parallel.kernels import Compression
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q = mk(1, t, hq, d)
    kvs = [mk(1, t, hkv, d) for _ in range(6)]
    gate = torch.rand(1, t, hq, 3, device="cuda", dtype=torch.bfloat16, generator=gen)
    torch.manual_seed(seed)
    ck = Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device="cuda", dtype=torch.bfloat16)
    cv = Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device="cuda", dtype=torch.bfloat16)
    return [q, *kvs, gate], ck, cv


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def received_bytes(t, world, hkv, d, cfg, elem=2):
    """Bytes one rank receives per layer in the forward (the backward sends as much back)."""
    tok = hkv * 2 * d * elem  # one token's K and V
    chunks = 2  # load-balanced: 2 chunks per rank, each with one halo
    halo = chunks * (2 * (cfg.compress_block - cfg.compress_stride) + 2 * (cfg.window - 1)) * hkv * d * elem
    cmp = (world - 1) / world * (t // cfg.compress_stride) * tok
    slc = (world - 1) / world * t * tok  # all-gather, or P-1 ring steps of t/P tokens
    return dict(halo=halo, compressed=cmp, selection=slc, total=halo + cmp + slc)


def run(args) -> dict:
    from nsa_parallel.context_parallel import nsa_attention_cp, split_for_rank
    from nsa_parallel.kernels import NSAConfig, nsa_attention
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = NSAConfig()
    hq, hkv, d = args.heads, args.kv_heads, 128
    group = dist.group.WORLD
    rows = []
    for t in args.seqlens:
        row = dict(T=t, P=world, hq=hq, hkv=hkv, d=d)
        if args.dense_ring_only:
            _dense(row, t, hq, d, world, args.iters, single=False)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            continue
        tensors, ck, cv = _inputs(t, hq, hkv, d, cfg)
        grad = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator(device="cuda").manual_seed(1))

        def single():
            xs = [x.detach().requires_grad_() for x in tensors]
            return xs, nsa_attention(*xs, compress_k=ck, compress_v=cv, config=cfg, backend="triton")

        local = {lay: [split_for_rank(x, world, rank, lay) for x in tensors] for lay in ("load_balanced", "contiguous")}

        def cp(layout, exchange, ck_=ck, cv_=cv):
            xs = [x.detach().requires_grad_() for x in local[layout]]
            return xs, nsa_attention_cp(*xs, compress_k=ck_, compress_v=cv_, cp_group=group, config=cfg,
                                        layout=layout, backend="triton", selection_exchange=exchange)

        if t <= args.check_max_t:  # equality with one GPU, bf16
            xs, out = single()
            out.backward(grad)
            want = [out.detach()] + [x.grad for x in xs]
            for exchange in ("allgather", "ring"):
                ck2, cv2 = copy.deepcopy(ck), copy.deepcopy(cv)
                ys, got = cp("load_balanced", exchange, ck2, cv2)
                got.backward(split_for_rank(grad, world, rank, "load_balanced"))
                errs = [_rel(got.detach(), split_for_rank(want[0], world, rank, "load_balanced"))]
                errs += [_rel(y.grad, split_for_rank(w, world, rank, "load_balanced")) for y, w in zip(ys, want[1:])]
                err = torch.tensor(max(errs), device="cuda")
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                row[f"check_{exchange}_max_rel_err"] = err.item()
            del xs, out, want, ys, got
            torch.cuda.empty_cache()

        def fwd(make):
            return lambda: make()[1]

        def fwd_bwd(make, g):
            return lambda: make()[1].backward(g)

        g_local = {lay: split_for_rank(grad, world, rank, lay) for lay in ("load_balanced", "contiguous")}
        row["single_fwd_ms"] = _timed(fwd(single), args.iters)
        row["single_fwdbwd_ms"] = _timed(fwd_bwd(single, grad), args.iters)
        for layout in ("load_balanced", "contiguous"):
            for exchange in ("allgather", "ring"):
                key = f"cp_{layout}_{exchange}"
                try:
                    row[f"{key}_fwd_ms"] = _timed(fwd(lambda: cp(layout, exchange)), args.iters)
                    row[f"{key}_fwdbwd_ms"] = _timed(fwd_bwd(lambda: cp(layout, exchange), g_local[layout]),
                                                     args.iters)
                    row[f"{key}_E_fwd"] = row["single_fwd_ms"] / (world * row[f"{key}_fwd_ms"])
                    row[f"{key}_E_fwdbwd"] = row["single_fwdbwd_ms"] / (world * row[f"{key}_fwdbwd_ms"])
                except Exception as e:  # noqa: BLE001 - recorded, the others still run
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
        row["recv_bytes"] = received_bytes(t, world, hkv, d, cfg)
        kv = split_for_rank(torch.cat(tensors[3:5], -1), world, rank)
        buf = kv.new_empty(world * kv.shape[0], *kv.shape[1:])
        row["selection_allgather_alone_ms"] = _timed(lambda: dist.all_gather_into_tensor(buf, kv), args.iters)
        kv = buf = tensors = local = None  # free before the dense runs
        torch.cuda.empty_cache()
        if t <= args.dense_max_t:
            _dense(row, t, hq, d, world, args.iters)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    return dict(device=torch.cuda.get_device_name(), gpus=world, date=datetime.date.today().isoformat(),
                command=f"torchrun --nproc_per_node {world} -m nsa_parallel.bench_cp " + " ".join(sys.argv[1:]),
                torch=torch.__version__, config=cfg.__dict__,
                grad_reduce_scatter=args.grad_reduce_scatter, rows=rows)


def _dense(row, t, hq, d, world, iters, single=True):
    """Causal SDPA on one GPU and as torch's ring (``context_parallel``); K/V carry all 64 heads there (the ring
    has no GQA), which is the dense model's cost."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fa = torch.nn.functional.scaled_dot_product_attention
    mk = lambda: torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(), mk(), mk()
    g = torch.randn_like(q)
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends if single else ():
        try:
            with sdpa_kernel(backend):
                row[f"dense_{name}_fwd_ms"] = _timed(lambda: fa(q, k, v, is_causal=True), iters)
                row[f"dense_{name}_fwdbwd_ms"] = _timed(lambda: fa(q, k, v, is_causal=True).backward(g), iters)
        except Exception as e:  # noqa: BLE001
            row[f"dense_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    q, k, v, g = (x.detach() for x in (q, k, v, g))  # context_parallel shards its buffers in place
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    mesh = init_device_mesh("cuda", (world,))
    for name, backend in backends:
        qr, kr, vr, gr = (x.clone() for x in (q, k, v, g))
        try:
            with sdpa_kernel(backend), context_parallel(mesh, buffers=[qr, kr, vr, gr], buffer_seq_dims=[2] * 4):
                # the context swaps F.scaled_dot_product_attention for its ring: look it up inside, not before
                ring = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    *[x.detach().requires_grad_() for x in (qr, kr, vr)], is_causal=True)
                row[f"dense_ring_{name}_fwd_ms"] = _timed(ring, iters)
                row[f"dense_ring_{name}_fwdbwd_ms"] = _timed(lambda: ring().backward(gr), iters)
        except Exception as e:  # noqa: BLE001
            row[f"dense_ring_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node P -m nsa_parallel.bench_cp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--check-max-t", type=int, default=131072, help="longest T whose CP result is checked")
    p.add_argument("--dense-max-t", type=int, default=262144, help="longest T to time dense attention at")
    p.add_argument("--dense-ring-only", action="store_true", help="time only torch's dense ring attention")
    p.add_argument("--grad-reduce-scatter", choices=("overlap", "sync"), default="overlap",
                   help="all-gather mode's backward: start the reduce-scatter of the gathered K/V's gradient as soon "
                        "as it is complete (overlap, the default) or when autograd reaches the gather (sync)")
    p.add_argument("--out", default="cp_bench.json")
    args = p.parse_args(argv)
    from nsa_parallel.context_parallel import comm
    comm.OVERLAP_GRAD_REDUCE_SCATTER = args.grad_reduce_scatter == "overlap"
    if not torch.cuda.is_available():
        raise SystemExit("nsa_parallel.bench_cp needs CUDA GPUs (one per rank)")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    try:
        res = run(args)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        all_done()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
