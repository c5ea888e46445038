"""Document masking under CP, timed: every document padded to split over the ranks (the layout before the thirtieth
session) against :func:`nsa_parallel.documents.plan_cp_documents` (short documents held whole by one rank).

    cd /tmp && python3 -m torch.distributed.run --standalone --nproc_per_node 2 \\
        $REPO/benchmarks/cp_documents_ab.py --length 131072 --means 1000 4000 16000 --out cp_documents_ab.json

Per mean document length (exponential lengths, as in ``benchmarks/cp_document_plans.py``): one sample's documents
laid out both ways, the NSA core (``nsa_attention_cp``, 64 query / 4 KV heads, d=128, paper config, bf16, Triton)
run forward and forward+backward; the two layouts' outputs on the real tokens compared with each other (they are
the same attention), then both timed (median over ``--iters``, each iteration its slowest rank). On a CPU (gloo) it
runs the reference backend on a small configuration: a check of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cp_document_plans import sample_bounds  # noqa: E402


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters: int, dev, warmup: int = 2) -> float:
    """Median wall ms of ``fn``, each iteration its slowest rank's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(dev)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        t = torch.tensor(time.perf_counter() - t0, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return 1e3 * sorted(times)[len(times) // 2]


def padded_plan(bounds, cp: int, config):
    """Every document split, padded as :func:`plan_cp_documents` pads a split one."""
    from nsa_parallel.documents import CPDocumentPlan, cp_document_lengths
    multiple, least = cp_document_lengths(cp, config)
    split = tuple((s, e, max(least, -(-(e - s) // multiple) * multiple)) for s, e in zip(bounds, bounds[1:]))
    return CPDocumentPlan(bounds[-1], cp, split, ((),) * cp, (0,) * cp)


def main() -> None:
    from nsa_parallel.context_parallel import nsa_attention_cp
    from nsa_parallel.documents import documents_on_cp_rank, plan_cp_documents
    from nsa_parallel.kernels import Compression, NSAConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--means", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="cp_documents_ab.json")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        cfg, hq, hkv, d, dtype, backend = NSAConfig(), 64, 4, 128, torch.bfloat16, "triton"
    else:
        cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=16)
        hq, hkv, d, dtype, backend = 4, 2, 16, torch.float32, "reference"
    torch.manual_seed(0)
    ck, cv = (Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dtype) for _ in "kv")
    rows = []
    for mean in args.means:
        bounds = sample_bounds(args.length, mean, torch.Generator().manual_seed(mean))
        gen = torch.Generator(device=dev).manual_seed(1)
        full = [torch.randn(1, args.length, h, d, device=dev, dtype=dtype, generator=gen)
                for h in (hq,) + (hkv,) * 6] + [torch.rand(1, args.length, hq, 3, device=dev, dtype=dtype,
                                                           generator=gen)]
        row = dict(length=args.length, P=world, mean_document=mean, documents=len(bounds) - 1)
        outs = {}
        for name, plan in (("padded", padded_plan(bounds, world, cfg)),
                           ("plan", plan_cp_documents(bounds, world, cfg))):
            local, params = documents_on_cp_rank({"tokens": torch.arange(args.length, device=dev)[None]}, -1, plan,
                                                 rank)
            rows_of = local["tokens"][0]
            real = rows_of >= 0
            xs = [x[:, rows_of.clamp(min=0)] for x in full]
            grad = torch.randn(1, len(rows_of), hq, d, device=dev, dtype=dtype)

            def run(xs=xs, params=params):
                ys = [x.detach().requires_grad_() for x in xs]
                return nsa_attention_cp(*ys, compress_k=ck, compress_v=cv, cp_group=dist.group.WORLD, config=cfg,
                                        backend=backend, cu_seqlens=params.cu_seqlens_q_padded,
                                        cu_seqlens_whole=params.cu_seqlens_whole)
            out = run()
            outs[name] = torch.zeros(1, args.length, hq, d, device=dev, dtype=torch.float32)
            outs[name][:, rows_of[real]] = out.detach()[:, real].float()
            row[f"{name}_tokens_per_rank_max"] = max(plan.tokens(r) for r in range(world))
            row[f"{name}_fwd_ms"] = _timed(run, args.iters, dev)
            row[f"{name}_fwdbwd_ms"] = _timed(lambda g=grad: run().backward(g), args.iters, dev)
            del xs, out
        for o in outs.values():
            dist.all_reduce(o)  # every real token on exactly one rank
        row["max_rel_err_plan_vs_padded"] = ((outs["plan"] - outs["padded"]).norm() / outs["padded"].norm()).item()
        row["speedup_fwdbwd"] = row["padded_fwdbwd_ms"] / row["plan_fwdbwd_ms"]
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        del full, outs
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", gpus=world, backend=backend,
                           date=datetime.date.today().isoformat(), torch=torch.__version__,
                           command="torchrun --nproc_per_node {} benchmarks/cp_documents_ab.py {}".format(
                               world, " ".join(sys.argv[1:])), rows=rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
