"""A built-in synthetic long-context task: multi-query associative recall over thousands of tokens.

Each sequence first lists ``num_pairs`` key-value pairs, then asks for keys again (key, value, key, value, ...):
the value after a repeated key is only predictable by looking back to where the pair was listed, often further
back than NSA's sliding window, so the compressed and selected branches have to find it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecallTask:
    seq_length: int = 1024
    num_pairs: int = 64
    num_keys: int = 256
    num_values: int = 256

    def __post_init__(self) -> None:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"RecallTask.num_pairs={self.num_pairs} must be <= num_keys={self.num_keys}")
        if 2 * self.num_pairs + 2 > self.seq_length:
            raise ValueError(f"RecallTask.seq_length={self.seq_length} must be >= 2 * num_pairs + 2 = "
                             f"{2 * self.num_pairs + 2}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    def batch(self, batch_size: int, generator: torch.Generator):
        """``(tokens [b, t+1], loss_mask [b, t])``: inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``;
        the mask marks the targets that are recalled values."""
        b, t, p = batch_size, self.seq_length + 1, self.num_pairs
        keys = torch.argsort(torch.rand(b, self.num_keys, generator=generator), dim=1)[:, :p]
        values = torch.randint(self.num_keys, self.vocab_size, (b, p), generator=generator)
        n_q = (t - 2 * p + 1) // 2
        ask = torch.randint(0, p, (b, n_q), generator=generator)
        listing = torch.stack([keys, values], dim=2).reshape(b, 2 * p)
        queries = torch.stack([keys.gather(1, ask), values.gather(1, ask)], dim=2).reshape(b, 2 * n_q)
        tokens = torch.cat([listing, queries], dim=1)[:, :t]
        pos = torch.arange(1, t)
        recalled = (pos >= 2 * p) & ((pos - 2 * p) % 2 == 1)   # target positions holding a queried value
        return tokens, recalled[None, :].expand(b, -1)
