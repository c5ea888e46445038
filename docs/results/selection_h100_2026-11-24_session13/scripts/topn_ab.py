"""Top-n alone at 64k on the core's real selection scores (last 16k queries, as select_blocks chunks them... here
the whole 32k-row chunk the core scores second): time of the tree on PYTHONPATH, and its blocks saved / compared.

    python3 -P topn_ab.py --save DIR/idx.pt     (one tree)
    python3 -P topn_ab.py --compare DIR/idx.pt  (the other)
"""
import argparse
import json
import math
import torch
import triton
from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import topn as TN
from nsa_parallel.kernels.compress import compressed_attention, selection_scores

p = argparse.ArgumentParser()
p.add_argument("--save")
p.add_argument("--compare")
a = p.parse_args()
cfg, t = NSAConfig(), 65536
torch.manual_seed(0)
q, kvs, gate, ck, cv = core_inputs(t, 64, 4, 128, 128, cfg, "cuda")
scale = 1 / math.sqrt(128)
with torch.no_grad():
    kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
    _, lse = compressed_attention(q.detach(), kc, vc, cfg, scale)
    s0 = t // 2
    sc = selection_scores(q.detach()[:, s0:], kc, lse[:, s0:].contiguous(), cfg, scale, q_offset=s0)
    idx = TN.select_topn(sc, cfg, q_offset=s0)
    ms = triton.testing.do_bench(lambda: TN.select_topn(sc, cfg, q_offset=s0), warmup=10, rep=100,
                                 return_mode="median")
res = dict(file=TN.__file__, rows=sc.shape[1] * sc.shape[2], ms=ms)
if a.save:
    torch.save(idx.cpu(), a.save)
if a.compare:
    res["equal_to_saved"] = torch.equal(idx.cpu(), torch.load(a.compare))
print(json.dumps(res))
