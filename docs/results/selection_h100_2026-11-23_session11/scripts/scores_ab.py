"""Same-run A/B of the selection-scores kernel: 84d75fb's (scores_old.py) against the shipped one, then launch
variants of the shipped one; each checked against the old kernel's scores and top-n blocks.

    python3 -P docs/results/selection_h100_2026-11-23_session11/scripts/scores_ab.py --t 65536 --out DIR [--more]
"""
import argparse
import json
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scores_old import selection_scores_old  # noqa: E402

from nsa_parallel.bench import core_inputs  # noqa: E402
from nsa_parallel.kernels import NSAConfig  # noqa: E402
from nsa_parallel.kernels import compress as C  # noqa: E402
from nsa_parallel.kernels.compress import compressed_attention  # noqa: E402
from nsa_parallel.kernels.topn import select_topn  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--out", default=".")
    p.add_argument("--more", action="store_true", help="the second set of launches (run 9), no old-kernel rounds")
    args = p.parse_args()
    rows = []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "scores_ab.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)

    cfg, hq, hkv, d, t = NSAConfig(), 64, 4, 128, args.t
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(t, hq, hkv, d, d, cfg, "cuda")
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        q = q.detach()
        kc, vc = ck(kvs[0]).contiguous(), cv(kvs[1]).contiguous()
        _, lse = compressed_attention(q, kc, vc, cfg, scale)
        own = torch.arange(cfg.num_select_blocks(t), device=q.device)[None, :] <= \
            torch.arange(t, device=q.device)[:, None] // cfg.select_block
        m = own[:, None, :].expand(t, hkv, own.shape[1])
        want = selection_scores_old(q, kc, lse, cfg, scale)
        want_idx = select_topn(want, cfg)

        def check(got):
            err = ((got[0] - want[0])[m].abs().max() / want[0][m].abs().max()).item()
            same = (select_topn(got, cfg) == want_idx).float().mean().item()
            return err, same

        err, same = check(C.selection_scores(q, kc, lse, cfg, scale))
        emit(what="check", rel_err_vs_old=err, topn_equal_fraction=same)
        for r in range(0 if args.more else 3):  # interleaved rounds
            emit(what="ab", round=r, old_ms=bench(lambda: selection_scores_old(q, kc, lse, cfg, scale)),
                 new_ms=bench(lambda: C.selection_scores(q, kc, lse, cfg, scale)))
        saved = C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES
        launches = ((saved, (128, 128, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 1), (256, 64, 8, 2),
                     (256, 128, 8, 2), (128, 128, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (256, 64, 4, 2))
                    if not args.more else
                    (saved, (128, 64, 4, 3), (128, 128, 4, 3), (256, 64, 4, 3), (256, 128, 4, 2), (64, 64, 4, 3),
                     (64, 128, 4, 2), (128, 64, 2, 2), (64, 64, 2, 2), saved))
        for launch in launches:
            C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES = launch
            try:
                err, same = check(C.selection_scores(q, kc, lse, cfg, scale))
                emit(what="launch", rows_tokens_warps_stages=launch,
                     ms=bench(lambda: C.selection_scores(q, kc, lse, cfg, scale)), rel_err_vs_old=err,
                     topn_equal_fraction=same)
            except Exception as e:  # a launch that does not compile or fit is a result too
                emit(what="launch", rows_tokens_warps_stages=launch, error=str(e)[:300])
        C.SCORES_BLOCK_M, C.SCORES_TOKENS, C.SCORES_WARPS, C.SCORES_STAGES = saved


if __name__ == "__main__":
    main()
