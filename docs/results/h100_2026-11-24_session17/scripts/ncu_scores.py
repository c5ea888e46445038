"""The selection-scores kernels once each (the shipped Triton one, then benchmarks/gluon_scores.py's variants) for
Nsight Compute (session 17, run 4):

    ncu -k regex:scores --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
        python3 -P ncu_scores.py --t 32768
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import gluon_scores as G  # noqa: E402
from nsa_parallel.bench import compressed_case  # noqa: E402
from nsa_parallel.kernels import NSAConfig  # noqa: E402
from nsa_parallel.kernels import compress as C  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--t", type=int, default=32768)
a = p.parse_args()
cfg, t = NSAConfig(), a.t
q, kc, vc, scale = compressed_case(t, cfg)
_, lse = C.compressed_attention(q, kc, vc, cfg, scale)
C.selection_scores(q, kc, lse, cfg, scale)
for var in G.VARIANTS:
    G.launch(q, kc, lse, scale, cfg, **var)
torch.cuda.synchronize()
print("variants in order: triton,", G.VARIANTS)
