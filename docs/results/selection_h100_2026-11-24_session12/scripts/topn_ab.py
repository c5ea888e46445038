"""top-n at 64k / 128k on one GPU from the benchmark's real selection scores: the n rounds over whole rows
(TOPN_COMPACT_MIN out of reach: the kernel before this session) against rounds over the compacted candidates, for
a few list sizes; blocks must be equal. Also how many candidates rows have (a record of run 3, not shipped)."""
import json
import math
import sys

import torch
import triton

from nsa_parallel.bench import core_inputs
from nsa_parallel.kernels import NSAConfig
from nsa_parallel.kernels import topn as TN
from nsa_parallel.kernels.compress import compressed_attention, selection_scores

rows, cfg = [], NSAConfig()
for t in (65536, 131072):
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(t, 64, 4, 128, 128, cfg, "cuda")
    with torch.no_grad():
        kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
        _, lse = compressed_attention(q, kc, vc, cfg, 1 / math.sqrt(128))
        part = slice(t - 16384, t)  # the last 16k queries: the longest rows
        sc = selection_scores(q[:, part].contiguous(), kc, lse[:, part].contiguous(), cfg, 1 / math.sqrt(128),
                              q_offset=t - 16384)
    del q, kvs, kc, vc, lse
    ns = sc.shape[-1]
    s = sc.float()
    cm = torch.nn.functional.pad(s, (0, triton.next_power_of_2(ns) - ns), value=float("-inf"))
    cm = cm.view(*s.shape[:-1], TN.TOPN_CHUNKS, -1).amax(-1)
    tau = cm.sort(-1, descending=True).values[..., cfg.select_topn - 1]
    count = (s >= tau[..., None]).sum(-1).float()
    stats = dict(t=t, what="candidates", mean=count.mean().item(), p99=count.quantile(0.99).item(),
                 max=count.max().item(), over_64=(count > 64).float().mean().item())
    rows.append(stats)
    print(json.dumps(stats), flush=True)
    want = None
    for name, mn, cap in (("whole rows", 1 << 30, 64), ("compact 64", 512, 64), ("compact 32", 512, 32),
                          ("compact 128", 512, 128)):
        TN.TOPN_COMPACT_MIN, TN.TOPN_CAP = mn, cap
        idx = TN.select_topn(sc, cfg, q_offset=t - 16384)
        want = idx if want is None else want
        ms = triton.testing.do_bench(lambda sc=sc: TN.select_topn(sc, cfg, q_offset=t - 16384), warmup=10, rep=100,
                                     return_mode="median")
        rows.append(dict(t=t, what=name, queries=16384, ms=ms, equal=torch.equal(idx, want)))
        print(json.dumps(rows[-1]), flush=True)
    TN.TOPN_COMPACT_MIN, TN.TOPN_CAP = 512, 64
    del sc, s
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(sys.argv[1], "w"),
          indent=1)
