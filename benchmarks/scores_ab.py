"""Selection scores + top-n, A/B on one GPU: a previous commit's ``compress.py`` / ``topn.py`` against the tree's.

    python -P benchmarks/scores_ab.py --old-from REV --t 65536 --rounds 3 --out scores_ab.json   # here: make the copies
    python -P benchmarks/scores_ab.py --t 65536 --rounds 3 --out scores_ab.json                # on the GPU

``--old-from REV`` writes ``benchmarks/_old_compress.py`` / ``_old_topn.py`` from ``git show REV:kernels/...``
(relative imports rebased onto ``nsa_parallel.kernels``), which the run without it imports as the old pair. The
run checks that both give the same block indices at ``--t`` (bf16, the bench's inputs), then times, alternating old
and new in each round: ``select_blocks`` (scores then top-n, in query chunks at 64k), the scores kernel alone and
top-n alone (on the first chunk's rows), then ``--sweep`` launch configs of the new scores kernel (rows, warps,
stages) and scores budgets. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = [(128, 4, 2, 64), (128, 4, 1, 64), (64, 4, 2, 64), (64, 2, 2, 64), (128, 8, 2, 64), (256, 4, 2, 64),
         (128, 4, 2, 128), (128, 8, 2, 128), (128, 4, 3, 32)]  # rows, warps, stages, tokens


def main() -> None:
    from nsa_parallel.bench import emit, old_vs_new, timed
    args, old = old_vs_new(__doc__, ("compress", "topn"), "scores_ab.json", HERE, ("--sweep",))
    if old is None:
        return
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.kernels import compress as C
    from nsa_parallel.kernels import topn as N
    from nsa_parallel.kernels.compress import compressed_attention
    old_c, old_n = old
    cfg, t, rows = NSAConfig(), args.t, []
    torch.manual_seed(0)
    q = torch.randn(1, t, 64, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, cfg.num_compressed(t), 4, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    scale = 1 / math.sqrt(128)
    _, lse = compressed_attention(q, kc, vc, cfg, scale)
    want = old_n.select_blocks(q, kc, lse, cfg, scale)
    got = N.select_blocks(q, kc, lse, cfg, scale)
    emit(rows, args.out, check="block indices, old vs new", equal=bool(torch.equal(got, want)),
         differing_rows=int((got != want).any(-1).sum()))
    # the first chunk's rows, as select_blocks scores them (old budget: 4 bytes a score)
    m = min(t, max(64, old_n.SCORES_BUFFER_BYTES // (4 * 4 * cfg.num_select_blocks(t)) // 64 * 64))
    qm, lm = q[:, :m], lse[:, :m].contiguous()
    old_scores, new_pairs = old_c.selection_scores(qm, kc, lm, cfg, scale), C.score_pairs(qm, kc, lm, cfg, scale)
    # blocks after a query's own are undefined in both
    own = torch.arange(m, device="cuda") // cfg.select_block
    valid = (torch.arange(old_scores.shape[-1], device="cuda")[None, :] <= own[:, None])[None, :, None, :]
    emit(rows, args.out, check="scores of the first chunk (blocks up to each query's own), old vs combined pairs",
         equal=bool(torch.equal(old_scores[valid.expand_as(old_scores)],
                                C.combine_pairs(new_pairs)[valid.expand_as(old_scores)])), rows_=m)
    for rnd in range(args.rounds):
        emit(rows, args.out, round=rnd, old_select_blocks_ms=timed(lambda: old_n.select_blocks(q, kc, lse, cfg, scale)),
             new_select_blocks_ms=timed(lambda: N.select_blocks(q, kc, lse, cfg, scale)),
             old_scores_ms=timed(lambda: old_c.selection_scores(qm, kc, lm, cfg, scale)),
             new_scores_ms=timed(lambda: C.score_pairs(qm, kc, lm, cfg, scale)),
             old_topn_ms=timed(lambda: old_n.select_topn(old_scores, cfg)),
             new_topn_ms=timed(lambda: N.select_topn(new_pairs, cfg)), chunk_rows=m)
    if args.sweep:
        base = (C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES, C.SCORES_TOKENS)
        for rows_, warps, stages, tokens in SWEEP:
            C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES, C.SCORES_TOKENS = rows_, warps, stages, tokens
            try:
                ok = torch.equal(N.select_topn(C.score_pairs(qm, kc, lm, cfg, scale), cfg),
                                 N.select_topn(new_pairs, cfg))
                emit(rows, args.out, sweep=[rows_, warps, stages, tokens], equal=bool(ok),
                     scores_ms=timed(lambda: C.score_pairs(qm, kc, lm, cfg, scale)))
            except Exception as e:  # out of shared memory / registers
                emit(rows, args.out, sweep=[rows_, warps, stages, tokens], error=f"{type(e).__name__}: {e}"[:300])
        C.SCORES_BLOCK_M, C.SCORES_WARPS, C.SCORES_STAGES, C.SCORES_TOKENS = base
        budget = N.SCORES_BUFFER_BYTES
        for b in (budget, 2 * budget):
            N.SCORES_BUFFER_BYTES = b
            emit(rows, args.out, budget_mib=b >> 20, select_blocks_ms=timed(lambda: N.select_blocks(q, kc, lse, cfg,
                                                                                                   scale)))
        N.SCORES_BUFFER_BYTES = budget


if __name__ == "__main__":
    main()
