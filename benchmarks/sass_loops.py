"""Instructions per loop iteration of a Triton kernel compiled for sm_90, without a GPU (ptxas / nvdisasm ship
with Triton): registers, spills, the kernel's instruction count, and for every loop (a backward branch in the SASS)
its instruction count and mix.

    python benchmarks/sass_loops.py nsa_parallel.kernels.compress _scores_kernel \\
        --sig '{"Q":"*bf16","KC":"*bf16","LSE":"*fp32","SC":"*fp32","CU":"*i32","CU_K":"*i32","T_FIXED":"i32",
                "TK_FIXED":"i32","NS":"i32","QOFF":"i32","scale":"fp32"}' \\
        --const '{"HQ":64,"HKV":4,"G":16,"GP":16,"DK":128,"BDK":128,"BLOCK_T":8,"BJ":16,"S":4,"A":2,"KSTRIDE":16,
                  "KOFF":31,"SEL_BLOCK":64,"VARLEN":false,"ONE_PASS":true}' \\
        --warps 4 --stages 2 --divisible Q,KC,LSE,SC,T_FIXED,TK_FIXED,NS

Arguments not in ``--sig`` or ``--const`` are compiled as None (optional pointers). ``--divisible`` marks
arguments 16-divisible, as Triton's launcher does for aligned pointers and sizes (without it loads come out scalar,
which misleads). The numbers quoted in docs/benchmarks.md (eighteenth session) come from this script.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import re

_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/")  # nvdisasm's address comment starts each instruction line


def loops(sass: str) -> list:
    """``[(label, instructions, Counter of opcodes)]`` of every loop: from a label to the branch back to it."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
    ins = [(i, line) for i, line in enumerate(lines) if _INSTRUCTION.search(line)]
    out = []
    for i, line in ins:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), 1 << 30) < i - 2:
            ops = collections.Counter(re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body).group(2)
                                      for k, body in ins if labels[m.group(1)] < k <= i)
            out.append((m.group(1), sum(ops.values()), ops))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module")
    p.add_argument("kernel")
    p.add_argument("--sig", required=True, help="JSON: argument -> Triton type (*bf16, *fp32, i32, fp32, ...)")
    p.add_argument("--const", required=True, help="JSON: constexpr argument -> value")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--divisible", default="")
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (a compile option)")
    args = p.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nsa_parallel.bench import cubin_resources, cubin_tool
    fn = getattr(importlib.import_module(args.module), args.kernel)
    sig, const = json.loads(args.sig), json.loads(args.const)
    full = {}
    for name in fn.arg_names:
        full[name] = sig.get(name, "constexpr")
        if name not in sig:
            const.setdefault(name, None)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in args.divisible.split(",") if a}
    ck = triton.compile(ASTSource(fn, full, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=args.warps, num_stages=args.stages,
                                     **({} if args.maxnreg is None else {"maxnreg": args.maxnreg})))
    print(cubin_resources(ck), "shared", ck.metadata.shared)
    sass = cubin_tool(ck, "nvdisasm", "-c")
    print("instructions in all", sum(1 for line in sass.splitlines() if _INSTRUCTION.search(line)))
    for label, n, ops in loops(sass):
        print(f"loop {label}: {n} instructions", ops.most_common(args.top))


if __name__ == "__main__":
    main()
