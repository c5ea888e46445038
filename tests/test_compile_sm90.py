"""Every Triton kernel launch of a few small CPU runs also compiles for Hopper (sm_90), through Triton's front end
(source to TTIR; no GPU, no ptxas).

The interpreter runs a kernel's Python, so a kernel that only the compiler rejects passes every interpreter test and
fails on its first GPU call: a name reused inside a loop with another shape (loop-carried, so its type must stay the
same: session 25's first GPU call met one in the small-G dq-from-dS kernel after CPU CI had passed; this test fails
on it), a constexpr used as a runtime value, a Python construct the code generator lacks. Here the launches
(kernel, argument types, constexpr values, warps and stages) are recorded while the runs go through the interpreter,
then compiled in a subprocess without it. The runs cover the core at G = 1 (packed) / 4 / 16 / 64 with its GPU
tiles switched on, the small-G union walk, context-parallel ring steps and decoding; what only a GPU run launches
(16-bit inputs, the 64k sizes) the gpu-marked tests compile.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SMALL, gpu_tiles_on_cpu, make_inputs
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import reference as ref
from nsa_parallel.kernels.select import selected_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records the interpreter's launches (CPU hosts); GPUs compile them anyway")

_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _record(monkeypatch) -> dict:
    """Launches from now on, ``{key: launch}``: a launch is the kernel's module and name, each argument as Triton's
    launcher types it (``*bf16``, ``i32``, ``tensordesc<...>``; constexprs and None as values) and the options."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type
    seen = {}
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
        bound.apply_defaults()
        params = {}
        for name, value in bound.arguments.items():
            if "constexpr" in str(sig.parameters[name].annotation) or value is None:
                params[name] = {"value": value}
            else:
                params[name] = {"type": mangle_type(value)}
        launch = dict(module=self.fn.__module__, kernel=self.fn.__name__, params=params,
                      options={k: kwargs[k] for k in _OPTIONS if k in kwargs})
        seen.setdefault(json.dumps(launch, sort_keys=True), launch)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


_COMPILE = r"""
import json, sys
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
import importlib

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
failed = []
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature = {n: p.get("type", "constexpr") for n, p in launch["params"].items()}
    constexprs = {n: p["value"] for n, p in launch["params"].items() if "value" in p}
    try:
        options = backend.parse_options(dict(launch["options"]))
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        ASTSource(fn, signature, constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                     backend.get_module_map(), context)
    except Exception as e:  # the compiler's message names the kernel line
        failed.append(dict(kernel=launch["kernel"], constexprs=constexprs, error=str(e)[-1500:]))
print(json.dumps(failed))
"""


def _compile_all(launches) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(launches)), capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _core(t, hq, hkv, dk, dv, cfg, cu=None):
    q, kvs, gate, ck, cv = make_inputs(1, t, hq, hkv, dk, dv, cfg, requires_grad=True)
    o = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, cu_seqlens=cu, backend="triton")[0]
    o.square().sum().backward()


def _ring_steps(hq):
    """The selected branch as a context-parallel ring step calls it: queries at an offset, keys in two buffers."""
    t, hkv, blk = 96, 2, SMALL.select_block
    g = torch.Generator().manual_seed(0)
    idx = ref.select_topn(torch.rand(1, hkv, t, SMALL.num_select_blocks(t), generator=g), SMALL)
    q, k, v = (torch.randn(1, t, h, 16, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    s = 3 * blk
    for a, e in ((0, s), (s, t)):
        o, _ = selected_attention(q[:, s:].detach().requires_grad_(), k[:, a:e].detach().requires_grad_(),
                                  v[:, a:e].detach().requires_grad_(), idx[:, s:].contiguous(), blk, 0.25,
                                  q_offset=s, k_base=a)
        o.sum().backward()


def test_interpreted_launches_compile_for_sm90(monkeypatch):
    launches = _record(monkeypatch)
    forced = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=5, select_initial=1,
                       select_local=2, window=24)
    # sizes apart where a kernel's vectors could coincide: [16] head rows vs [32] block keys below; with equal
    # sizes a name reused in a loop at both compiles (session 25's bug hid at select_block 16)
    wide = NSAConfig(compress_block=8, compress_stride=4, select_block=32, select_topn=4, window=24)
    _core(150, 8, 2, 16, 8, wide)  # G = 4: KV-block-major forward, dq from the dK/dV pass's shares at small G
    _core(150, 32, 2, 16, 16, forced)  # G = 16: forced blocks in the window kernels, dS handoff
    _core(98, 2, 2, 16, 16, SMALL, cu=torch.tensor([0, 37, 53, 98], dtype=torch.int32))  # G = 1, packed
    _core(40, 64, 1, 16, 16, SMALL)  # G = 64: wide per-position accumulators
    for hq in (8, 32):
        _ring_steps(hq)
    # the compressed branch's and dK/dV's tuned tiles, which a launch takes on a GPU in 16-bit only
    from nsa_parallel.kernels import select
    gpu_tiles_on_cpu(monkeypatch)
    _core(150, 8, 2, 16, 8, wide)
    monkeypatch.setattr(select, "SEL_DQ_PARTIALS_SMALL_G", False)  # small G's dq from dS tiles and K instead
    _core(150, 8, 2, 16, 8, wide)
    # the union walk at small G (packed batches too long for the block-major buffers take it)
    monkeypatch.setattr(select, "SEL_FWD_KMAJOR", False)
    monkeypatch.setattr(select, "SEL_DQ_FROM_DS_SMALL_G", False)
    _core(150, 8, 2, 16, 8, wide)
    # decoding with the KV cache (prefill, appends, the decode kernels)
    from test_decode import _decode_all
    _decode_all([3, 37], [20, 45], "triton")
    kernels = {launch["kernel"] for launch in launches.values()}
    assert {"_sel_dq_ds_kernel", "_sel_fwd_kmajor_kernel", "_window_forced_fwd_kernel", "_scores_kernel",
            "_sel_fwd_kernel", "_sel_bwd_dq_kernel", "_sparse_partial", "_append_compress",
            "_sel_dq_sum_kernel"} <= kernels
    assert any(launch["kernel"] == "_fwd_kernel" and launch["options"].get("num_warps") == 8
               for launch in launches.values())  # the tuned tiles' launch was recorded
    failed = _compile_all(launches.values())
    assert not failed, json.dumps(failed, indent=1)[:6000]
