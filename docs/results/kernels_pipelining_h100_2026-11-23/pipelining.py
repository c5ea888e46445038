"""Which compiled Triton kernels got their loads software-pipelined: after a run has filled Triton's cache, count per
kernel the async copies (cp.async / TMA) and wgmma ops in each cached TTGIR. A loop whose loads sit behind a runtime
branch is not pipelined (found for the decode kernels in the ninth session); this lists where else that may be so.

    python3 -P -m nsa_parallel.bench --seqlens 8192 --no-fla --no-flex --out /tmp/b.json
    python3 -P docs/results/kernels_pipelining_h100_2026-11-23/pipelining.py OUT.json
"""
import glob
import json
import os
import re
import sys

cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
rows = []
for path in sorted(glob.glob(os.path.join(cache, "*", "*.ttgir"))):
    text = open(path).read()
    meta = path[:-len(".ttgir")] + ".json"
    info = json.load(open(meta)) if os.path.exists(meta) else {}
    name = info.get("name") or re.search(r"tt.func public @(\w+)", text).group(1)
    rows.append(dict(kernel=name, loops=text.count("scf.for"), async_copy=text.count("async_copy_global_to_local"),
                     tma=text.count("async_tma_copy"), wgmma=text.count("warp_group_dot"), mma=text.count("tt.dot "),
                     num_stages=info.get("num_stages"), num_warps=info.get("num_warps"), shared=info.get("shared")))
for r in rows:
    print(json.dumps(r))
json.dump(rows, open(sys.argv[1], "w"), indent=1)
