"""``python -m nsa_parallel.bench`` with the selected branch's shared-position launch set from the command line
(a measurement driver for this session's A/B runs): ``bench_shared.py P SKIP -- <bench args>``."""
import runpy
import sys

import nsa_parallel.kernels.select as S

S.SEL_SHARED_POSITIONS, S.SEL_SHARED_SKIP = int(sys.argv[1]), sys.argv[2] == "1"
print(f"SEL_SHARED_POSITIONS={S.SEL_SHARED_POSITIONS} SEL_SHARED_SKIP={S.SEL_SHARED_SKIP}", flush=True)
sys.argv = ["nsa_parallel.bench"] + sys.argv[sys.argv.index("--") + 1:]
runpy.run_module("nsa_parallel.bench", run_name="__main__")
