"""Benchmark the NSA core on one GPU against dense and sparse peers.

    python -m nsa_parallel.bench --seqlens 8192 16384 32768 65536 --out bench.json

Times forward and forward+backward (median of ``triton.testing.do_bench`` over at least ``MIN_TIMED_RUNS`` runs) of
the whole NSA core (phi compression, compressed attention, selection scores, top-n, selected and window attention,
gates) and of each stage, for B=1, 64 query heads / 4 KV heads, d=128 (and dk=192/dv=128), paper hyperparameters,
beside torch SDPA (flash and cuDNN backends), FlexAttention's sliding window (the window branch's peer) and
fla-core's ``parallel_nsa`` where they run. Reports achieved TFLOP/s against a measured bf16 matmul ceiling and
peak memory; prints a table and writes JSON.

    python -m nsa_parallel.bench --seqlens 65536 --head-dims 128/128 192/128 --no-fla --no-flex --dense-max-t 0 \
        --compare docs/results/<earlier run>.json --max-slowdown 0.03

``--compare`` prints each row's NSA times against the last row of the same shape in earlier bench JSON files;
with ``--max-slowdown`` the command exits 1 when one is slower by more than that fraction (a regression gate for
the GPU machine; docs/benchmarks.md names the current baselines).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch


def nsa_flops(t: int, hq: int, dk: int, dv: int, cfg) -> float:
    """Forward attention FLOPs of the NSA core: 2*(dk+dv) per (query head, visible key), keys summed over queries."""
    tt = torch.arange(t, dtype=torch.float64)
    ncmp = torch.where(tt < cfg.compress_block - 1, 0.0,
                       torch.div(tt - cfg.compress_block + 1, cfg.compress_stride, rounding_mode="floor") + 1)
    nslc = torch.clamp(tt + 1, max=cfg.select_topn * cfg.select_block)
    nwin = torch.clamp(tt + 1, max=cfg.window)
    return 2.0 * hq * (dk + dv) * float((ncmp + nslc + nwin).sum())


def dense_flops(t: int, hq: int, dk: int, dv: int) -> float:
    return 2.0 * hq * (dk + dv) * t * (t + 1) / 2


ACCUMULATE_GRADS = False  # --accumulate-grads: time fwd+bwd as before 2026-11-23 (session 10), see bench()
# do_bench times rep / (its runtime estimate) runs: with rep=100 ms the core's 64k fwd+bwd (~110 ms) got a single
# timed run (its "median" moved 1-2 ms between identical runs); each median here is of at least this many
MIN_TIMED_RUNS = 10


def timed(fn, grad_to_none=None) -> float:
    """Median ms of ``fn()`` over at least ``MIN_TIMED_RUNS`` runs (``do_bench``, its rep scaled to the runtime of
    one run measured first)."""
    import triton
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = max(100.0, 1.1 * MIN_TIMED_RUNS * start.elapsed_time(end))
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median", grad_to_none=grad_to_none)


def bench(fn, bwd_of=None, leaves=()):
    """Median ms of ``fn()`` and, if ``bwd_of`` is given, of ``fn()`` plus its backward with that output grad.

    The ``leaves`` (the timed function's input tensors and parameters) get ``.grad = None`` before every timed
    run (``do_bench``'s ``grad_to_none``, outside the timed region), as in a training step, where q, k, v come out
    of a projection and nothing adds into a leaf's ``.grad``; without it each run also adds its gradients onto
    the previous run's (at 64k, ~1 ms for q alone)."""
    fwd = timed(fn)
    if bwd_of is None:
        return fwd, None
    grad = bwd_of(fn())

    def fwd_bwd():
        fn().backward(grad)

    reset = None if ACCUMULATE_GRADS else [x for x in leaves if x.requires_grad]
    return fwd, timed(fwd_bwd, grad_to_none=reset)


def peak_mem(fn) -> float:
    """GiB allocated above the inputs during one forward+backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    out.backward(torch.ones_like(out))
    del out
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def matmul_ceiling() -> float:
    import triton
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / ms / 1e9


def emit(rows: list, out: str, **row) -> None:
    """Append ``row`` to ``rows``, print it as a JSON line and rewrite ``out`` with every row so far (the scripts in
    benchmarks/ stream their measurements this way, so a run cut short keeps what it measured)."""
    import triton
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
        json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)


def compressed_case(t: int, cfg, hq: int = 64, hkv: int = 4, d: int = 128, dev: str = "cuda", seed: int = 0):
    """Random bf16 inputs of the compressed branch at length ``t`` for the Gluon prototypes in benchmarks/:
    ``(q [1, t, hq, d], kc, vc [1, t/stride, hkv, d], scale)``."""
    torch.manual_seed(seed)
    tc = cfg.num_compressed(t)
    q = torch.randn(1, t, hq, d, device=dev, dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, tc, hkv, d, device=dev, dtype=torch.bfloat16) for _ in "kv")
    return q, kc, vc, 1 / math.sqrt(d)


def cubin_tool(ck, tool: str, *args: str, check: bool = True) -> str:
    """Standard output of one of the CUDA binary tools that ship with Triton (``cuobjdump``, ``nvdisasm``) run on
    the cubin of a kernel compiled by ``triton.compile``: works without a GPU (the compile-only checks in
    benchmarks/)."""
    import os
    import subprocess
    import tempfile

    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=check).stdout


def cubin_resources(ck) -> str:
    """Registers, stack (spills), shared memory of a kernel compiled by ``triton.compile`` (``cuobjdump
    -res-usage``)."""
    usage = cubin_tool(ck, "cuobjdump", "-res-usage", check=False)
    return " ".join(line.strip() for line in usage.splitlines() if "REG" in line)


def core_case(t: int, cfg, hq: int = 64, hkv: int = 4, d: int = 128, dev: str = "cuda", seed: int = 0,
              dv: int | None = None):
    """The bench's NSA core at length ``t`` for the A/B scripts in benchmarks/: ``(q, kvs, gate, ck, cv, leaves,
    core, do)``, ``core()`` the Triton core's output and ``do`` an output gradient for it. Head dims: ``d`` for
    queries and keys, ``dv`` (default ``d``) for values."""
    from nsa_parallel.kernels import nsa_attention
    torch.manual_seed(seed)
    dv = d if dv is None else dv
    q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, dv, cfg, dev)
    leaves = [q, *kvs, gate, *ck.parameters(), *cv.parameters()]
    core = lambda: nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                 backend="triton")
    return q, kvs, gate, ck, cv, leaves, core, torch.randn(1, t, hq, dv, device=dev, dtype=q.dtype)


def core_step(core, leaves, do):
    """One training step of ``core_case``'s core, as the A/B scripts time and profile it: the leaves' ``.grad``
    cleared, then the forward and its backward with ``do``."""
    def step():
        for x in leaves:
            x.grad = None
        core().backward(do)
    return step


def head_dims(text: str) -> tuple:
    """``"dk/dv"`` -> ``(dk, dv)``, the ``--head-dims`` argument of the bench and the A/B scripts."""
    dk, dv = (int(x) for x in text.split("/"))
    return dk, dv


def kernel_setting(path: str) -> tuple:
    """``"MODULE.NAME"`` -> ``(module, name)`` of a setting in ``nsa_parallel.kernels`` (``topn.TOPN_PREFILTER``),
    for the A/B scripts to read and change; ValueError naming what is missing."""
    import importlib
    module, _, name = path.rpartition(".")
    try:
        mod = importlib.import_module(f"nsa_parallel.kernels.{module}")
    except ImportError as e:
        raise ValueError(f"no module nsa_parallel.kernels.{module}: {e}") from None
    if not hasattr(mod, name):
        raise ValueError(f"nsa_parallel.kernels.{module} has no setting {name}")
    return mod, name


def kernel_times(fn, reps: int, warmup: int = 1) -> list:
    """``[(kernel, device microseconds per call, launches per call)]`` of what ``fn`` launches, largest first:
    torch.profiler over ``reps`` calls after ``warmup`` (the decode bench's kernel split,
    benchmarks/profile_core.py)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / reps, e.count / reps) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def ab_check(fn, leaves, do, switch) -> float:
    """How far ``fn()``'s output and the gradients of ``leaves`` (for the output gradient ``do``) move when
    ``switch(True)`` replaces ``switch(False)``: the largest ``max |a - b| / max |b|`` over them (the A/B scripts in
    benchmarks/ check two ways of computing the core with it). Leaves the switch on."""
    got = []
    for on in (False, True):
        switch(on)
        o = fn()
        got.append([o.detach()] + [g.detach() for g in torch.autograd.grad(o, leaves, do)])
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
               for a, b in zip(got[1], got[0]))


def ab_block_flips(indices_fn, switch) -> dict:
    """How many top-n block entries change when ``switch(True)`` replaces ``switch(False)`` (``indices_fn()``: the
    block indices ``[b, t, hkv, n]``). A switch that moves the compressed branch's or the scores' rounding flips
    near-tied blocks, and a row with another block has another selected output and gradients, so :func:`ab_check`'s
    largest difference can be large without a bug; this tells the two apart. Leaves the switch on."""
    got = []
    with torch.no_grad():
        for on in (False, True):
            switch(on)
            got.append(indices_fn())
    diff = got[0] != got[1]
    return dict(block_entries_differ=int(diff.sum()), block_rows_differ=int(diff.any(-1).sum()),
                block_entries=diff.numel())


def write_old_modules(rev: str, names, dest: str) -> None:
    """``dest/_old_<name>.py`` = ``kernels/<name>.py`` at git revision ``rev``, its relative imports rebased onto
    ``nsa_parallel.kernels`` (and onto each other's old copies among ``names``): the A/B scripts in benchmarks/ time
    an earlier commit's kernels beside the tree's in one process (the GPU machine has no git history)."""
    import re
    import subprocess
    for name in names:
        src = subprocess.run(["git", "show", f"{rev}:kernels/{name}.py"], capture_output=True, text=True,
                             check=True, cwd=dest).stdout
        src = re.sub(r"from \.(\w+) import", r"from nsa_parallel.kernels.\1 import", src)
        for other in names:
            src = src.replace(f"from nsa_parallel.kernels.{other} import", f"from _old_{other} import")
        with open(f"{dest}/_old_{name}.py", "w") as f:
            f.write(f"# kernels/{name}.py at {rev} (nsa_parallel.bench.write_old_modules); not part of the package\n"
                    + src)


def load_old_module(name: str, dest: str):
    """The module ``dest/_old_<name>.py`` that :func:`write_old_modules` wrote."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"_old_{name}", f"{dest}/_old_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"_old_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


def old_vs_new(doc: str, names, out: str, here: str, flags=()):
    """The command line of the A/B scripts in benchmarks/ (``--old-from REV``, ``--t``, ``--rounds``, ``--out`` and
    the store-true ``flags``): ``(args, old modules)``; with ``--old-from`` it writes the old copies of ``names``
    (:func:`write_old_modules`) and returns ``(args, None)``."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-from", help="git revision whose kernels to copy beside the script (here, not on the GPU)")
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=out)
    for flag in flags:
        p.add_argument(flag, action="store_true")
    args = p.parse_args()
    if args.old_from:
        write_old_modules(args.old_from, names, here)
        return args, None
    return args, [load_old_module(n, here) for n in names]


def core_inputs(t, hq, hkv, dk, dv, cfg, dev, dt=torch.bfloat16):
    """Random inputs of the NSA core at batch 1: ``(q, [k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa], gate, phi_k,
    phi_v)``, tensors requiring grad (also used by the scripts in benchmarks/)."""
    from nsa_parallel.kernels import Compression
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt).requires_grad_(True)  # noqa: E731
    q = mk(1, t, hq, dk)
    kvs = [mk(1, t, hkv, d) for d in (dk, dv, dk, dv, dk, dv)]
    gate = torch.rand(1, t, hq, 3, device=dev, dtype=dt).requires_grad_(True)
    ck = Compression(hkv, dk, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dt)
    cv = Compression(hkv, dv, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dt)
    return q, kvs, gate, ck, cv


def _bench_nsa(row, t, hq, hkv, dk, dv, cfg, dev):
    from nsa_parallel.kernels import nsa_attention
    from nsa_parallel.kernels.compress import compressed_attention, selection_scores
    from nsa_parallel.kernels.flash import position_masked_attention
    from nsa_parallel.kernels.select import selected_attention
    from nsa_parallel.kernels.topn import select_topn

    q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, dk, dv, cfg, dev)
    scale = 1 / math.sqrt(dk)
    core = lambda: nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                 backend="triton")
    rnd = torch.randn_like
    row["nsa_fwd_ms"], row["nsa_fwdbwd_ms"] = bench(core, rnd, [q, *kvs, gate, *ck.parameters(), *cv.parameters()])
    row["nsa_peak_gib"] = peak_mem(core)
    fl = nsa_flops(t, hq, dk, dv, cfg)
    row["nsa_fwd_tflops"] = fl / row["nsa_fwd_ms"] / 1e9
    row["nsa_fwdbwd_tflops"] = 3.5 * fl / row["nsa_fwdbwd_ms"] / 1e9  # bwd = 2.5x fwd FLOPs (recompute incl.)
    with torch.no_grad():
        kc, vc = ck(kvs[0]), cv(kvs[1])
    kc.requires_grad_(True)
    vc.requires_grad_(True)
    row["phi_fwd_ms"], _ = bench(lambda: (ck(kvs[0]), cv(kvs[1])))
    row["cmp_fwd_ms"], row["cmp_fwdbwd_ms"] = bench(lambda: compressed_attention(q, kc, vc, cfg, scale)[0], rnd,
                                                    [q, kc, vc])
    qd, kcd = q.detach(), kc.detach()
    _, lse = compressed_attention(qd, kcd, vc.detach(), cfg, scale)
    row["scores_ms"], _ = bench(lambda: selection_scores(qd, kcd, lse, cfg, scale))
    scores = selection_scores(qd, kcd, lse, cfg, scale)
    row["topn_ms"], _ = bench(lambda: select_topn(scores, cfg))
    idx = select_topn(scores, cfg)
    scores = None  # 1 GiB at 64k: free it before the selected branch is timed
    row["slc_fwd_ms"], row["slc_fwdbwd_ms"] = bench(
        lambda: selected_attention(q, kvs[2], kvs[3], idx, cfg.select_block, scale)[0], rnd, [q, *kvs[2:4]])
    row["swa_fwd_ms"], row["swa_fwdbwd_ms"] = bench(
        lambda: position_masked_attention(q, kvs[4], kvs[5], scale, 1, 0, cfg.window)[0], rnd, [q, *kvs[4:6]])


def _bench_dense(row, t, hq, d, dev):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mk = lambda: torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16).requires_grad_(True)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            row[f"sdpa_{name}_fwd_ms"], row[f"sdpa_{name}_fwdbwd_ms"] = bench(sdpa, torch.randn_like, [q, k, v])
            row[f"sdpa_{name}_fwd_tflops"] = dense_flops(t, hq, d, d) / row[f"sdpa_{name}_fwd_ms"] / 1e9
        except Exception as e:  # a backend that does not run here is reported, not fatal
            row[f"sdpa_{name}_error"] = f"{type(e).__name__}: {e}"[:200]


_FLEX = {}


def _bench_flex(row, t, hq, hkv, d, window, dev):
    """FlexAttention (torch.compile'd) with a causal sliding-window mask: the peer of our window branch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window), None, None, t, t, device=dev)
    dt = torch.bfloat16
    q = torch.randn(1, hq, t, d, device=dev, dtype=dt).requires_grad_(True)
    k, v = (torch.randn(1, hkv, t, d, device=dev, dtype=dt).requires_grad_(True) for _ in "kv")
    fn = lambda: _FLEX["fn"](q, k, v, block_mask=mask, enable_gqa=True)  # noqa: E731
    row["flex_swa_fwd_ms"], row["flex_swa_fwdbwd_ms"] = bench(fn, torch.randn_like, [q, k, v])


def _bench_fla(row, t, hq, hkv, d, dev):
    """fla-core's parallel_nsa on its own supported config (mean-pool compression, no window)."""
    from fla.ops.nsa import parallel_nsa
    dt = torch.bfloat16
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt).requires_grad_(True)  # noqa: E731
    q, k, v = mk(1, t, hq, d), mk(1, t, hkv, d), mk(1, t, hkv, d)
    g_cmp, g_slc = (torch.rand(1, t, hq, device=dev, dtype=dt).requires_grad_(True) for _ in "ab")
    fla = lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=16, block_size=64,  # noqa: E731
                               window_size=0, scale=1 / math.sqrt(d))
    row["fla_fwd_ms"], row["fla_fwdbwd_ms"] = bench(fla, torch.randn_like, [q, k, v, g_cmp, g_slc])


def run(args) -> dict:
    from nsa_parallel.kernels import NSAConfig
    dev = torch.device("cuda")
    cfg = NSAConfig()
    ceiling = matmul_ceiling()
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul {ceiling:.0f} TFLOP/s", flush=True)
    for dk, dv in args.head_dims:
        for t in args.seqlens:
            row = dict(T=t, hq=args.heads, hkv=args.kv_heads, dk=dk, dv=dv)
            stages = [("nsa", lambda: _bench_nsa(row, t, args.heads, args.kv_heads, dk, dv, cfg, dev))]
            if dk == dv and t <= args.dense_max_t:
                stages.append(("sdpa", lambda: _bench_dense(row, t, args.heads, dk, dev)))
            if dk == dv and args.flex:
                stages.append(("flex", lambda: _bench_flex(row, t, args.heads, args.kv_heads, dk, cfg.window, dev)))
            if dk == dv and args.fla:
                stages.append(("fla", lambda: _bench_fla(row, t, args.heads, args.kv_heads, dk, dev)))
            for name, stage in stages:
                try:
                    stage()
                except Exception as e:  # OOM or a peer that does not run: recorded in the row
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                command="python -m nsa_parallel.bench " + " ".join(sys.argv[1:]), torch=torch.__version__,
                python=platform.python_version(), matmul_tflops=ceiling, config=cfg.__dict__,
                grads_accumulated=ACCUMULATE_GRADS, min_timed_runs=MIN_TIMED_RUNS, rows=rows)


def table(res: dict) -> str:
    cols = [("T", "T"), ("dk/dv", None), ("NSA fwd", "nsa_fwd_ms"), ("NSA fwd+bwd", "nsa_fwdbwd_ms"),
            ("TFLOP/s fwd", "nsa_fwd_tflops"), ("peak GiB", "nsa_peak_gib"), ("phi", "phi_fwd_ms"),
            ("cmp f / fb", ("cmp_fwd_ms", "cmp_fwdbwd_ms")), ("scores", "scores_ms"), ("top-n", "topn_ms"),
            ("slc f / fb", ("slc_fwd_ms", "slc_fwdbwd_ms")), ("swa f / fb", ("swa_fwd_ms", "swa_fwdbwd_ms")),
            ("Flex swa f / fb", ("flex_swa_fwd_ms", "flex_swa_fwdbwd_ms")),
            ("cuDNN f / fb", ("sdpa_cudnn_fwd_ms", "sdpa_cudnn_fwdbwd_ms")),
            ("flash f / fb", ("sdpa_flash_fwd_ms", "sdpa_flash_fwdbwd_ms")),
            ("fla f / fb", ("fla_fwd_ms", "fla_fwdbwd_ms"))]

    def fmt(v):
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        cells = []
        for _, key in cols:
            if key is None:
                cells.append(f"{r['dk']}/{r['dv']}")
            elif isinstance(key, tuple):
                cells.append(" / ".join(fmt(r.get(k)) for k in key))
            else:
                cells.append(fmt(r.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- T={r['T']} {k}: {v}" for r in res["rows"] for k, v in r.items() if k.endswith("error")]
    return "\n".join(lines + errors)


_SHAPE = ("T", "hq", "hkv", "dk", "dv")


def compare(res: dict, baselines: list) -> tuple:
    """This run's NSA rows against earlier bench JSON files (``baselines``: ``(name, result dict)``): for each row,
    the last baseline row of the same shape (T, heads, KV heads, dk, dv). Returns ``(markdown table, worst ratio
    new / old over the compared times, or None when no row matched)``."""
    lines = ["| T | hq/hkv | dk/dv | fwd ms (was) | ratio | fwd+bwd ms (was) | ratio | baseline |",
             "|---|---|---|---|---|---|---|---|"]
    worst = None
    for r in res["rows"]:
        key = tuple(r.get(k) for k in _SHAPE)
        match = [(name, b) for name, base in baselines for b in base.get("rows", ())
                 if tuple(b.get(k) for k in _SHAPE) == key]
        shape = f"| {r['T']} | {r['hq']}/{r['hkv']} | {r['dk']}/{r['dv']} | "
        if not match:
            lines.append(shape + "no baseline row | | | | |")
            continue
        name, b = match[-1]
        cells = []
        for k in ("nsa_fwd_ms", "nsa_fwdbwd_ms"):
            new, old = r.get(k), b.get(k)
            if new is None or old is None:
                cells += ["-", "-"]
                continue
            ratio = new / old
            worst = ratio if worst is None else max(worst, ratio)
            cells += [f"{new:.3g} ({old:.3g})", f"{ratio:.3f}"]
        lines.append(shape + " | ".join(cells) + f" | {name} |")
    return "\n".join(lines), worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nsa_parallel.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dims", type=head_dims, nargs="+",
                   default=[(128, 128)], help="dk/dv pairs, e.g. 128/128 192/128")
    p.add_argument("--dense-max-t", type=int, default=65536, help="longest T to time dense SDPA at")
    p.add_argument("--no-fla", dest="fla", action="store_false", help="skip fla-core's parallel_nsa")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention's sliding window")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--accumulate-grads", action="store_true",
                   help="let each timed forward+backward add into the inputs' .grad (the timing before 2026-11-23)")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                   help="earlier bench JSON files: print each row's NSA times against the same shape's there")
    p.add_argument("--max-slowdown", type=float, default=None, metavar="FRACTION",
                   help="with --compare: exit 1 when a compared time is slower than its baseline by more than this "
                        "(e.g. 0.03)")
    args = p.parse_args(argv)
    if args.max_slowdown is not None and (not args.compare or args.max_slowdown < 0):
        p.error(f"--max-slowdown {args.max_slowdown}: needs --compare and a fraction >= 0")
    baselines = []
    for path in args.compare:  # read before the run: a wrong path fails in seconds, not after the timing
        try:
            with open(path) as f:
                baselines.append((os.path.basename(path), json.load(f)))
        except (OSError, ValueError) as e:
            p.error(f"--compare {path}: {e}")
    global ACCUMULATE_GRADS
    ACCUMULATE_GRADS = args.accumulate_grads
    if not torch.cuda.is_available():
        raise SystemExit("python -m nsa_parallel.bench needs a CUDA GPU")
    res = run(args)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    if baselines:
        text, worst = compare(res, baselines)
        print(text)
        if args.max_slowdown is not None and worst is not None and worst > 1 + args.max_slowdown:
            raise SystemExit(f"slower than the baseline: worst ratio {worst:.3f} > 1 + --max-slowdown "
                             f"{args.max_slowdown}")


if __name__ == "__main__":
    main()
