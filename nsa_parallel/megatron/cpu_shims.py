"""Let megatron.core run NSA models on CPU-only machines (tests, the CPU main job).

megatron.core assumes CUDA in a few places that matter on CPU; each shim below replaces one of them and is
installed only when CUDA is absent, so on GPUs nothing changes. Call :func:`enable_cpu_shims` once before building
the model; it is idempotent and returns the names of the shims it installed.
"""
from __future__ import annotations

from typing import List

import torch

_INSTALLED: List[str] = []


def _rope_get_emb_on_cpu():
    """``RotaryEmbedding.get_emb`` moves its inverse frequencies to ``torch.cuda.current_device()`` on first use;
    on a CPU-only machine keep them on the CPU and build the same ``[s, 1, 1, dim]`` table there."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original = RotaryEmbedding.get_emb

    def get_emb(self, max_seq_len: int, offset: int = 0):
        if self.inv_freq.device.type != "cpu":
            return original(self, max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.repeat_interleave(freqs, 2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    RotaryEmbedding.get_emb = get_emb


def _current_device_is_cpu():
    """Sequence parallelism's gather/scatter outputs and Megatron's global memory buffer are allocated on
    ``torch.cuda.current_device()``; without CUDA that call can only raise, so answer with the CPU instead."""
    torch.cuda.current_device = lambda: torch.device("cpu")


def enable_cpu_shims() -> List[str]:
    if torch.cuda.is_available():
        return []
    if not _INSTALLED:
        _rope_get_emb_on_cpu()
        _INSTALLED.append("RotaryEmbedding.get_emb")
        _current_device_is_cpu()
        _INSTALLED.append("torch.cuda.current_device")
    return list(_INSTALLED)
