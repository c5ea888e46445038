"""Whether flash.TUNED_MIN_GP 16 vs 4 differ only by near-tied block choices (G = 4, 64k)."""
import json, sys
import torch
from nsa_parallel.bench import core_case
from nsa_parallel.kernels import NSAConfig, nsa_attention, flash
cfg = NSAConfig()
q, kvs, gate, ck, cv, leaves, core, do = core_case(65536, cfg, hq=32, hkv=8)
res = {}
with torch.no_grad():
    for v in (16, 4):
        flash.TUNED_MIN_GP = v
        o, idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton",
                               return_block_indices=True)
        res[v] = (o.float(), idx)
diff_rows = (res[16][1] != res[4][1]).any(-1)  # [b, t, hkv]
rows_t = diff_rows.any(-1)  # positions with any KV head's list changed
err = (res[16][0] - res[4][0]).abs()
scale = res[16][0].abs().max()
same = ~rows_t[..., None, None].expand_as(err)
out = dict(entries_differ=int((res[16][1] != res[4][1]).sum()), entries=res[16][1].numel(),
           positions_differ=int(rows_t.sum()), max_rel_all=(err.max() / scale).item(),
           max_rel_same_lists=(err[same].max() / scale).item())
print(json.dumps(out))
json.dump(out, open(sys.argv[1], "w"))
