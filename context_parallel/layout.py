"""How a sequence is split over the context-parallel (CP) ranks, in one place.

Two layouts, each cutting the sequence into equal chunks whose edges align to the selection block (and so to the
compression stride, which divides it):

- ``load_balanced`` (default, Megatron's ``get_batch_on_this_cp_rank``): ``2P`` chunks; rank ``r`` holds chunk
  ``r`` and chunk ``2P-1-r``, so every rank has one early and one late chunk and the compressed branch's cost,
  which grows with position, evens out.
- ``contiguous``: ``P`` chunks; rank ``r`` holds chunk ``r``.

Tensors are ``[b, t, ...]`` (sequence on dim 1) unless ``dim`` says otherwise. Megatron changed
``get_batch_on_this_cp_rank``'s signature between 0.16 and 0.19; this module owns the split instead.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

LAYOUTS = ("load_balanced", "contiguous")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")


def num_chunks(cp_size: int, layout: str) -> int:
    _check_layout(layout)
    if cp_size < 1:
        raise ValueError(f"cp_size={cp_size} must be >= 1")
    return 2 * cp_size if layout == "load_balanced" else cp_size


def check_sequence_length(seq_len: int, cp_size: int, layout: str, config) -> int:
    """Validate that ``seq_len`` splits into aligned chunks; returns the chunk length.

    Every chunk must be a whole number of selection blocks (``config.select_block``; a multiple of the stride), so
    selection blocks and compressed-block starts never straddle two ranks unevenly.
    """
    chunks = num_chunks(cp_size, layout)
    multiple = chunks * config.select_block
    if seq_len < multiple or seq_len % multiple:
        raise ValueError(
            f"sequence length {seq_len} cannot be split over context_parallel_size={cp_size} with layout "
            f"{layout!r}: it must be a multiple of {chunks} chunks x select_block {config.select_block} = "
            f"{multiple} (pad the sequence, or change the CP size or layout)")
    return seq_len // chunks


def chunk_ranges(seq_len: int, cp_size: int, rank: int, layout: str = "load_balanced") -> List[Tuple[int, int]]:
    """Global ``[start, end)`` token ranges held by ``rank``, in the order they are laid out locally."""
    chunks = num_chunks(cp_size, layout)
    if not 0 <= rank < cp_size:
        raise ValueError(f"rank={rank} must be in [0, cp_size={cp_size})")
    if seq_len % chunks:
        raise ValueError(f"sequence length {seq_len} must be a multiple of the {chunks} chunks of layout {layout!r}")
    size = seq_len // chunks
    ids = [rank, chunks - 1 - rank] if layout == "load_balanced" else [rank]
    return [(i * size, (i + 1) * size) for i in ids]


def local_positions(seq_len: int, cp_size: int, rank: int, layout: str = "load_balanced",
                    device=None) -> torch.Tensor:
    """Global positions of this rank's tokens ``[t_local]`` (for RoPE and causal masks)."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in chunk_ranges(seq_len, cp_size, rank, layout)])


def split_for_rank(x: torch.Tensor, cp_size: int, rank: int, layout: str = "load_balanced",
                   dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (a copy when the layout is not one slice)."""
    parts = [x.narrow(dim, s, e - s) for s, e in chunk_ranges(x.shape[dim], cp_size, rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def join_from_ranks(parts: Sequence[torch.Tensor], layout: str = "load_balanced", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_for_rank`: the full sequence from every rank's part (rank order)."""
    cp_size = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    out = parts[0].new_empty(*parts[0].shape[:dim], seq_len, *parts[0].shape[dim + 1:])
    for rank, part in enumerate(parts):
        offset = 0
        for s, e in chunk_ranges(seq_len, cp_size, rank, layout):
            out.narrow(dim, s, e - s).copy_(part.narrow(dim, offset, e - s))
            offset += e - s
    return out
