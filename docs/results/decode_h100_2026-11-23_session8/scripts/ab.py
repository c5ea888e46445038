"""One-off A/B (run9): the decode step with the per-tile score sums stored at half the size against as shipped,
interleaved, beside dense SDPA.

How it ran (device, repo root, commit d5b2ebe with combined_tile_sums.patch.py applied to kernels/decode_triton.py
and its docstring re-wrapped; from a scratch copy diag_tmp/): `git show d5b2ebe:kernels/decode_triton.py | sed
's/from .compress import/from nsa_parallel.kernels.compress import/' > old_dt.py` beside this file, then
`source benchmarks/gpu_env.sh; python3 -P ab.py`. "new" is the patched package, "old" the shipped kernels."""
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

import nsa_parallel.kernels.decode_triton as new
from nsa_parallel.bench_decode import _capture, _replay_ms, make_case, nsa_bytes, read_bandwidth_gbs
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels.decode import nsa_decode

spec = importlib.util.spec_from_file_location("old_dt", os.path.join(os.path.dirname(__file__), "old_dt.py"))
old = importlib.util.module_from_spec(spec)
sys.modules["old_dt"] = old
spec.loader.exec_module(old)
cfg = NSAConfig()
bw = read_bandwidth_gbs()
res = dict(read_gbs=bw, device=torch.cuda.get_device_name())
for t, b in ((65536, 8), (131072, 8)):
    cache, q, gate = make_case(t, b, 64, 4, 128, cfg)
    scale = 128 ** -0.5
    o_n, i_n = new.decode_triton(q, gate, cache, scale)
    o_o, i_o = old.decode_triton(q, gate, cache, scale)
    o_r, i_r = nsa_decode(q, gate, cache, backend="reference", return_indices=True)
    row = dict(new_vs_ref=((o_n.float() - o_r.float()).abs().max() / o_r.float().abs().max()).item(),
               new_same_blocks=(i_n == i_r).float().mean().item(), old_same_blocks=(i_o == i_r).float().mean().item())
    graphs = {"new": _capture(lambda: new.decode_triton(q, gate, cache, scale), 20),
              "old": _capture(lambda: old.decode_triton(q, gate, cache, scale), 20)}
    runs = {k: [] for k in graphs}
    for _ in range(9):
        for k, g in graphs.items():
            runs[k].append(_replay_ms(g, 30, 20) * 1e3)
    for k, us in runs.items():
        row[f"{k}_us"] = sorted(us)[4]
    del graphs
    nbytes = b * nsa_bytes(t, 4, 128, cfg)
    cache = None
    torch.cuda.empty_cache()
    kk = torch.randn(b, 4, t, 128, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    qd = q.view(b, 64, 1, 128)
    gd = _capture(lambda: F.scaled_dot_product_attention(qd, kk, vv, enable_gqa=True), 20)  # noqa: F821
    row["dense_us"] = sorted(_replay_ms(gd, 30, 20) * 1e3 for _ in range(5))[2]
    for k in ("new", "old"):
        row[f"{k}_speedup"] = row["dense_us"] / row[f"{k}_us"]
        row[f"{k}_bw_frac"] = nbytes / (row[f"{k}_us"] * 1e3) / bw
    res[f"{t}x{b}"] = row
    print(t, b, json.dumps(row), flush=True)
    del kk, vv, gd
    torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/ab.json", "w"), indent=1)
