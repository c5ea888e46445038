"""Selected forward at 64k on one GPU with the benchmark's real block lists: one position per program (the shipped
loop kernel) against four positions sharing their forced blocks (select._sel_fwd_shared_kernel), over warps and
stages; outputs must agree (a record of run 4, not shipped)."""
import json
import math
import sys

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import select as S

cfg, t, hq, hkv, d = NSAConfig(), 65536, 64, 4, 128
torch.manual_seed(0)
q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, "cuda")
with torch.no_grad():
    _, idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton",
                           return_block_indices=True)
q, k, v = q.detach(), kvs[2].detach(), kvs[3].detach()
scale = 1 / math.sqrt(d)
L = S._SelLaunch(q, k, v, idx, cfg.select_block, None)
o_ref, lse_ref = S.selected_forward(q, k, v, idx, L, scale)
rows = [dict(what="loop", warps=L.warps_fwd, stages=L.stages,
             ms=triton.testing.do_bench(lambda: S.selected_forward(q, k, v, idx, L, scale), warmup=10, rep=100,
                                        return_mode="median"))]
print(json.dumps(rows[-1]), flush=True)
o, lse = torch.empty_like(o_ref), torch.empty_like(lse_ref)
const = dict(HQ=hq, HKV=hkv, G=16, GP=16, N=16, NP=16, DK=d, DV=d, BDK=d, BDV=d, BS=64, INITIAL=1, LOCAL=2)
for warps in (1, 2, 4, 8):
    for stages in (1, 2, 3):
        def run():
            S._sel_fwd_shared_kernel[(t // 4, hkv)](q, k, v, idx, o, lse, t, scale, **const, num_warps=warps,
                                                    num_stages=stages)
        try:
            run()
            err = ((o.float() - o_ref.float()).abs().max().item(), (lse - lse_ref).abs().max().item())
            ms = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
            rows.append(dict(what="shared", warps=warps, stages=stages, ms=ms, max_abs_err_o_lse=err))
        except Exception as e:  # a launch that does not compile or fit is a result too
            rows.append(dict(what="shared", warps=warps, stages=stages, error=str(e)[:300]))
        print(json.dumps(rows[-1]), flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(sys.argv[1], "w"),
          indent=1)
