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

    def _parts(self) -> tuple:
        """``(k, w)``: the first layer's input splits into ``k`` parts of ``w`` inputs (chunks of ``d`` tokens),
        each a separately rounded product (one part when ``l`` is not a multiple of ``d``)."""
        k = self.block // self.stride if self.block % self.stride == 0 else 1
        return k, self.block * self.head_dim // k

    def first_layer_bias(self, dtype) -> torch.Tensor:
        """``pe . W1 + b1`` ``[h, hidden]`` in the accumulation dtype (fp32 for 16-bit ``dtype``), ``pe . W1``
        rounded to ``dtype``: ``pe`` is the same in every block, so ``(block + pe) . W1 = block . W1 + pe . W1``."""
        acc = torch.promote_types(dtype, torch.float32)
        pe_w1 = torch.einsum("hi,hio->ho", self.pos_emb.to(dtype).flatten(-2), self.w1.to(dtype))
        return pe_w1.to(acc) + self.b1.to(acc)

    def _second_layer(self, hid: torch.Tensor, dtype) -> torch.Tensor:
        """``[..., h, hidden]`` first-layer sums -> ``[..., h, d]``."""
        act = nn.functional.silu(hid.to(dtype))
        return torch.einsum("...hi,hio->...ho", act, self.w2.to(dtype)) + self.b2.to(dtype)

    def compress_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[..., h, l, d]`` blocks -> ``[..., h, d]`` compressed tokens.

        The arithmetic of :meth:`forward` (and of the decode kernel ``decode_triton._phi_rows``) exactly: each part
        of the first layer is a product rounded to the input dtype, the parts and ``pe . W1 + b1`` add up
        unrounded, so a compressed token is the same whether training or decoding made it."""
        x = blocks.flatten(-2)
        w1 = self.w1.to(x.dtype)
        k, w = self._parts()
        hid = self.first_layer_bias(x.dtype)
        for j in range(k):
            hid = hid + torch.einsum("...hi,hio->...ho", x[..., j * w:(j + 1) * w], w1[:, j * w:(j + 1) * w])
        return self._second_layer(hid, x.dtype)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compress ``x`` ``[b, t, h, d]``; with ``cu_seqlens`` (b == 1) blocks never straddle two sequences.

        Returns ``[b, tc, h, d]``; packed, ``[1, sum(tc_i), h, d]`` laid out as ``compressed_cu_seqlens`` says.
        """
        if x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"Compression expects [..., {self.num_heads}, {self.head_dim}] inputs, got "
                             f"{tuple(x.shape)}")
        if cu_seqlens is None:
            return self._compress(x)
        return torch.cat([self._compress(x[:, s:e]) for s, e in sequence_bounds(cu_seqlens)], dim=1)

    def _compress(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`compress_blocks` of every whole block of ``x`` ``[b, t, h, d]`` without materialising them.

        A block is ``k = l / d`` consecutive chunks of ``d`` tokens and each chunk is a part of ``k`` blocks, so
        each chunk's product with each slice of W1 is computed once, and the block's first layer adds ``k`` of
        them. The unfolded blocks (``l / d`` copies of ``x`` plus ``pe``) and the scatter-add that undoes the
        unfold in backward never exist: in the NSA core at 64k on an H100 (4 KV heads, K and V) the GPU time outside
        the Triton kernels fell from 1.0 to 0.46 ms forward and from 4.6 to 3.6 ms forward+backward
        (docs/benchmarks.md, twelfth session)."""
        b, t, h, d = x.shape
        l, s, hidden = self.block, self.stride, self.hidden
        tc = (t - l) // s + 1 if t >= l else 0
        if l % s or tc == 0:
            return self.compress_blocks(unfold_blocks(x, l, s))
        k, w = self._parts()
        nc = tc + k - 1  # chunks that whole blocks cover
        chunks = x[:, :nc * s].reshape(b, nc, s, h, d).permute(3, 0, 1, 2, 4).reshape(h, b * nc, w)
        w1 = self.w1.to(x.dtype)
        hid = self.first_layer_bias(x.dtype)[:, None, None, :]
        for j in range(k):  # chunk c is the j-th part of block c - j
            part = torch.bmm(chunks, w1[:, j * w:(j + 1) * w]).view(h, b, nc, hidden)
            hid = hid + part[:, :, j:j + tc]
        return self._second_layer(hid.permute(1, 2, 0, 3), x.dtype)
