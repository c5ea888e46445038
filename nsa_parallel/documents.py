"""Document masking: a sample's documents as a packed batch, on one rank or spread over context-parallel ranks.

A sample holds documents ending with the EOD token; attention (and RoPE) stays within each. On one rank the sample
is a packed (THD) batch of its documents. Under context parallelism (``P`` ranks) a document is either

- **split**: padded at its end and cut by the load-balanced layout on its own (2P chunks, TE's THD layout), its
  chunks exchanging halos and compressed / selection tokens with the other ranks, or
- **whole**: kept on one rank, with no exchange at all.

A split document must be at least :func:`cp_document_lengths`' ``least`` tokens (every chunk covers the halo:
2P x 512 at the paper's window), so splitting a 300-token document would compute 2P x 512 tokens; kept whole it
computes 300 on one rank. :func:`plan_cp_documents` splits every document of at least ``least`` tokens and places
the shorter ones to even out the ranks' token counts (the ranks wait for each other at every split document's
exchanges), splitting the longest short ones only where that evens them out better.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

# what a padding token holds, per batch key (it is never in the loss: its loss_mask is 0); None: the EOD id
_PAD_FILL = {"tokens": None, "labels": None, "loss_mask": 0, "position_ids": 0}


def document_bounds(tokens: torch.Tensor, eod: int) -> List[int]:
    """``[0, end_1, ..., s]`` on the host (one device-to-host read): a document of ``tokens`` ``[1, s]`` ends after
    each ``eod``; a trailing partial document ends at ``s``."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"document masking packs one sample per micro-batch: tokens must be [1, s], got "
                         f"{list(tokens.shape)} (--micro-batch-size 1)")
    s = tokens.shape[1]
    ends = ((tokens[0] == eod).nonzero().flatten() + 1).tolist()
    return [0] + [e for e in ends if e < s] + [s]


@dataclass
class CPDocumentParams(PackedSeqParams):
    """Megatron's ``PackedSeqParams`` for :func:`documents_on_cp_rank`'s layout: the THD fields describe the
    documents split over the CP ranks; ``cu_seqlens_whole`` the documents this rank holds whole after them;
    ``positions`` / ``real`` ``[t_local]`` each row's position in its document and whether it is a document's token
    (not padding). Only NSA's attention reads the extra fields (TE's attention would ignore them)."""

    cu_seqlens_whole: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    real: Optional[torch.Tensor] = None


def _packed_params(cu: torch.Tensor, longest: int, cu_padded: Optional[torch.Tensor] = None, **extra):
    cls = CPDocumentParams if extra else PackedSeqParams
    # one tensor for q and kv: NSA checks that they are the same without reading them
    return cls(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
               cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest, **extra)


def document_packed_seq_params(tokens: torch.Tensor, eod: int):
    """Megatron ``PackedSeqParams`` (THD) for one sample whose documents end with the ``eod`` token, so that
    attention (and RoPE, which restarts with every sequence in THD) stays within each document.

    ``tokens`` ``[1, s]``: a document ends after each ``eod``; a trailing partial document ends at ``s``."""
    from .kernels.varlen import cu_seqlens_from_host
    bounds = document_bounds(tokens, eod)
    # made from the host values: NSA's kernels find them cached with the tensor instead of syncing again
    return _packed_params(cu_seqlens_from_host(bounds, tokens.device), max(b - a for a, b in zip(bounds, bounds[1:])))


def cp_document_lengths(cp_size: int, config) -> Tuple[int, int]:
    """``(multiple, least)``: under context parallelism a split document is padded to a multiple of
    ``2 x cp_size`` selection blocks and to at least ``least`` tokens (each of its chunks must cover the halo it
    hands its neighbour), so that it splits over the CP ranks on its own (:func:`documents_on_cp_rank`)."""
    from .context_parallel import shortest_cp_sequence
    from .context_parallel.layout import num_chunks
    return (num_chunks(cp_size, "load_balanced") * config.select_block,
            shortest_cp_sequence(cp_size, "load_balanced", config))


@dataclass(frozen=True)
class CPDocumentPlan:
    """Where a sample's documents go under CP: ``split`` ``(start, end, padded length)`` over every rank, in
    sample order; ``whole[r]`` the ``(start, end)`` documents rank ``r`` holds whole, in sample order, followed by
    ``pad[r]`` padding tokens (a whole number of selection blocks per rank for sequence parallelism, and at least
    one token on every rank)."""

    length: int
    cp_size: int
    split: Tuple[Tuple[int, int, int], ...]
    whole: Tuple[Tuple[Tuple[int, int], ...], ...]
    pad: Tuple[int, ...]

    def split_tokens(self) -> int:
        """Tokens of split documents on every rank."""
        return sum(p for _, _, p in self.split) // self.cp_size

    def tokens(self, rank: int) -> int:
        """Tokens rank ``rank`` computes."""
        return self.split_tokens() + sum(e - s for s, e in self.whole[rank]) + self.pad[rank]

    def computed(self) -> int:
        """Tokens computed on all ranks together (``length`` of them real)."""
        return sum(self.tokens(r) for r in range(self.cp_size))


def _place(lengths: Sequence[int], cp_size: int) -> Tuple[List[int], List[int]]:
    """Longest first, each onto the rank with the fewest tokens so far (lowest rank on ties): ``(rank of each,
    tokens per rank)``. ``lengths`` come sorted longest first."""
    heap, ranks = [(0, r) for r in range(cp_size)], []
    for n in lengths:
        load, r = heapq.heappop(heap)
        ranks.append(r)
        heapq.heappush(heap, (load + n, r))
    loads = [0] * cp_size
    for load, r in heap:
        loads[r] = load
    return ranks, loads


def plan_cp_documents(bounds: Sequence[int], cp_size: int, config) -> CPDocumentPlan:
    """Split or keep whole each document of ``bounds`` (:func:`document_bounds`) over ``cp_size`` ranks.

    Documents of at least ``least`` tokens are split (padded to ``multiple``; see :func:`cp_document_lengths`).
    Of the shorter ones, the ``k`` longest are split too (each padded to ``least``) and the rest placed whole,
    longest first onto the rank with the fewest tokens; ``k`` (tried: 0, powers of 2, all) minimises the largest
    rank's token count, the fewest splits on ties (``k`` = all is every document split: the busiest rank never
    computes more than then, but for its up to one select block of padding). The plan depends only on ``bounds``: every rank of the group makes the same one, so
    the split documents' exchanges line up."""
    multiple, least = cp_document_lengths(cp_size, config)
    docs = list(zip(bounds[:-1], bounds[1:]))
    split = [(s, e, -(-(e - s) // multiple) * multiple) for s, e in docs if e - s >= least]
    short = sorted((d for d in docs if d[1] - d[0] < least), key=lambda d: (d[0] - d[1], d[0]))
    base = sum(p for _, _, p in split) // cp_size
    tries = sorted({0, len(short)} | {1 << i for i in range(len(short).bit_length()) if 1 << i < len(short)})
    best = None
    for k in tries:
        ranks, loads = _place([e - s for s, e in short[k:]], cp_size)
        largest = base + k * least // cp_size + max(loads)
        if best is None or largest < best[0]:
            best = (largest, k, ranks)
    _, k, ranks = best
    split = sorted(split + [(s, e, least) for s, e in short[:k]])
    whole = [sorted(d for d, r in zip(short[k:], ranks) if r == rank) for rank in range(cp_size)]
    block = config.select_block
    plan = CPDocumentPlan(bounds[-1], cp_size, tuple(split), tuple(tuple(w) for w in whole), (0,) * cp_size)
    pad = []
    for rank, w in enumerate(whole):
        n = sum(e - s for s, e in w)
        pad.append(-n % block if plan.tokens(rank) else block)
    return CPDocumentPlan(plan.length, cp_size, plan.split, plan.whole, tuple(pad))


def documents_on_cp_rank(batch: Dict[str, torch.Tensor], eod: int, plan: CPDocumentPlan, cp_rank: int):
    """This context-parallel rank's part of one sample under document masking, and its params.

    ``batch``: the whole sample's ``[1, s]`` tensors (:data:`_PAD_FILL`'s keys); ``plan``: from
    :func:`plan_cp_documents`. The rank's ``[1, t_local]`` tensors hold its two chunks of each split document
    (padded at its end: padding after a document's last token changes no real token's output under causal
    attention, and its loss mask is 0), document after document (TE's THD layout, which :func:`nsa_attention_cp`
    and Megatron's THD RoPE take), then its whole documents, then its padding. Returns :class:`CPDocumentParams`:
    ``cu_seqlens_q`` / ``cu_seqlens_q_padded`` the split documents' real and padded bounds (whole-sequence
    offsets), ``cu_seqlens_whole`` the whole documents' bounds in the rank's tokens after the split part (the
    padding in the last), ``positions`` every row's position in its document (RoPE of the whole ones, NSA's
    statistics) and ``real`` which rows are not padding.
    ``t_local`` varies from sample to sample and from rank to rank."""
    from .context_parallel import chunk_ranges
    from .kernels.varlen import cu_seqlens_from_host
    unknown = sorted(set(batch) - set(_PAD_FILL))
    if unknown:
        raise ValueError(f"document masking under context parallelism pads the batch keys {sorted(_PAD_FILL)}; got "
                         f"also {unknown}")
    tokens = batch["tokens"]
    if tokens.shape != (1, plan.length):
        raise ValueError(f"the plan is for a sample of {plan.length} tokens; tokens are {list(tokens.shape)}")
    # runs of consecutive sample tokens (document start, run start, run length, document end): padding lies past
    # the document's end
    split_runs, cu, cu_padded = [], [0], [0]
    for s, e, padded in plan.split:
        split_runs += [(s, s + a, b - a, e) for a, b in chunk_ranges(padded, plan.cp_size, cp_rank, "load_balanced")]
        cu.append(cu[-1] + e - s)
        cu_padded.append(cu_padded[-1] + padded)
    whole, pad = plan.whole[cp_rank], plan.pad[cp_rank]
    # the rank's padding closes its last whole document, or with none is a sequence of its own
    whole_runs = [(s, s, e - s, e) for s, e in whole] or ([(0, 0, 0, 0)] if pad else [])
    if pad:
        d, s, n, e = whole_runs[-1]
        whole_runs[-1] = (d, s, n + pad, e)
    cu_whole = torch.tensor([0] + [n for _, _, n, _ in whole_runs]).cumsum(0).tolist()
    src, starts, ends = _gather_runs(split_runs + whole_runs)
    real = src < ends
    device = tokens.device
    padding = (~real)[None].to(device)
    local = {k: v[:, src.clamp(max=tokens.shape[1] - 1).to(device)].masked_fill(
        padding, eod if _PAD_FILL[k] is None else _PAD_FILL[k]) for k, v in batch.items()}
    longest = max(b - a for seqs in (cu_padded, cu_whole) for a, b in zip(seqs, seqs[1:]))
    return local, _packed_params(
        cu_seqlens_from_host(cu, device), longest, cu_seqlens_from_host(cu_padded, device),
        cu_seqlens_whole=cu_seqlens_from_host(cu_whole, device), positions=(src - starts).to(device),
        real=real.to(device))


def _gather_runs(runs: Sequence[Tuple[int, int, int, int]]) -> Tuple[torch.Tensor, ...]:
    """``(src, starts, ends)`` per row of the runs ``(document start, run start, length, document end)`` laid one
    after another: the sample token it holds (past ``ends`` for padding), its document's start and end."""
    docs, starts, lengths, ends = (torch.tensor(x, dtype=torch.long) for x in zip(*runs))
    offsets = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    return (starts.repeat_interleave(lengths) + offsets, docs.repeat_interleave(lengths),
            ends.repeat_interleave(lengths))
