"""One decoding step of NSA: the new token of every sequence attends to its layer's :class:`NSAKVCache`.

``nsa_decode(q, gate, cache)``: q ``[B, hq, dk]`` (the token just appended to the cache, at position
``cache.lens - 1`` of its own sequence), gate ``[B, hq, 3]`` activated -> ``[B, hq, dv]``.

``backend="reference"`` runs the training reference (:mod:`.reference`) on each sequence with one query at its
position: the same visibility, scores, top-n and masks as the full forward, so decoding step by step gives the full
forward's outputs. ``backend="triton"`` runs :mod:`.decode_triton`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference as ref
from .cache import NSAKVCache

DECODE_BACKENDS = ("reference", "triton")


def _window_keys(ring: torch.Tensor, b: int, n: int, w: int) -> torch.Tensor:
    """The last ``min(n, w)`` window keys of sequence ``b`` in position order, ``[1, m, hkv, d]``."""
    pos = torch.arange(max(0, n - w), n, device=ring.device)
    return ring[b, pos % w][None]


def decode_reference(q: torch.Tensor, gate: torch.Tensor, cache: NSAKVCache, scale: float):
    """Returns ``(o [B, hq, dv], indices [B, hkv, n])``."""
    cfg = cache.config
    outs, idxs = [], []
    for b, n in enumerate(cache.lens.tolist()):
        qb = q[b:b + 1, None]  # [1, 1, hq, dk] at position n - 1
        t = n - 1
        nc = cfg.num_compressed(n)
        cmp, probs = ref.compressed_attention(qb, cache.k_cmp[b:b + 1, :nc], cache.v_cmp[b:b + 1, :nc], cfg, scale,
                                              return_probs=True, q_offset=t)
        scores = ref.selection_scores(probs, cache.num_kv_heads, n, cfg)
        idx = ref.select_topn(scores, cfg, q_offset=t)
        slc = ref.selected_attention(qb, cache.k_slc[b:b + 1, :n], cache.v_slc[b:b + 1, :n], idx, cfg, scale,
                                     q_offset=t)
        kw, vw = _window_keys(cache.k_swa, b, n, cfg.window), _window_keys(cache.v_swa, b, n, cfg.window)
        swa = ref.window_attention(qb, kw, vw, cfg, scale, q_offset=kw.shape[1] - 1)
        outs.append(ref.gate_combine(cmp.o, slc.o, swa.o, gate[b:b + 1, None])[:, 0])
        idxs.append(idx[:, 0])
    return torch.cat(outs), torch.cat(idxs)


def nsa_decode(q: torch.Tensor, gate: torch.Tensor, cache: NSAKVCache, scale: Optional[float] = None,
               backend: str = "triton", return_indices: bool = False):
    """One step for every sequence of the cache (append the token's K/V to ``cache`` first)."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(DECODE_BACKENDS)}")
    bsz, hq, dk = q.shape
    if bsz != cache.batch or dk != cache.head_dim or hq % cache.num_kv_heads:
        raise ValueError(f"q must be [B={cache.batch}, hq (a multiple of hkv={cache.num_kv_heads}), "
                         f"dk={cache.head_dim}], got {tuple(q.shape)}")
    if tuple(gate.shape) != (bsz, hq, 3):
        raise ValueError(f"gate must be [B={bsz}, hq={hq}, 3] (cmp, slc, swa), got {tuple(gate.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(dk)
    if backend == "reference":
        o, idx = decode_reference(q, gate, cache, scale)
    else:
        from .decode_triton import decode_triton
        o, idx = decode_triton(q, gate, cache, scale)
    return (o, idx) if return_indices else o
