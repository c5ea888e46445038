"""Where the GPU idles in one forward+backward of the NSA core (64k, as nsa_parallel.bench times it): kernel
intervals from torch.profiler (CPU + CUDA), their union against the wall time, and the largest idle gaps with the
kernels on either side.

    python3 -P gaps.py --t 65536 --out DIR
"""
import argparse
import json
import os
import torch
import triton
from torch.profiler import ProfilerActivity, profile
from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    cfg = NSAConfig()
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(a.t, 64, 4, 128, 128, cfg, "cuda")
    leaves = [x for x in (q, *kvs, gate, *ck.parameters(), *cv.parameters()) if x.requires_grad]

    def core():
        return nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton")
    grad = torch.randn_like(core())

    def step():
        for x in leaves:
            x.grad = None
        core().backward(grad)
    out = {}
    for name, fn in (("fwd", core), ("fwdbwd", step)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        iv = sorted((e.time_range.start, e.time_range.end, e.name) for e in ev)
        busy, gaps, end, last = 0.0, [], None, None
        for s, e, n in iv:
            if end is None:
                busy += e - s
                end, last, first = e, n, s
                continue
            if s > end:
                gaps.append((s - end, last, n))
                busy += e - s
            elif e > end:
                busy += e - end
            if e > end:
                end, last = e, n
        gaps.sort(reverse=True)
        out[name] = dict(do_bench_ms=ms, span_ms=(end - first) / 1e3, busy_ms=busy / 1e3,
                         idle_ms=sum(g[0] for g in gaps) / 1e3, kernels=len(iv),
                         top_gaps=[dict(us=round(g, 1), after=a_[:80], before=b[:80]) for g, a_, b in gaps[:25]])
        print(json.dumps({name: {k: v for k, v in out[name].items() if k != "top_gaps"}}), flush=True)
        prof.export_chrome_trace(os.path.join(a.out, f"gaps_{name}_trace.json"))
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, **out),
              open(os.path.join(a.out, "gaps.json"), "w"), indent=1)
    for name in out:
        for g in out[name]["top_gaps"][:12]:
            print(name, g)

if __name__ == "__main__":
    main()
