"""Benchmark one NSA decoding step against dense decoding (SDPA over the whole KV cache), on one GPU.

    python -m nsa_parallel.bench_decode --contexts 8192 16384 32768 65536 131072 --batches 1 8 64 --out decode.json

For each context length T and batch B (every sequence holding T tokens; 64 query / 4 KV heads, d=128, bf16, paper
hyperparameters): checks the Triton step against the reference decode on a few sequences, then times (median of
CUDA-graph replays of ``--steps`` back-to-back steps, so Python's and the graph's launch costs are out for both, as
in a model's decode graph) the NSA attention step (``nsa_decode``: compressed + scores + top-n + selected + window +
gates), the cache update for a new token (``NSAKVCache.append``: without and
with the compression of a finished block in every sequence) and dense decoding (``F.scaled_dot_product_attention``
of one query over T cached keys with GQA). Reports the bytes each must read (NSA: the compressed cache, n selected
blocks and the window of K and V per KV head; dense: the whole cache), the achieved bandwidth against a measured
device-to-device copy, and the speedup. The bandwidth yardstick is the higher of a device-to-device copy's and a
full-tensor sum's rate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch


# variants of decode_triton's launch knobs timed at the --profile point, interleaved (see _variants_us)
VARIANTS = {
    "default": {},
    "4 scores warps, 4 combine warps (before)": dict(SCORES_WARPS=4, COMBINE_WARPS=4),
    "4 scores warps": dict(SCORES_WARPS=4),
    "2 combine warps": dict(COMBINE_WARPS=2),
    "1 scores warp": dict(SCORES_WARPS=1),
    "top-n by one argmax per pick": dict(TOPN_CHUNKS=0),
}


def capture_graph(fn, steps: int = 1, leaves=()) -> torch.cuda.CUDAGraph:
    """``steps`` calls of ``fn`` captured in a CUDA graph, after warm-up calls on a side stream (as torch.cuda.graph
    asks); ``leaves`` get ``.grad = None`` before the capture, so a captured backward writes fresh gradients
    instead of adding onto the warm-up's (benchmarks/timeline_core.py)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    for x in leaves:
        x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    return g


def _replay_ms(g: torch.cuda.CUDAGraph, iters: int, steps: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return sorted(times)[len(times) // 2]


def _graph_ms(fn, iters: int = 50, steps: int = 1) -> float:
    """Median ms per call of ``fn`` from replays of a CUDA graph holding ``steps`` calls back to back (steps > 1: the
    graph's own launch latency is spread over them, as in a model's decode graph that holds every layer)."""
    return _replay_ms(capture_graph(fn, steps), iters, steps)


def _variants_us(step, variants: dict, steps: int, rounds: int = 7) -> dict:
    """Microseconds per step of each variant (knob values set on decode_triton while its graph is captured): the
    median over ``rounds`` rounds that each replay every variant's graph in turn, so drifts of the GPU's clock
    between variants cancel (single sweeps of the same code spread over +-5%)."""
    from nsa_parallel.kernels import decode_triton
    graphs = {}
    for name, knobs in variants.items():
        old = {k: getattr(decode_triton, k) for k in knobs}
        for k, v in knobs.items():
            setattr(decode_triton, k, v)
        try:
            graphs[name] = capture_graph(step, steps)
        finally:
            for k, v in old.items():
                setattr(decode_triton, k, v)
    runs = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            runs[name].append(_replay_ms(g, 20, steps) * 1e3)
    return {name: sorted(r)[len(r) // 2] for name, r in runs.items()}


def copy_bandwidth_gbs(gib: float = 4.0) -> float:
    """Device-to-device copy rate (read + write bytes per second), the achievable HBM bandwidth."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = _graph_ms(lambda: b.copy_(a), iters=20)
    return 2 * a.numel() * 2 / (ms / 1e3) / 1e9


def read_bandwidth_gbs(gib: float = 4.0) -> float:
    """Rate of a full-tensor sum (bytes read per second): what a read-bound kernel can hope for."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    ms = _graph_ms(lambda: torch.sum(x, dim=0, dtype=torch.float32, out=out), iters=20)
    return x.numel() * 2 / (ms / 1e3) / 1e9


def nsa_bytes(t: int, hkv: int, d: int, cfg, elem: int = 2) -> int:
    """K and V bytes one sequence's decode step must read."""
    tokens = cfg.num_compressed(t) + min(cfg.select_topn * cfg.select_block, t) + min(cfg.window, t)
    return tokens * hkv * 2 * d * elem


def make_case(t: int, bsz: int, hq: int, hkv: int, d: int, cfg):
    """A bf16 Triton-backend cache of ``bsz`` sequences holding ``t`` random tokens each (room for one more), and
    a query and gates for the next step: ``(cache, q [B, hq, d], gate [B, hq, 3])``."""
    from nsa_parallel.kernels import Compression
    from nsa_parallel.kernels.cache import NSAKVCache
    torch.manual_seed(0)
    ck, cv = (Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device="cuda", dtype=torch.bfloat16)
              for _ in range(2))
    cache = NSAKVCache(bsz, t + 1, hkv, d, cfg, ck, cv, device="cuda", dtype=torch.bfloat16, backend="triton")
    for x in (cache.k_slc, cache.v_slc, cache.k_swa, cache.v_swa, cache.k_cmp, cache.v_cmp, cache.k_raw, cache.v_raw):
        x.normal_()
    cache.lens.fill_(t)
    q = torch.randn(bsz, hq, d, device="cuda", dtype=torch.bfloat16)
    gate = torch.rand(bsz, hq, 3, device="cuda", dtype=torch.bfloat16)
    return cache, q, gate


def run(args) -> dict:
    import torch.nn.functional as F

    from nsa_parallel.bench import kernel_times
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels.decode import nsa_decode
    cfg = NSAConfig()
    hq, hkv, d = args.heads, args.kv_heads, 128
    copy_bw, read_bw = copy_bandwidth_gbs(), read_bandwidth_gbs()
    bw = max(copy_bw, read_bw)  # the higher of the two is the yardstick
    print(f"device-to-device copy: {copy_bw:.0f} GB/s, sum (read): {read_bw:.0f} GB/s", flush=True)
    rows = []
    for t in args.contexts:
        for bsz in args.batches:
            row = dict(T=t, B=bsz)
            try:
                cache, q, gate = make_case(t, bsz, hq, hkv, d, cfg)
                if bsz <= 8:  # the kernel against the reference on this very cache
                    o_t, i_t = nsa_decode(q, gate, cache, backend="triton", return_indices=True)
                    o_r, i_r = nsa_decode(q, gate, cache, backend="reference", return_indices=True)
                    row["check_max_rel_err"] = ((o_t.float() - o_r.float()).abs().max()
                                                / o_r.float().abs().max()).item()
                    row["check_same_blocks"] = float((i_t == i_r).float().mean().item())
                step = lambda: nsa_decode(q, gate, cache, backend="triton")  # noqa: E731
                row["nsa_ms"] = _graph_ms(step, steps=args.steps)
                row["nsa_ms_one_per_graph"] = _graph_ms(step)
                if [t, bsz] == args.profile:
                    row["nsa_kernels_us"] = {k[:60]: us for k, us, _ in kernel_times(step, 20)}
                    if not args.no_sweep:
                        row["nsa_us_variants"] = _variants_us(step, VARIANTS, args.steps)
                new = [torch.randn(bsz, 1, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(6)]

                def append():
                    cache.append(*new)
                    cache.lens.sub_(1)  # replays keep writing the same slot
                # T + 1 tokens complete no compressed block (T is a multiple of d); T tokens complete one in every
                # sequence, the most phi work a step can have
                row["append_ms"] = _graph_ms(append, steps=args.steps)
                cache.lens.fill_(t - 1)
                row["append_block_ms"] = _graph_ms(append, steps=args.steps)
                cache.lens.fill_(t)
                row["nsa_bytes"] = bsz * nsa_bytes(t, hkv, d, cfg)
                row["nsa_gbs"] = row["nsa_bytes"] / (row["nsa_ms"] / 1e3) / 1e9
                row["nsa_bw_frac"] = row["nsa_gbs"] / bw
                cache = None
                torch.cuda.empty_cache()
                k = torch.randn(bsz, hkv, t, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                qd = q.view(bsz, hq, 1, d)
                dense = lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)  # noqa: E731
                row["dense_ms"] = _graph_ms(dense, steps=args.steps)
                row["dense_ms_one_per_graph"] = _graph_ms(dense)
                row["dense_bytes"] = 2 * k.numel() * 2
                row["dense_gbs"] = row["dense_bytes"] / (row["dense_ms"] / 1e3) / 1e9
                row["speedup"] = row["dense_ms"] / row["nsa_ms"]
                for name, us in row.get("nsa_us_variants", {}).items():  # against this run's dense and yardstick
                    row.setdefault("variants_speedup", {})[name] = row["dense_ms"] * 1e3 / us
                    row.setdefault("variants_bw_frac", {})[name] = row["nsa_bytes"] / (us * 1e3) / bw
                row["speedup_with_append"] = row["dense_ms"] / (row["nsa_ms"] + row["append_ms"])
                k = v = None
            except torch.OutOfMemoryError as e:
                row["error"] = f"OOM: {e}".splitlines()[0][:200]
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                command="python -m nsa_parallel.bench_decode " + " ".join(sys.argv[1:]), torch=torch.__version__,
                copy_gbs=copy_bw, read_gbs=read_bw, config=cfg.__dict__, heads=hq, kv_heads=hkv, head_dim=d, rows=rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nsa_parallel.bench_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--profile", type=int, nargs=2, default=[65536, 8], metavar=("T", "B"),
                   help="point whose per-kernel device times are recorded")
    p.add_argument("--steps", type=int, default=20,
                   help="decode steps per CUDA graph (their mean is reported; *_one_per_graph: a graph per step)")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip timing the VARIANTS of the launch knobs at the --profile point")
    p.add_argument("--out", default="decode_bench.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("nsa_parallel.bench_decode needs a CUDA GPU")
    res = run(args)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
