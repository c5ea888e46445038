"""Context parallelism for NSA: a sequence split over CP ranks.

Built so far: the sequence layouts (:mod:`.layout`) and the log-sum-exp merge of partial results (:mod:`.merge`).
The ring / all-gather exchange of compressed tokens and selected blocks is still to come (see docs/status.md).
"""
from .layout import (LAYOUTS, check_sequence_length, chunk_ranges, join_from_ranks, local_positions,
                     split_for_rank)
from .merge import merge_partial

__all__ = ["LAYOUTS", "check_sequence_length", "chunk_ranges", "join_from_ranks", "local_positions",
           "merge_partial", "split_for_rank"]
