"""The KV cache of one NSA layer for decoding: what each branch must keep, per sequence, ragged lengths.

Per sequence ``b`` holding ``lens[b]`` tokens (positions ``0 .. lens[b]-1``):

- selected branch: every raw key/value, ``k_slc [B, max_len, hkv, dk]`` (any block may be selected);
- window branch: the last ``w`` raw keys/values, a ring ``k_swa [B, w, hkv, dk]`` (position ``p`` at ``p % w``);
- compressed branch: the last ``l`` raw keys/values, a ring ``k_raw [B, l, hkv, dk]``, and the compressed tokens
  ``k_cmp [B, max_cmp, hkv, dk]``; block ``i`` (positions ``i*d .. i*d + l - 1``) is compressed by phi the step
  its last token arrives, i.e. every ``d`` tokens once ``l`` are there.

Updates never read lengths back to the host, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from .compression import Compression
from .config import NSAConfig


class NSAKVCache:
    """Cache for ``batch`` sequences of at most ``max_len`` tokens.

    Args:
        compress_k, compress_v: the layer's phi modules (the cache compresses blocks as they complete).
    """

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, config: NSAConfig,
                 compress_k: Compression, compress_v: Compression, head_dim_v: Optional[int] = None, *,
                 device=None, dtype=torch.bfloat16, backend: str = "reference") -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"NSAKVCache: batch={batch} and max_len={max_len} must be >= 1")
        if backend not in ("reference", "triton"):
            raise ValueError(f"NSAKVCache: backend={backend!r}; allowed: reference, triton")
        self.backend = backend  # "triton": append() in two kernels (raw writes; phi only where a block completed)
        dv = head_dim_v or head_dim
        self.config, self.compress_k, self.compress_v = config, compress_k, compress_v
        self.batch, self.max_len, self.num_kv_heads, self.head_dim, self.head_dim_v = \
            batch, max_len, num_kv_heads, head_dim, dv
        kw = dict(device=device, dtype=dtype)
        cfg = config
        self.max_cmp = max(cfg.num_compressed(max_len), 1)
        self.k_slc = torch.zeros(batch, max_len, num_kv_heads, head_dim, **kw)
        self.v_slc = torch.zeros(batch, max_len, num_kv_heads, dv, **kw)
        self.k_swa = torch.zeros(batch, cfg.window, num_kv_heads, head_dim, **kw)
        self.v_swa = torch.zeros(batch, cfg.window, num_kv_heads, dv, **kw)
        self.k_raw = torch.zeros(batch, cfg.compress_block, num_kv_heads, head_dim, **kw)
        self.v_raw = torch.zeros(batch, cfg.compress_block, num_kv_heads, dv, **kw)
        self.k_cmp = torch.zeros(batch, self.max_cmp, num_kv_heads, head_dim, **kw)
        self.v_cmp = torch.zeros(batch, self.max_cmp, num_kv_heads, dv, **kw)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        # the decode kernel's phi adds pe . W1 + b1 as one bias; phi's weights do not change while decoding
        self.phi_bias = None
        if backend == "triton":
            with torch.no_grad():
                self.phi_bias = tuple(m.first_layer_bias(dtype).float().contiguous() for m in (compress_k, compress_v))

    def _check(self, name: str, x: torch.Tensor, t: int, d: int) -> None:
        want = (self.batch, t, self.num_kv_heads, d)
        if tuple(x.shape) != want:
            raise ValueError(f"NSAKVCache: {name} must be [B={want[0]}, t={t}, hkv={want[2]}, d={d}], got "
                             f"{tuple(x.shape)}")

    @torch.no_grad()
    def prefill(self, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, lens: torch.Tensor) -> None:
        """Fill from prompts: each ``[B, T, hkv, d]`` (the raw per-branch K/V the layer projected, sequence ``b``
        valid in its first ``lens[b]`` tokens; the rest is padding and ignored)."""
        t = k_slc.shape[1]
        lens_host = [int(x) for x in lens.tolist()]  # prefill runs once per prompt: a host sync is fine here
        if len(lens_host) != self.batch or min(lens_host) < 1 or max(lens_host) > min(t, self.max_len):
            raise ValueError(f"NSAKVCache.prefill: lens={lens_host} must be {self.batch} lengths in [1, "
                             f"{min(t, self.max_len)}] (the prompt tensors' T={t}, max_len={self.max_len})")
        for name, x, d in (("k_cmp", k_cmp, self.head_dim), ("v_cmp", v_cmp, self.head_dim_v),
                           ("k_slc", k_slc, self.head_dim), ("v_slc", v_slc, self.head_dim_v),
                           ("k_swa", k_swa, self.head_dim), ("v_swa", v_swa, self.head_dim_v)):
            self._check(name, x, t, d)
        cfg = self.config
        self.k_slc[:, :t].copy_(k_slc[:, :self.max_len])
        self.v_slc[:, :t].copy_(v_slc[:, :self.max_len])
        for b, n in enumerate(lens_host):
            for ring, src, size in ((self.k_swa, k_swa, cfg.window), (self.v_swa, v_swa, cfg.window),
                                    (self.k_raw, k_cmp, cfg.compress_block), (self.v_raw, v_cmp, cfg.compress_block)):
                pos = torch.arange(max(0, n - size), n, device=ring.device)
                ring[b, pos % size] = src[b, pos].to(ring.dtype)
            nc = cfg.num_compressed(n)
            if nc:
                self.k_cmp[b, :nc] = self.compress_k(k_cmp[b:b + 1, :n])[0].to(self.k_cmp.dtype)
                self.v_cmp[b, :nc] = self.compress_v(v_cmp[b:b + 1, :n])[0].to(self.v_cmp.dtype)
        self.lens.copy_(lens.to(self.lens))

    @torch.no_grad()
    def append(self, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa) -> None:
        """Add one token to every sequence: each ``[B, 1, hkv, d]``. Compresses the block that it completes."""
        for name, x, d in (("k_cmp", k_cmp, self.head_dim), ("v_cmp", v_cmp, self.head_dim_v),
                           ("k_slc", k_slc, self.head_dim), ("v_slc", v_slc, self.head_dim_v),
                           ("k_swa", k_swa, self.head_dim), ("v_swa", v_swa, self.head_dim_v)):
            self._check(name, x, 1, d)
        if self.backend == "triton":
            from .decode_triton import append_compress, append_raw
            append_raw(self, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa)
            append_compress(self)
            self.lens += 1
            return
        cfg = self.config
        b = torch.arange(self.batch, device=self.lens.device)
        pos = self.lens.long()
        # a full sequence would write past max_len: clamp the index (no host sync); generate() sizes the cache so
        # that it never happens
        self.k_slc[b, pos.clamp(max=self.max_len - 1)] = k_slc[:, 0].to(self.k_slc.dtype)
        self.v_slc[b, pos.clamp(max=self.max_len - 1)] = v_slc[:, 0].to(self.v_slc.dtype)
        self.k_swa[b, pos % cfg.window] = k_swa[:, 0].to(self.k_swa.dtype)
        self.v_swa[b, pos % cfg.window] = v_swa[:, 0].to(self.v_swa.dtype)
        self.k_raw[b, pos % cfg.compress_block] = k_cmp[:, 0].to(self.k_raw.dtype)
        self.v_raw[b, pos % cfg.compress_block] = v_cmp[:, 0].to(self.v_raw.dtype)
        n = pos + 1
        cl, cs = cfg.compress_block, cfg.compress_stride
        done = (n >= cl) & ((n - cl) % cs == 0)  # this token ends block (n - cl) / cs
        blk = ((n - cl).clamp_min(0) // cs).clamp(max=self.max_cmp - 1)
        order = (n[:, None] - cl + torch.arange(cl, device=n.device)) % cl  # the ring in position order
        for raw, phi, out in ((self.k_raw, self.compress_k, self.k_cmp), (self.v_raw, self.compress_v, self.v_cmp)):
            block = raw[b[:, None], order]  # [B, l, hkv, d]
            new = phi.compress_blocks(block.transpose(1, 2))  # [B, hkv, d]
            out[b, blk] = torch.where(done[:, None, None], new.to(out.dtype), out[b, blk])
        self.lens += 1
