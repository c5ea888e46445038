"""Registers, spills and shared memory of every Triton kernel the NSA core compiles, on one GPU.

    python -P benchmarks/spills.py --t 65536 --also forced.FORCED_TILES=false --out spills.json

Runs the core's forward and backward once on the bench's inputs (``nsa_parallel.bench.core_case``), then once more
for each ``--also MODULE.NAME=JSON`` (that setting of ``nsa_parallel.kernels.MODULE`` alone changed, then put back),
and lists each compiled variant of each kernel in ``nsa_parallel.kernels``: warps, stages, registers per thread,
spilled bytes (ptxas' count, as Triton reads it when it loads the binary), shared memory and the variant's
constexprs. ``benchmarks/sass_loops.py`` gives the same without a GPU for one signature at a time; this takes the
launches as the core makes them. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse
import importlib
import json

from nsa_parallel.bench import core_case, core_step, emit, head_dims, kernel_setting

MODULES = ("flash", "forced", "compress", "topn", "select", "gate")


def _arg_name(fn, key) -> str:
    """A constexpr's name from its key in ``ASTSource.constants`` (an argument path such as ``(3,)``, or a name)."""
    if isinstance(key, tuple) and key and isinstance(key[0], int) and key[0] < len(fn.arg_names):
        return fn.arg_names[key[0]]
    return str(key)


def compiled_variants():
    """``[(kernel name, CompiledKernel, its constexprs)]`` of every JIT function in ``MODULES`` that has run."""
    from triton.runtime.jit import JITFunction
    out = []
    for m in MODULES:
        mod = importlib.import_module(f"nsa_parallel.kernels.{m}")
        for name, fn in sorted(vars(mod).items()):
            if not isinstance(fn, JITFunction) or fn.__module__ != mod.__name__:
                continue
            for entry in getattr(fn, "device_caches", {}).values():
                for kernel in entry[0].values():
                    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                    const = getattr(getattr(kernel, "src", None), "constants", {}) or {}
                    out.append((f"{m}.{name}", kernel, {_arg_name(fn, k): v for k, v in const.items()
                                                         if isinstance(v, (bool, int, float, str))}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--head-dims", type=head_dims, default=(128, 128), help="dk/dv, e.g. 192/128")
    p.add_argument("--also", nargs="*", default=[], metavar="MODULE.NAME=JSON",
                   help="settings to compile the core with as well, one at a time")
    p.add_argument("--out", default="spills.json")
    args = p.parse_args()
    also = []
    for item in args.also:
        path, _, value = item.partition("=")
        try:  # json's errors are ValueErrors too
            also.append((*kernel_setting(path), json.loads(value)))
        except ValueError as e:
            p.error(f"--also {item!r}: {e}")
    dk, dv = args.head_dims
    from nsa_parallel.kernels import NSAConfig
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig(), d=dk, dv=dv)
    step = core_step(core, leaves, do)
    step()
    for mod, name, value in also:
        before = getattr(mod, name)
        setattr(mod, name, value)
        try:
            step()
        finally:
            setattr(mod, name, before)
    rows = []
    for name, kernel, const in compiled_variants():
        meta = kernel.metadata
        emit(rows, args.out, kernel=name, warps=meta.num_warps, stages=meta.num_stages, regs=kernel.n_regs,
             spills=kernel.n_spills, shared=meta.shared, const=const)


if __name__ == "__main__":
    main()
