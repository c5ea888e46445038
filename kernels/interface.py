"""``nsa_attention``: the one public entry to the NSA core, shared by every backend."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .config import NSAConfig
from .varlen import check_cu_seqlens, compressed_cu_seqlens

BACKENDS = ("reference", "triton")
MAX_HEAD_DIM = 256


def check_triton_config(config: NSAConfig) -> None:
    """The Triton kernels tile a selection block as one matrix operand and map stride slots to blocks with a
    reshape: both need powers of two (stride slots per block then are one too, as the stride divides the block).
    Raise a ValueError naming the field otherwise."""
    def pow2(x):
        return x > 0 and x & (x - 1) == 0
    if not pow2(config.select_block) or config.select_block < 16:
        raise ValueError(f"backend='triton' needs NSAConfig.select_block to be a power of two >= 16 "
                         f"(16, 32, 64, 128, ...), got {config.select_block}; backend='reference' takes any value")


def _check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate, cu_seqlens, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if q.dim() != 4:
        raise ValueError(f"q must be [b, t, hq, dk], got shape {tuple(q.shape)}")
    b, t, hq, dk = q.shape
    named = dict(k_cmp=k_cmp, v_cmp=v_cmp, k_slc=k_slc, v_slc=v_slc, k_swa=k_swa, v_swa=v_swa)
    hkv = k_slc.shape[2] if k_slc.dim() == 4 else None
    dv = v_slc.shape[3] if v_slc.dim() == 4 else None
    for name, x in named.items():
        want_d = dk if name.startswith("k") else dv
        if x.dim() != 4 or x.shape[0] != b or x.shape[1] != t or x.shape[2] != hkv or x.shape[3] != want_d:
            raise ValueError(f"{name} must be [b={b}, t={t}, hkv={hkv}, {'dk' if name[0] == 'k' else 'dv'}="
                             f"{want_d}] like q and k_slc/v_slc, got shape {tuple(x.shape)}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device}; q is {q.dtype} on {q.device}: they must match")
    if hq % hkv:
        divisors = [g for g in range(1, hkv + 1) if hq % g == 0]
        raise ValueError(f"query heads hq={hq} must be a multiple of the KV heads hkv={hkv} (GQA); "
                         f"KV head counts allowed with hq={hq}: {divisors}")
    if gate.shape != (b, t, hq, 3):
        raise ValueError(f"gate must be [b={b}, t={t}, hq={hq}, 3] (cmp, slc, swa), got {tuple(gate.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, t, b)
    if backend == "triton":
        if max(dk, dv) > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got dk={dk}, dv={dv}")
        if not q.is_cuda and not _triton_interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                             "use backend='reference' on CPU")


def _triton_interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def nsa_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                  v_slc: torch.Tensor, k_swa: torch.Tensor, v_swa: torch.Tensor, gate: torch.Tensor, *,
                  compress_k: Callable, compress_v: Callable, config: Optional[NSAConfig] = None,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  backend: str = "reference", return_block_indices: bool = False):
    """Native Sparse Attention (causal): compressed + selected + sliding-window branches, gated.

    Args:
        q: ``[b, t, hq, dk]`` queries, shared by the three branches.
        k_cmp, v_cmp: ``[b, t, hkv, dk]`` / ``[b, t, hkv, dv]`` per-token keys/values of the compressed branch;
            ``compress_k`` / ``compress_v`` (phi, e.g. :class:`Compression`) turn them into one token per block.
        k_slc, v_slc: ``[b, t, hkv, dk|dv]`` keys/values of the selected-block branch.
        k_swa, v_swa: ``[b, t, hkv, dk|dv]`` keys/values of the sliding-window branch.
        gate: ``[b, t, hq, 3]`` branch weights (cmp, slc, swa), already activated (sigmoid in the paper).
        config: :class:`NSAConfig` (paper defaults when None).
        scale: softmax scale, ``1/sqrt(dk)`` by default.
        cu_seqlens: ``[N+1]`` int32/int64 for a packed batch: inputs are ``[1, total, h, d]`` and no branch looks
            across a sequence boundary.
        backend: ``"reference"`` (plain PyTorch, any device) or ``"triton"``.
        return_block_indices: also return the ``[b, t, hkv, n]`` selected blocks (-1 = none).

    GQA: ``hq`` must be a multiple of ``hkv``; query head ``h`` uses KV head ``h // (hq // hkv)``.
    Returns ``[b, t, hq, dv]`` (and the block indices if asked).
    """
    config = config if config is not None else NSAConfig()
    _check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate, cu_seqlens, backend)
    if backend == "triton":
        check_triton_config(config)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kc = compress_k(k_cmp, cu_seqlens)
    vc = compress_v(v_cmp, cu_seqlens)
    cmp_cu = None
    if cu_seqlens is not None:
        cmp_cu = compressed_cu_seqlens(cu_seqlens, config.compress_block, config.compress_stride)
    if backend == "reference":
        from .reference import nsa_reference
        out = nsa_reference(q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, config, scale, cu_seqlens, cmp_cu)
    else:
        from .parallel import nsa_triton
        out = nsa_triton(q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, config, scale, cu_seqlens, cmp_cu)
    return (out.o, out.block_indices) if return_block_indices else out.o
