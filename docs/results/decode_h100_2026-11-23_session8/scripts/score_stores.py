"""One-off diagnostic (run8): what the compressed pass's per-tile score stores cost at 64k x 8 and 128k x 8.

Run on the device from the repo root at commit d5b2ebe (`source benchmarks/gpu_env.sh; python3 -P
docs/results/decode_h100_2026-11-23_session8/scripts/score_stores.py`; it ran from a scratch copy, diag_tmp/).
Builds variants of kernels/decode_triton.py by cutting lines from its source: as shipped, without the per-tile
score stores (wrong scores: timing only), without the tile-max store; graphs of 20 steps, 7 interleaved rounds."""
import importlib.util
import json
import os
import sys

import torch

import nsa_parallel.kernels.decode_triton as dt
from nsa_parallel.bench_decode import _capture, _replay_ms, make_case
from nsa_parallel.kernels import NSAConfig

src = open(dt.__file__).read().replace("from .compress import", "from nsa_parallel.kernels.compress import")
i0 = src.index("        # the selection scores need these probabilities")
i1 = src.index("    row = (bh * SPLITS + split) * G + g\n")
variants = {"as shipped": src, "no per-tile score stores": src[:i0] + src[i1:]}
i2 = src.index("        tl.store(mt_ptr + rows * NT + tile, m_new, mask=g < G)\n")
variants["no mt store"] = src[:i2] + src[i2 + len("        tl.store(mt_ptr + rows * NT + tile, m_new, mask=g < G)\n"):]
mods = {}
os.makedirs("/tmp/diag", exist_ok=True)
for k, (name, text) in enumerate(variants.items()):
    path = f"/tmp/diag/dt_{k}.py"
    open(path, "w").write(text)
    spec = importlib.util.spec_from_file_location(f"dt_{k}", path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[f"dt_{k}"] = m
    spec.loader.exec_module(m)
    mods[name] = m
cfg = NSAConfig()
res = {}
for t, b in ((65536, 8), (131072, 8)):
    cache, q, gate = make_case(t, b, 64, 4, 128, cfg)
    scale = 128 ** -0.5
    graphs = {}
    for name, m in mods.items():
        graphs[(name, "compressed+scores")] = _capture(lambda m=m: m.compressed_step(q, cache, scale), 20)
        graphs[(name, "whole step")] = _capture(lambda m=m: m.decode_triton(q, gate, cache, scale), 20)
    runs = {k: [] for k in graphs}
    for _ in range(7):
        for k, g in graphs.items():
            runs[k].append(_replay_ms(g, 20, 20) * 1e3)
    for (name, what), us in runs.items():
        med = sorted(us)[3]
        res[f"{t}x{b} {name} {what}"] = med
        print(f"{t}x{b} {name:28s} {what:18s} {med:.1f} us", flush=True)
    del graphs, cache
    torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/score_stores.json", "w"), indent=1)
