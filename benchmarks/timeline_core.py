"""Where the NSA core's forward+backward spends the time its kernels do not: GPU idle gaps, clocks, CUDA graphs.

    python -P benchmarks/timeline_core.py --t 65536 --out timeline_core.json

The bench's medians sit a few ms above the sum of the kernels' times (docs/benchmarks.md, sixteenth session). This
script looks for where: (1) one torch.profiler trace of ``--iters`` forward+backward steps; per step the span from
the first kernel's start to the last one's end, the kernels' summed time, and the largest idle gaps between
consecutive kernels with their neighbours' names; (2) the bench's timing (``nsa_parallel.bench.timed``) of the
same step, eager and replayed from a CUDA graph, while ``nvidia-smi`` samples the SM clock, power and throttle
reasons. JSON lines to ``--out`` (``nsa_parallel.bench.emit``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import torch
from nsa_parallel.bench import core_case, emit, timed
from nsa_parallel.bench_decode import capture_graph
from nsa_parallel.kernels import NSAConfig


def trace_steps(step, iters: int, gaps: int) -> list:
    """Per step: span, kernel sum, idle time and the ``gaps`` largest idle gaps (us) of a profiled run."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            with record_function(f"step{i}"):
                step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    # a step's kernels: those launched (correlation) from inside its CPU range
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step")),
                   key=lambda e: e["ts"])
    # torch's kernels are launched through the runtime API, Triton's through the driver's (cuLaunchKernel)
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    out = []
    for s in steps:
        lo, hi = s["ts"], s["ts"] + s["dur"]
        ks = [k for k in kernels if lo <= launches.get(k["args"].get("correlation"), -1) <= hi]
        if not ks:
            continue
        busy = sum(k["dur"] for k in ks)
        span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
        holes = []
        for a, b in zip(ks, ks[1:]):
            idle = b["ts"] - (a["ts"] + a["dur"])
            if idle > 0:
                holes.append((idle, a["name"][:60], b["name"][:60]))
        holes.sort(reverse=True)
        out.append(dict(step=s["name"], span_us=span, kernels_us=busy, idle_us=span - busy, n_kernels=len(ks),
                        cpu_us=s["dur"], top_gaps=holes[:gaps]))
    return out


def clocks_during(fn) -> tuple:
    """``(fn(), samples)``: nvidia-smi's SM clock (MHz), power (W) and active throttle reasons every 50 ms."""
    q = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    p = subprocess.Popen(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-lms", "50"],
                         stdout=subprocess.PIPE, text=True)
    try:
        r = fn()
    finally:
        p.terminate()
    samples = [line.split(", ") for line in p.communicate()[0].splitlines() if line.strip()]
    return r, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--gaps", type=int, default=8)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--out", default="timeline_core.json")
    args = p.parse_args()
    rows = []
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig())

    def step():
        core().backward(do)

    def fwd():
        with torch.no_grad():
            core()

    for row in trace_steps(step, args.iters, args.gaps):
        emit(rows, args.out, what="trace_fwdbwd", t=args.t, **row)
    for row in trace_steps(fwd, args.iters, args.gaps):
        emit(rows, args.out, what="trace_fwd", t=args.t, **row)
    reset = [x for x in leaves if x.requires_grad]
    for name, fn in (("fwd", fwd), ("fwdbwd", step)):
        ms, smp = clocks_during(lambda fn=fn: timed(fn, grad_to_none=reset if fn is step else None))
        emit(rows, args.out, what="timed", phase=name, graph=False, t=args.t, ms=ms, clocks=smp)
    if not args.no_graph:
        try:
            replay = capture_graph(step, leaves=leaves).replay
            ms, smp = clocks_during(lambda: timed(replay))
            emit(rows, args.out, what="timed", phase="fwdbwd", graph=True, t=args.t, ms=ms, clocks=smp)
        except Exception as e:  # a capture failure is a finding too (a host sync inside the step)
            emit(rows, args.out, what="graph_failed", t=args.t, error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
    main()
