"""NSA hyperparameters (paper defaults) and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

GATE_ACTIVATIONS = ("sigmoid", "softmax")


class NSAConfigError(ValueError):
    """A hyperparameter of :class:`NSAConfig` has a value NSA cannot run with."""


@dataclass(frozen=True)
class NSAConfig:
    """Every hyperparameter of Native Sparse Attention (arXiv 2502.11089), with the paper's defaults.

    Token blocks are 0-indexed: compressed block ``i`` covers tokens ``[i*stride, i*stride + compress_block)``,
    selection block ``j`` covers ``[j*select_block, (j+1)*select_block)``.
    """

    compress_block: int = field(
        default=32,
        metadata={"help": 'l: tokens per compressed block.'})
    compress_stride: int = field(
        default=16,
        metadata={"help": 'd: distance between the starts of consecutive compressed blocks.'})
    select_block: int = field(
        default=64,
        metadata={"help": "l': tokens per selection block."})
    select_topn: int = field(
        default=16,
        metadata={"help": 'n: selection blocks attended per query (including the forced ones).'})
    select_initial: int = field(
        default=1,
        metadata={"help": 'selection blocks at the start of the sequence that every query always selects.'})
    select_local: int = field(
        default=2,
        metadata={"help": "most recent selection blocks (the query's own and the ones before it) always selected."})
    window: int = field(
        default=512,
        metadata={"help": 'w: sliding-window size; query t sees keys t-w+1 .. t.'})
    gate_activation: str = field(
        default="sigmoid",
        metadata={"help": "how per-head gate logits become branch weights: 'sigmoid' (paper) or 'softmax' "
                          "over the 3 branches."})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool)):
                raise NSAConfigError(f"NSAConfig.{f.name} must be an int, got {value!r}")
        for name in ("compress_block", "compress_stride", "select_block", "select_topn", "window"):
            if getattr(self, name) < 1:
                raise NSAConfigError(f"NSAConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("select_initial", "select_local"):
            if getattr(self, name) < 0:
                raise NSAConfigError(f"NSAConfig.{name}={getattr(self, name)} must be >= 0")
        if self.compress_block % self.compress_stride:
            raise NSAConfigError(
                f"NSAConfig.compress_block={self.compress_block} must be a multiple of "
                f"compress_stride={self.compress_stride} (allowed: {self.compress_stride}, "
                f"{2 * self.compress_stride}, {3 * self.compress_stride}, ...)")
        if self.select_block % self.compress_stride:
            raise NSAConfigError(
                f"NSAConfig.select_block={self.select_block} must be a multiple of "
                f"compress_stride={self.compress_stride} (allowed: {self.compress_stride}, "
                f"{2 * self.compress_stride}, {3 * self.compress_stride}, ...)")
        if self.select_local < 1:
            # The query's own block holds its causal diagonal; without it a query could attend to nothing.
            raise NSAConfigError(f"NSAConfig.select_local={self.select_local} must be >= 1 (the query's own block)")
        forced = self.select_initial + self.select_local
        if self.select_topn < forced:
            raise NSAConfigError(
                f"NSAConfig.select_topn={self.select_topn} must be >= select_initial + select_local = {forced} "
                f"(the forced blocks); allowed: {forced} or more")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise NSAConfigError(
                f"NSAConfig.gate_activation={self.gate_activation!r}; allowed: {', '.join(GATE_ACTIVATIONS)}")

    @property
    def stride_slots_per_compress_block(self) -> int:
        return self.compress_block // self.compress_stride

    @property
    def stride_slots_per_select_block(self) -> int:
        return self.select_block // self.compress_stride

    def num_compressed(self, seqlen: int) -> int:
        """Compressed tokens of a sequence of ``seqlen`` tokens (only whole blocks are compressed)."""
        return num_compressed(seqlen, self.compress_block, self.compress_stride)

    def num_select_blocks(self, seqlen: int) -> int:
        """Selection blocks of a sequence of ``seqlen`` tokens (the last one may be partial)."""
        return -(-seqlen // self.select_block)


def num_compressed(seqlen: int, block: int, stride: int) -> int:
    """Compressed tokens of a sequence of ``seqlen`` tokens, blocks of ``block`` every ``stride`` (whole blocks)."""
    return (seqlen - block) // stride + 1 if seqlen >= block else 0
