"""phi, NSA's learnable block compression: one compressed key (or value) per block of ``l`` tokens, stride ``d``.

phi(block) = W2 . silu(W1 . flatten(block + pe) + b1) + b2, with its own weights per KV head so that the module
shards with tensor parallelism along heads and its gradients need no extra reduction.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .varlen import sequence_bounds


def unfold_blocks(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Blocks of ``block`` tokens every ``stride`` tokens: ``[b, t, h, d]`` -> ``[b, tc, h, block, d]``.

    Only whole blocks are taken: ``tc = (t - block) // stride + 1`` (0 when ``t < block``).
    """
    b, t, h, d = x.shape
    if t < block:
        return x.new_zeros(b, 0, h, block, d)
    # unfold puts the window dimension last: [b, tc, h, d, block]
    return x.unfold(1, block, stride).permute(0, 1, 2, 4, 3)


class Compression(nn.Module):
    """Learnable compression phi for one of K or V of the compressed branch.

    Args:
        num_heads: KV heads (each has its own weights).
        head_dim: channels of each key (or value).
        block: l, tokens per compressed block.
        stride: d, start-to-start distance of consecutive blocks.
        hidden: width of the MLP's hidden layer (default ``head_dim``).
    """

    def __init__(self, num_heads: int, head_dim: int, block: int, stride: int, hidden: Optional[int] = None,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        hidden = hidden or head_dim
        self.num_heads, self.head_dim, self.block, self.stride, self.hidden = num_heads, head_dim, block, stride, hidden
        kw = dict(device=device, dtype=dtype)
        self.pos_emb = nn.Parameter(torch.empty(num_heads, block, head_dim, **kw))
        self.w1 = nn.Parameter(torch.empty(num_heads, block * head_dim, hidden, **kw))
        self.b1 = nn.Parameter(torch.empty(num_heads, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden, head_dim, **kw))
        self.b2 = nn.Parameter(torch.empty(num_heads, head_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.block * self.head_dim))
        nn.init.zeros_(self.b1)
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.hidden))
        nn.init.zeros_(self.b2)

    def compress_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[..., h, l, d]`` blocks -> ``[..., h, d]`` compressed tokens."""
        x = (blocks + self.pos_emb.to(blocks.dtype)).flatten(-2)
        hid = torch.einsum("...hi,hio->...ho", x, self.w1.to(x.dtype)) + self.b1.to(x.dtype)
        return torch.einsum("...hi,hio->...ho", nn.functional.silu(hid), self.w2.to(x.dtype)) + self.b2.to(x.dtype)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compress ``x`` ``[b, t, h, d]``; with ``cu_seqlens`` (b == 1) blocks never straddle two sequences.

        Returns ``[b, tc, h, d]``; packed, ``[1, sum(tc_i), h, d]`` laid out as ``compressed_cu_seqlens`` says.
        """
        if x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"Compression expects [..., {self.num_heads}, {self.head_dim}] inputs, got "
                             f"{tuple(x.shape)}")
        if cu_seqlens is None:
            return self.compress_blocks(unfold_blocks(x, self.block, self.stride))
        parts = [self.compress_blocks(unfold_blocks(x[:, s:e], self.block, self.stride))
                 for s, e in sequence_bounds(cu_seqlens)]
        return torch.cat(parts, dim=1)
