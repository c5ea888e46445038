"""``python -m nsa_parallel.bench`` with module constants set from the command line (this session's A/B driver):
``bench_with.py kernels.parallel.OVERLAP_SELECTED_DKDV=False ... -- <bench args>`` (names under nsa_parallel)."""
import ast
import importlib
import sys

from nsa_parallel.bench import main

cut = sys.argv.index("--")
for assignment in sys.argv[1:cut]:
    name, value = assignment.split("=", 1)
    module, attr = name.rsplit(".", 1)
    setattr(importlib.import_module(f"nsa_parallel.{module}"), attr, ast.literal_eval(value))
    print(f"{name} = {value}", flush=True)
main(sys.argv[cut + 1:])
