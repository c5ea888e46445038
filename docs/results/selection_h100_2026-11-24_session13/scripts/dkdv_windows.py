"""Selected dK/dV at 64k with its work items ordered by query windows of W positions (select.SEL_BWD_WINDOW; 0 =
whole lists, the order before): the inverted index + work items + dK/dV kernel timed together, dK/dV compared
with W = 0, on the blocks the core selects for random inputs (G=16, d=128).

    python3 -P dkdv_windows.py --out DIR

Needs the kernels of record commit cc48a45 (the window argument of invert_block_indices and the kernel's NWIN),
reverted in d386cdf.
"""
import argparse, json, math, os  # noqa: E401
import torch, triton  # noqa: E401
from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import select as S

p = argparse.ArgumentParser()
p.add_argument("--t", type=int, default=65536)
p.add_argument("--out", default=".")
a = p.parse_args()
cfg, t, d = NSAConfig(), a.t, 128
torch.manual_seed(0)
q, kvs, gate, ck, cv = core_inputs(t, 64, 4, d, d, cfg, "cuda")
with torch.no_grad():
    _, idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton",
                           return_block_indices=True)
    q, k, v = q.detach(), kvs[2].detach(), kvs[3].detach()
    scale = 1 / math.sqrt(d)
    L = S._SelLaunch(q, k, v, idx, cfg.select_block, None)
    o, lse = S.selected_forward(q, k, v, idx, L, scale)
    do = torch.randn_like(o)
    delta = S.row_dot(o, do)
rows, ref = [], None


def dkdv(window):
    nwin = triton.cdiv(L.max_t, window) if window else 1
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    qlist, offsets = S.invert_block_indices(idx, L.ns_max, None, L.lo, L.hi, window, nwin)
    items = S.work_items(offsets, idx.numel(), S.SEL_BWD_CHUNK_LONG)
    S._sel_bwd_dkdv_kernel[(items[0].numel(),)](q, k, v, do, lse, delta, dk, dv, qlist, *items, L.cu, *L.sizes,
                                                L.ns_max, nwin, scale, **L.kmajor, num_stages=L.stages)
    return dk, dv


for rnd in range(2):
    for window in (0, 512, 1024, 2048, 4096, 8192):
        dk, dv = dkdv(window)
        if ref is None:
            ref = (dk, dv)
        err = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip((dk, dv), ref))
        ms = triton.testing.do_bench(lambda: dkdv(window), warmup=5, rep=50, return_mode="median")
        rows.append(dict(round=rnd, window=window, ms=ms, rel_err_vs_0=err))
        print(json.dumps(rows[-1]), flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
          open(os.path.join(a.out, "dkdv_windows.json"), "w"), indent=1)
