"""NSA over a sequence split across context-parallel ranks.

Per layer and rank (``P`` ranks, ``C`` chunks of ``c`` tokens; ``load_balanced``: 2 chunks per rank):

1. Selection K/V start moving at entry (``allgather``: one async all-gather, hidden behind everything up to the
   selected branch), or go around the ring during the selected branch (``ring``: :mod:`.ring`, less memory).
2. Halos: each chunk receives the last ``l - d`` compressed-branch tokens and ``w - 1`` window tokens of the chunk
   before it (point to point, from whichever rank holds it); gradients go back the same way.
3. Compression: each rank compresses the blocks that *end* in its chunks (``c / d`` per chunk; the first chunk's
   ``l/d - 1`` fewer), so no block is computed twice; the compressed tokens (``T/d`` in all) are all-gathered.
4. Per local chunk, at its global offset: compressed attention + scores + top-n (global block ids), the window
   over halo + chunk, the selected branch over the gathered selection K/V, the gate.

The backward of each exchange returns gradients to the owners (reduce-scatter for the gathers).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..kernels.config import NSAConfig
from ..kernels.interface import _check_inputs, check_triton_config, nsa_attention
from ..kernels.varlen import host_values
from . import branches
from .comm import CPShard, all_gather_sequence, exchange_halos, gather_start, gather_wait
from .layout import check_sequence_length, num_chunks
from .ring import ring_selected_attention

SELECTION_EXCHANGES = ("allgather", "ring")


def _halo(config: NSAConfig) -> int:
    """Tokens a chunk takes from the chunk before it: the window's and the compressed blocks' overlap."""
    return max(config.window - 1, config.compress_block - config.compress_stride)


def shortest_cp_sequence(cp_size: int, layout: str, config: NSAConfig) -> int:
    """The shortest sequence :func:`check_cp_config` accepts: every chunk a whole number of selection blocks that
    covers the halo."""
    chunk = config.select_block * max(1, -(-_halo(config) // config.select_block))
    return num_chunks(cp_size, layout) * chunk


def check_cp_config(seq_len: int, cp_size: int, layout: str, config: NSAConfig) -> int:
    """Chunk length of a valid split, or a ValueError naming what to change."""
    chunk = check_sequence_length(seq_len, cp_size, layout, config)
    halo = _halo(config)
    if chunk < halo:
        raise ValueError(
            f"context parallelism: each of the chunks of {chunk} tokens (sequence {seq_len} over "
            f"context_parallel_size={cp_size}, layout {layout!r}) must be at least the halo it sends its "
            f"neighbour, max(window - 1, compress_block - compress_stride) = {halo} tokens; use a longer sequence "
            f"or fewer CP ranks")
    return chunk


def nsa_attention_cp(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                     v_slc: torch.Tensor, k_swa: torch.Tensor, v_swa: torch.Tensor, gate: torch.Tensor, *,
                     compress_k: Callable, compress_v: Callable, cp_group, config: Optional[NSAConfig] = None,
                     scale: Optional[float] = None, layout: str = "load_balanced", backend: str = "reference",
                     selection_exchange: str = "allgather", cu_seqlens: Optional[torch.Tensor] = None,
                     cu_seqlens_whole: Optional[torch.Tensor] = None, return_block_indices: bool = False):
    """:func:`nsa_parallel.kernels.nsa_attention` for this rank's part of a sequence split over ``cp_group``.

    ``cp_group=None`` (or a group of one) is plain single-GPU NSA. Every tensor is this rank's tokens
    ``[b, t_local, h, d]`` as :func:`split_for_rank` lays them out (``layout``), ``t_local = T / P``; returns
    this rank's ``[b, t_local, hq, dv]``, equal to slicing the single-GPU output of the whole sequence.

    Packed batches: ``cu_seqlens`` are the whole sequences' boundaries (as Megatron's ``PackedSeqParams`` carry
    them under CP); the ``[1, total / P, h, d]`` inputs hold, sequence after sequence, this rank's chunks of each
    sequence split by ``layout`` on its own (what TE's ``thd_get_partitioned_indices`` hands a rank). Every
    sequence must satisfy :func:`check_cp_config` by itself.

    ``cu_seqlens_whole``: sequences this rank holds whole (short documents are cheaper kept on one rank than padded
    to split): their bounds in the tokens after the split sequences' chunks (``cu_seqlens_whole[0] == 0``); they
    are plain packed NSA with no exchange. ``cu_seqlens`` may then be None or ``[0]`` (nothing split), and the
    ranks' ``t_local`` may differ.

    ``return_block_indices``: also this rank's ``[b, t_local, hkv, n]`` selected blocks (global block ids; in a
    packed batch each sequence's own).
    """
    config = config if config is not None else NSAConfig()
    _check_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate, None, backend)
    if backend == "triton":
        check_triton_config(config)
    if selection_exchange not in SELECTION_EXCHANGES:
        raise ValueError(f"selection_exchange={selection_exchange!r}; allowed: {', '.join(SELECTION_EXCHANGES)}")
    if selection_exchange == "ring" and backend != "triton":
        raise ValueError(f"selection_exchange='ring' runs the Triton kernels (backend='triton'), got "
                         f"backend={backend!r}; use selection_exchange='allgather' with the reference")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cp_size = 1 if cp_group is None else torch.distributed.get_world_size(cp_group)
    opts = dict(compress_k=compress_k, compress_v=compress_v, cp_group=cp_group, config=config, scale=scale,
                layout=layout, backend=backend, selection_exchange=selection_exchange,
                return_block_indices=return_block_indices)
    if cu_seqlens_whole is not None:
        return _split_and_whole(q, (k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate), cu_seqlens, cu_seqlens_whole,
                                cp_size, opts)
    if cp_size == 1:
        return nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate, compress_k=compress_k,
                             compress_v=compress_v, config=config, scale=scale, backend=backend,
                             cu_seqlens=cu_seqlens, return_block_indices=return_block_indices)
    if cu_seqlens is not None:
        return _packed(q, (k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gate), cu_seqlens, cp_size, opts)
    t_local, dk = q.shape[1], q.shape[-1]
    shard = CPShard.create(cp_group, t_local * cp_size, layout)
    c = check_cp_config(shard.seq_len, cp_size, layout, config)
    cb, d = config.compress_block, config.compress_stride

    if selection_exchange == "allgather":
        kv_slc = gather_start(torch.cat([k_slc, v_slc], dim=-1), shard)  # hidden behind steps 2-4

    halos = exchange_halos(shard, (cb - d, cb - d, config.window - 1, config.window - 1), k_cmp, v_cmp, k_swa, v_swa)
    cmp_parts = []
    for i, g in enumerate(shard.chunks):
        sl = slice(i * c, (i + 1) * c)
        kc = compress_k(torch.cat([halos[i][0], k_cmp[:, sl]], dim=1))
        vc = compress_v(torch.cat([halos[i][1], v_cmp[:, sl]], dim=1))
        kvc = torch.cat([kc, vc], dim=-1)
        if g == 0:  # the sequence's first chunk has l/d - 1 fewer blocks: pad to c/d, stripped after the gather
            kvc = torch.nn.functional.pad(kvc, (0, 0, 0, 0, c // d - kvc.shape[1], 0))
        cmp_parts.append(kvc)
    kvc = all_gather_sequence(torch.cat(cmp_parts, dim=1), shard, c // d)[:, cb // d - 1:]
    # contiguous once here, not in every chunk's kernel call
    k_cmp_g, v_cmp_g = kvc[..., :dk].contiguous(), kvc[..., dk:].contiguous()

    combine = _gate_combine(backend)
    per_chunk = []
    for i, g in enumerate(shard.chunks):
        sl = slice(i * c, (i + 1) * c)
        q_i = q[:, sl]
        o_cmp, idx = branches.compressed_and_select(q_i, k_cmp_g, v_cmp_g, config, scale, g * c, backend)
        kw = torch.cat([halos[i][2], k_swa[:, sl]], dim=1)
        vw = torch.cat([halos[i][3], v_swa[:, sl]], dim=1)
        o_swa = branches.window(q_i, kw, vw, config, scale, halos[i][2].shape[1], backend)
        per_chunk.append((q_i, o_cmp, idx, o_swa))

    if selection_exchange == "ring":
        o_slc = ring_selected_attention(q, k_slc, v_slc, [p[2] for p in per_chunk], shard, config.select_block,
                                        scale)
        o_slc = [o_slc[:, i * c:(i + 1) * c] for i in range(len(per_chunk))]
    else:
        kv_g = gather_wait(*kv_slc, shard, c)
        k_g, v_g = kv_g[..., :dk].contiguous(), kv_g[..., dk:].contiguous()
        o_slc = [branches.selected(q_i, k_g, v_g, idx, config, scale, g * c, 0, backend)[0]
                 for g, (q_i, _, idx, _) in zip(shard.chunks, per_chunk)]
    outs = [combine(o_cmp, o_s, o_swa, gate[:, i * c:(i + 1) * c])
            for i, ((_, o_cmp, _, o_swa), o_s) in enumerate(zip(per_chunk, o_slc))]
    if return_block_indices:
        return torch.cat(outs, dim=1), torch.cat([p[2] for p in per_chunk], dim=1)
    return torch.cat(outs, dim=1)


def _packed(q, rest, cu_seqlens, cp_size: int, kw) -> torch.Tensor:
    """Each packed sequence on its own (the exchanges run per sequence, in the same order on every rank)."""
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need b == 1 ([1, total / P, h, d] inputs), got b={q.shape[0]}")
    bounds = host_values(cu_seqlens)
    if bounds[-1] != q.shape[1] * cp_size:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} tokens but the {cp_size} ranks hold {q.shape[1]} x "
                         f"{cp_size} = {q.shape[1] * cp_size}: cu_seqlens must give the whole sequences' bounds")
    outs = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        try:
            check_cp_config(e - s, cp_size, kw["layout"], kw["config"])
        except ValueError as err:
            raise ValueError(f"packed sequence {i} (tokens {s}..{e}): {err}") from None
        sl = slice(s // cp_size, e // cp_size)
        outs.append(nsa_attention_cp(q[:, sl], *[x[:, sl] for x in rest], **kw))
    return _joined(outs, kw["return_block_indices"])


def _joined(outs, with_indices: bool):
    """The parts' outputs (and block indices) one after another along the tokens."""
    if not with_indices:
        return torch.cat(outs, dim=1)
    return torch.cat([o for o, _ in outs], dim=1), torch.cat([i for _, i in outs], dim=1)


def _split_and_whole(q, rest, cu_seqlens, cu_seqlens_whole, cp_size: int, kw) -> torch.Tensor:
    """The split sequences' chunks first (exchanges over the group), then this rank's whole sequences (local)."""
    split = 0 if cu_seqlens is None else host_values(cu_seqlens)[-1] // cp_size
    whole = host_values(cu_seqlens_whole)
    if whole[0] != 0 or split + whole[-1] != q.shape[1] or not q.shape[1]:
        raise ValueError(f"cu_seqlens_whole={whole} must start at 0 and end at the {q.shape[1] - split} tokens this "
                         f"rank holds after its {split} tokens of split sequences (every rank at least one token)")
    outs = []
    if split:
        outs.append(nsa_attention_cp(q[:, :split], *[x[:, :split] for x in rest], cu_seqlens=cu_seqlens, **kw))
    if whole[-1]:
        local = ("compress_k", "compress_v", "config", "scale", "backend", "return_block_indices")
        outs.append(nsa_attention(q[:, split:], *[x[:, split:] for x in rest], cu_seqlens=cu_seqlens_whole,
                                  **{k: kw[k] for k in local}))
    return _joined(outs, kw["return_block_indices"])


def _gate_combine(backend: str):
    if backend == "reference":
        from ..kernels.reference import gate_combine
    else:
        from ..kernels.gate import gate_combine
    return gate_combine
