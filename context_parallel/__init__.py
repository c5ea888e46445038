"""Context parallelism for NSA: one sequence split over the ranks of a CP group.

:func:`nsa_attention_cp` is the entry; :mod:`.layout` owns the split (Megatron's load-balanced one by default),
:mod:`.comm` the differentiable exchanges (halos, all-gathers), :mod:`.merge` the log-sum-exp merge.
"""
from .attention import SELECTION_EXCHANGES, check_cp_config, nsa_attention_cp, shortest_cp_sequence
from .comm import CPShard
from .layout import (LAYOUTS, check_sequence_length, chunk_ranges, join_from_ranks, local_positions,
                     split_for_rank)
from .merge import merge_partial

__all__ = ["CPShard", "LAYOUTS", "SELECTION_EXCHANGES", "check_cp_config", "check_sequence_length", "chunk_ranges",
           "join_from_ranks", "local_positions", "merge_partial", "nsa_attention_cp", "shortest_cp_sequence",
           "split_for_rank"]
