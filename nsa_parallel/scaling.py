"""Scaling study: attention time and memory against sequence length x CP size x attention (NSA vs dense).

    python -m nsa_parallel.scaling --seqlens 8192 16384 32768 65536 131072 --cp-sizes 1 2 --out study/   # GPUs
    python -m nsa_parallel.scaling --device cpu --seqlens 256 512 --cp-sizes 1 2 --heads 4 --kv-heads 2 \\
        --head-dim 16 --nsa-window 32 --nsa-select-block 16 --nsa-select-topn 4 --out toy/                # CPU

Each point times forward and forward+backward of one attention layer's core on one sequence (B=1, the median of
``--iters`` runs, each counted at its slowest rank) and its peak memory per rank:

- ``nsa``: :func:`nsa_attention` on one device, :func:`nsa_attention_cp` (load-balanced split, selection K/V
  all-gathered) over P ranks;
- ``dense``: causal SDPA with GQA (torch picks flash on GPUs) on one device; over P ranks, all-gather context
  parallelism as Llama 3 trained it (K/V gathered, each local chunk attends to the keys before its end with a
  lower-right causal mask, which SDPA runs in its memory-efficient kernel; the gather's backward reduce-scatters).
  torch's ring over flash/cuDNN is timed by :mod:`nsa_parallel.bench_cp`.

For each CP size the tool spawns P processes on this host (one GPU each, NCCL; gloo on CPU). Points that do not
fit (out of memory, a length CP cannot split) are recorded with the reason and the sweep goes on. Writes
``scaling.csv``, ``scaling.json`` (with device, date and command), PNG plots (time and memory vs length, speedup
of NSA over dense, CP efficiency ``t(1) / (P x t(P))``) and TensorBoard scalars (step = sequence length) into
``--out``; ``--replot DIR`` redraws the plots and scalars from a ``scaling.json``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from .arguments import add_nsa_args, nsa_config_from_args
from .distributed import all_done, leave_spawned_rank

ATTENTIONS = ("nsa", "dense")
COLUMNS = ("attention", "P", "T", "fwd_ms", "fwdbwd_ms", "tokens_per_s", "peak_mem_gib", "mem_kind", "error")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters: int, dev: torch.device, warmup: int = 1) -> float:
    """Median ms of ``fn`` (each run counted at its slowest rank)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(dev)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        t = torch.tensor(time.perf_counter() - t0, device=dev)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return 1e3 * sorted(times)[len(times) // 2]


def _peak_mem(fn, dev: torch.device):
    """GiB: the largest per-rank CUDA peak of one run, or the process's peak RSS on CPU."""
    if dev.type != "cuda":
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    m = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=dev)
    if dist.is_initialized():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.item(), "cuda_max_allocated"


def _inputs(t, args, dev, dtype):
    """Whole-sequence inputs, the same on every rank (each then takes its chunks)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen)  # noqa: E731
    q = mk(1, t, args.heads, args.head_dim)
    kvs = [mk(1, t, args.kv_heads, args.head_dim) for _ in range(6)]
    gate = torch.rand(1, t, args.heads, 3, device=dev, dtype=dtype, generator=gen)
    return [q, *kvs, gate], mk(1, t, args.heads, args.head_dim)


def _nsa_fn(tensors, args, cfg, group, dev, dtype):
    from .context_parallel import nsa_attention_cp, split_for_rank
    from .kernels import Compression
    torch.manual_seed(0)
    ck, cv = (Compression(args.kv_heads, args.head_dim, cfg.compress_block, cfg.compress_stride, device=dev,
                          dtype=dtype) for _ in range(2))
    backend = args.nsa_backend or ("triton" if dev.type == "cuda" else "reference")
    if group is not None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        tensors = [split_for_rank(x, world, rank) for x in tensors]

    def run():
        xs = [x.detach().requires_grad_() for x in tensors]
        return nsa_attention_cp(*xs, compress_k=ck, compress_v=cv, cp_group=group, config=cfg, backend=backend)
    return run


def _dense_fn(tensors, args, group):
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from .context_parallel import CPShard, chunk_ranges, split_for_rank
    from .context_parallel.comm import all_gather_sequence
    q, k, v = tensors[0], tensors[5], tensors[6]  # the window branch's K/V: any [1, t, hkv, d] pair
    t = q.shape[1]
    bhtd = lambda x: x.transpose(1, 2)  # noqa: E731 - SDPA wants [b, h, t, d]
    if group is None:
        def run():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            return F.scaled_dot_product_attention(*map(bhtd, xs), is_causal=True, enable_gqa=True)
        return run
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = CPShard.create(group, t, "load_balanced")
    per_chunk = t // shard.num_chunks
    local = [split_for_rank(x, world, rank) for x in (q, k, v)]
    ranges = chunk_ranges(t, world, rank)

    groups = q.shape[2] // k.shape[2]

    def run():
        ql, kl, vl = (x.detach().requires_grad_() for x in local)
        # heads expanded after the gather (the wire carries the GQA heads only): SDPA's lower-right causal mask
        # runs in the memory-efficient kernel, which takes no enable_gqa
        kg, vg = (all_gather_sequence(x, shard, per_chunk).repeat_interleave(groups, dim=2) for x in (kl, vl))
        outs = []
        for i, (c0, c1) in enumerate(ranges):
            qc = ql[:, i * per_chunk:(i + 1) * per_chunk]
            outs.append(F.scaled_dot_product_attention(
                bhtd(qc), bhtd(kg[:, :c1]), bhtd(vg[:, :c1]), attn_mask=causal_lower_right(c1 - c0, c1)))
        return torch.cat(outs, dim=2)
    return run


def run_points(args, cfg, group, dev) -> List[Dict]:
    from .context_parallel import check_cp_config
    world = dist.get_world_size(group) if group is not None else 1
    dtype = getattr(torch, args.dtype)
    rows = []
    for t in args.seqlens:
        for attn in args.attention:
            row = dict(attention=attn, P=world, T=t)
            try:
                if world > 1:
                    check_cp_config(t, world, "load_balanced", cfg)
                tensors, grad = _inputs(t, args, dev, dtype)
                fn = _nsa_fn(tensors, args, cfg, group, dev, dtype) if attn == "nsa" else _dense_fn(tensors, args,
                                                                                                     group)
                if group is not None:
                    from .context_parallel import split_for_rank
                    grad = split_for_rank(grad, world, dist.get_rank(group))
                grad = grad if attn == "nsa" else grad.transpose(1, 2)
                row["fwd_ms"] = _timed(fn, args.iters, dev)
                row["fwdbwd_ms"] = _timed(lambda: fn().backward(grad), args.iters, dev)
                row["tokens_per_s"] = t / (row["fwdbwd_ms"] / 1e3)
                row["peak_mem_gib"], row["mem_kind"] = _peak_mem(lambda: fn().backward(grad), dev)
            except (torch.OutOfMemoryError, ValueError, RuntimeError) as e:
                # recorded, not fatal: a study wants the points that fit; the reason stays in the table
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            tensors = grad = fn = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            if group is None or dist.get_rank(group) == 0:
                print(f"[scaling] {attn:5s} P={world} T={t:>8d}: " + (
                    f"fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwdbwd_ms']:.2f} ms, "
                    f"{row['peak_mem_gib']:.2f} GiB" if "error" not in row else row["error"]), flush=True)
    return rows


def _worker(rank, world, port, args, cfg, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = run_points(args, cfg, dist.group.WORLD, dev)
        if rank == 0:
            result["rows"] = rows
        all_done()
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


def sweep(args, cfg) -> List[Dict]:
    import torch.multiprocessing as mp

    from .rendezvous import free_port
    rows = []
    for p in args.cp_sizes:
        if p == 1:
            rows += run_points(args, cfg, None, torch.device(args.device))
            continue
        result = mp.Manager().dict()
        mp.spawn(_worker, args=(p, free_port(), args, cfg, result), nprocs=p, join=True)
        rows += result["rows"]
    return rows


# ------------------------------------------------------------------------------------------------------- output
def _series(rows, attention, p, key):
    pts = sorted((r["T"], r[key]) for r in rows if r["attention"] == attention and r["P"] == p
                 and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
    return [x for x, _ in pts], [y for _, y in pts]


def derived(rows) -> List[Dict]:
    """Speedup of NSA over dense at the same (T, P) and CP efficiency t(P=1) / (P x t(P)) for each attention."""
    by = {(r["attention"], r["P"], r["T"]): r for r in rows if "fwdbwd_ms" in r}
    out = []
    for (attn, p, t), r in sorted(by.items()):
        d = dict(attention=attn, P=p, T=t)
        if attn == "nsa" and ("dense", p, t) in by:
            d["speedup_vs_dense"] = by[("dense", p, t)]["fwdbwd_ms"] / r["fwdbwd_ms"]
        if p > 1 and (attn, 1, t) in by:
            d["cp_efficiency"] = by[(attn, 1, t)]["fwdbwd_ms"] / (p * r["fwdbwd_ms"])
        out.append(d)
    return out


def write_tables(study: Dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.json", "w") as f:
        json.dump(study, f, indent=1)
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ("speedup_vs_dense", "cp_efficiency"))
        w.writeheader()
        extra = {(d["attention"], d["P"], d["T"]): d for d in study["derived"]}
        for r in study["rows"]:
            d = extra.get((r["attention"], r["P"], r["T"]), {})
            w.writerow({**{k: r.get(k, "") for k in COLUMNS}, "speedup_vs_dense": d.get("speedup_vs_dense", ""),
                        "cp_efficiency": d.get("cp_efficiency", "")})


def write_tensorboard(study: Dict, out: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(out / "tensorboard"))
    for r in study["rows"]:
        for key in ("fwd_ms", "fwdbwd_ms", "tokens_per_s", "peak_mem_gib"):
            if key in r:
                w.add_scalar(f"scaling/{r['attention']}/cp{r['P']}/{key}", r[key], r["T"])
    for d in study["derived"]:
        for key in ("speedup_vs_dense", "cp_efficiency"):
            if key in d:
                w.add_scalar(f"scaling/{d['attention']}/cp{d['P']}/{key}", d[key], d["T"])
    w.close()


def write_plots(study: Dict, out: Path) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("nsa_parallel.scaling: PNG plots need matplotlib: pip install 'nsa-parallel[plots]' "
                         "(or pass --no-plots and redraw later with --replot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, der = study["rows"], study["derived"]
    sizes = sorted({r["P"] for r in rows})
    title = f"{study['device']}, {study['shape']}"
    paths = []

    def figure(name, ylabel, series, log_y=True):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, (x, y) in series:
            if x:
                ax.plot(x, y, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    attns = [a for a in ATTENTIONS if any(r["attention"] == a for r in rows)]
    figure("time_vs_length", "forward+backward (ms)",
           [(f"{a} P={p}", _series(rows, a, p, "fwdbwd_ms")) for a in attns for p in sizes])
    mem_kind = next((r["mem_kind"] for r in rows if "mem_kind" in r), "")
    figure("memory_vs_length", f"peak memory per rank (GiB, {mem_kind})",
           [(f"{a} P={p}", _series(rows, a, p, "peak_mem_gib")) for a in attns for p in sizes])
    figure("speedup_vs_dense", "dense / NSA forward+backward time",
           [(f"P={p}", _series(der, "nsa", p, "speedup_vs_dense")) for p in sizes], log_y=False)
    if len(sizes) > 1:
        figure("cp_efficiency", "t(P=1) / (P x t(P))",
               [(f"{a} P={p}", _series(der, a, p, "cp_efficiency")) for a in attns for p in sizes if p > 1],
               log_y=False)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_parallel.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--cp-sizes", type=int, nargs="+", default=[1], help="context-parallel sizes (ranks per point)")
    p.add_argument("--attention", choices=ATTENTIONS, nargs="+", default=list(ATTENTIONS))
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="scaling", help="directory for the table, plots and TensorBoard scalars")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG plots (needs matplotlib)")
    p.add_argument("--replot", default=None, metavar="DIR", help="redraw plots and scalars from DIR/scaling.json")
    add_nsa_args(p)
    return p


def _fail(msg: str):
    raise SystemExit(f"nsa_parallel.scaling: {msg}")


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        study = json.loads((out / "scaling.json").read_text())
        write_tensorboard(study, out)
        for path in write_plots(study, out):
            print(f"[scaling] wrote {path}")
        return study
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but torch sees no CUDA device; allowed here: cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    for name in ("seqlens", "cp_sizes"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            _fail(f"--{name.replace('_', '-')} {bad} must be >= 1")
    if args.device == "cuda" and max(args.cp_sizes) > torch.cuda.device_count():
        _fail(f"--cp-sizes {max(args.cp_sizes)} needs that many GPUs; this host has {torch.cuda.device_count()}")
    if args.heads % args.kv_heads:
        _fail(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    try:
        cfg = nsa_config_from_args(args)
    except ValueError as e:
        _fail(str(e))
    rows = sweep(args, cfg)
    study = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{os.cpu_count()}",
                 date=datetime.date.today().isoformat(), torch=torch.__version__,
                 command="python -m nsa_parallel.scaling " + " ".join(argv if argv is not None else sys.argv[1:]),
                 shape=f"B=1, {args.heads}/{args.kv_heads} heads, d={args.head_dim}, {args.dtype}",
                 config=cfg.__dict__, rows=rows, derived=derived(rows))
    out = Path(args.out)
    write_tables(study, out)
    write_tensorboard(study, out)
    paths = write_plots(study, out) if args.plots else []
    print(f"[scaling] wrote {out / 'scaling.csv'}, {out / 'scaling.json'}, {out / 'tensorboard'}"
          + "".join(f", {p}" for p in paths))
    return study


if __name__ == "__main__":
    main()
