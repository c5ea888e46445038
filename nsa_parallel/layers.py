"""A plain-PyTorch NSA self-attention layer and a tiny causal LM built from it (no Megatron needed).

Tensors are ``[b, t, hidden]`` here; the Megatron module works on ``[s, b, h]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .kernels import Compression, NSAConfig, nsa_attention
from .kernels.reference import activate_gates
from .metrics import nsa_stats

NUM_BRANCHES = 3


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of ``x [b, t, h, d]`` at ``positions [t]``."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:].float()], dim=-1)
    return out.to(x.dtype)


class NSASelfAttention(nn.Module):
    """NSA self-attention: one fused projection gives q, K/V of each branch and per-head gate logits.

    Args:
        hidden_size: model width.
        num_heads: query heads; num_kv_heads: KV heads (GQA), must divide num_heads.
        head_dim: key/query channels (dk); value_head_dim: value channels (dv, default head_dim).
        config: NSA hyperparameters.
        backend: ``nsa_attention`` backend; ``attention="dense"`` replaces NSA by causal SDPA (for comparisons).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 value_head_dim: Optional[int] = None, config: Optional[NSAConfig] = None, backend: str = "reference",
                 attention: str = "nsa", rotary_base: float = 10000.0) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if attention not in ("nsa", "dense"):
            raise ValueError(f"attention={attention!r}; allowed: nsa, dense")
        self.config = config or NSAConfig()
        self.hq, self.hkv, self.dk, self.dv = num_heads, num_kv_heads, head_dim, value_head_dim or head_dim
        self.backend, self.attention, self.rotary_base = backend, attention, rotary_base
        self.collect_stats = False   # when True, forward keeps NSA's health numbers of its batch in self.stats
        self.stats = {}
        kv_branches = NUM_BRANCHES if attention == "nsa" else 1
        self.split = [self.hq * self.dk] + [self.hkv * self.dk, self.hkv * self.dv] * kv_branches
        if attention == "nsa":
            self.split.append(self.hq * NUM_BRANCHES)  # gate logits ride along in the fused projection
        self.qkv = nn.Linear(hidden_size, sum(self.split), bias=False)
        self.proj = nn.Linear(self.hq * self.dv, hidden_size, bias=False)
        if attention == "nsa":
            c = self.config
            self.compress_k = Compression(self.hkv, self.dk, c.compress_block, c.compress_stride)
            self.compress_v = Compression(self.hkv, self.dv, c.compress_block, c.compress_stride)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[b, t, hidden]`` -> ``[b, t, hidden]``; ``positions [t]`` restart per packed sequence."""
        b, t, _ = x.shape
        parts = self.qkv(x).split(self.split, dim=-1)
        if positions is None:
            positions = torch.arange(t, device=x.device)
        q = rotary(parts[0].view(b, t, self.hq, self.dk), positions, self.rotary_base)
        kv = []
        for i in range(1, len(parts) - (self.attention == "nsa"), 2):
            kv.append(rotary(parts[i].view(b, t, self.hkv, self.dk), positions, self.rotary_base))
            kv.append(parts[i + 1].view(b, t, self.hkv, self.dv))
        if self.attention == "dense":
            o = self._dense(q, *kv)
        else:
            gate = activate_gates(parts[-1].view(b, t, self.hq, NUM_BRANCHES), self.config)
            o, idx = nsa_attention(q, *kv, gate, compress_k=self.compress_k, compress_v=self.compress_v,
                                   config=self.config, cu_seqlens=cu_seqlens, backend=self.backend,
                                   return_block_indices=True)
            if self.collect_stats and cu_seqlens is None:
                self.stats = nsa_stats(gate, idx, self.config)
        return self.proj(o.reshape(b, t, self.hq * self.dv))

    def _dense(self, q, k, v):
        g = self.hq // self.hkv
        k, v = (z.repeat_interleave(g, dim=2).transpose(1, 2) for z in (k, v))
        o = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        return o.transpose(1, 2)


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int, attn: NSASelfAttention) -> None:
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(hidden), attn
        self.norm2 = nn.RMSNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * ffn, bias=False), nn.Linear(ffn, hidden, bias=False)

    def forward(self, x, cu_seqlens=None, positions=None):
        x = x + self.attn(self.norm1(x), cu_seqlens, positions)
        a, gate = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(nn.functional.silu(gate) * a)


class TinyNSALM(nn.Module):
    """Decoder-only causal LM (pre-norm, SwiGLU, RoPE) whose every attention layer is NSA."""

    def __init__(self, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                 config: Optional[NSAConfig] = None, backend: str = "reference", attention: str = "nsa",
                 ffn_hidden_size: Optional[int] = None) -> None:
        super().__init__()
        head_dim = hidden_size // num_heads
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            Block(hidden_size, ffn_hidden_size or 4 * hidden_size,
                  NSASelfAttention(hidden_size, num_heads, num_kv_heads, head_dim, config=config, backend=backend,
                                   attention=attention))
            for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[b, t]`` -> logits ``[b, t, vocab]``."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))
