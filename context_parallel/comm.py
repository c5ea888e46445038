"""Differentiable exchanges between context-parallel ranks: halos from the previous chunk and sequence all-gathers.

Every op takes a :class:`CPShard` (which chunks this rank holds, of which sequence, in which process group) and is
an autograd function whose backward sends the gradients back to the tokens' owners. Tensors are ``[b, t, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .layout import chunk_ranges, num_chunks


@dataclass(frozen=True)
class CPShard:
    """This rank's place in a sequence split over a CP group: global chunk ids held (in local order), chunk length.

    ``group`` is the CP process group (Megatron's ``get_context_parallel_group()`` or a module's
    ``pg_collection.cp``), passed in, never looked up here.
    """
    group: Optional[dist.ProcessGroup]
    cp_size: int
    rank: int
    layout: str
    seq_len: int

    @classmethod
    def create(cls, group, seq_len: int, layout: str) -> "CPShard":
        return cls(group, dist.get_world_size(group), dist.get_rank(group), layout, seq_len)

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.cp_size, self.layout)

    @property
    def chunk(self) -> int:
        return self.seq_len // self.num_chunks

    def chunks_of(self, rank: int) -> List[int]:
        return [s // self.chunk for s, _ in chunk_ranges(self.seq_len, self.cp_size, rank, self.layout)]

    @property
    def chunks(self) -> List[int]:
        return self.chunks_of(self.rank)

    def owner(self, chunk_id: int) -> int:
        for r in range(self.cp_size):
            if chunk_id in self.chunks_of(r):
                return r
        raise ValueError(f"chunk {chunk_id} is outside the {self.num_chunks} chunks")

    def peer(self, rank: int) -> int:
        """Global rank of CP rank ``rank`` (P2P ops address global ranks)."""
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


def _p2p(shard: CPShard, sends, recvs) -> None:
    """Run ``sends`` ``[(cp_rank, tag, tensor)]`` and ``recvs`` (same, filled in place) as one batch; pairs with
    this rank itself are copies."""
    local = {tag: t for r, tag, t in sends if r == shard.rank}
    ops = [dist.P2POp(dist.isend, t.contiguous(), shard.peer(r), shard.group, tag) for r, tag, t in sends
           if r != shard.rank]
    ops += [dist.P2POp(dist.irecv, t, shard.peer(r), shard.group, tag) for r, tag, t in recvs if r != shard.rank]
    for r, tag, t in recvs:
        if r == shard.rank:
            t.copy_(local[tag])
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Halo(torch.autograd.Function):
    """The last ``lengths[j]`` tokens of the previous chunk of every local chunk, for each tensor ``xs[j]``."""

    @staticmethod
    def forward(ctx, shard: CPShard, lengths: Sequence[int], *xs):
        c, ids, nc = shard.chunk, shard.chunks, shard.num_chunks
        sends, recvs, out = [], [], []
        for i, g in enumerate(ids):
            for j, (x, n) in enumerate(zip(xs, lengths)):
                if g + 1 < nc:
                    sends.append((shard.owner(g + 1), (g + 1) * len(xs) + j, x[:, (i + 1) * c - n:(i + 1) * c]))
                h = x.new_empty(x.shape[0], n if g > 0 else 0, *x.shape[2:])
                if g > 0:
                    recvs.append((shard.owner(g - 1), g * len(xs) + j, h))
                out.append(h)
        _p2p(shard, sends, recvs)
        ctx.shard, ctx.lengths = shard, lengths
        ctx.shapes = [(x.shape, x.dtype, x.device) for x in xs]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        shard, lengths = ctx.shard, ctx.lengths
        c, ids, nc, m = shard.chunk, shard.chunks, shard.num_chunks, len(lengths)
        dxs = [torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.shapes]
        sends, recvs, back = [], [], []
        for i, g in enumerate(ids):
            for j, n in enumerate(lengths):
                if g > 0:
                    grad = grads[i * m + j]
                    sends.append((shard.owner(g - 1), g * m + j, grad if grad is not None else
                                  dxs[j].new_zeros(dxs[j].shape[0], n, *dxs[j].shape[2:])))
                if g + 1 < nc:
                    buf = dxs[j].new_empty(dxs[j].shape[0], n, *dxs[j].shape[2:])
                    recvs.append((shard.owner(g + 1), (g + 1) * m + j, buf))
                    back.append((j, (i + 1) * c - n, buf))
        _p2p(shard, sends, recvs)
        for j, start, buf in back:
            dxs[j][:, start:start + buf.shape[1]] += buf
        return (None, None, *dxs)


def exchange_halos(shard: CPShard, lengths: Sequence[int], *xs: torch.Tensor) -> List[List[torch.Tensor]]:
    """``halos[i][j]``: the ``lengths[j]`` tokens of ``xs[j]`` just before local chunk ``i`` (empty for the
    sequence's first chunk). Every length must be at most the chunk length."""
    flat = _Halo.apply(shard, tuple(lengths), *xs)
    m = len(xs)
    return [list(flat[i * m:(i + 1) * m]) for i in range(len(shard.chunks))]


# torch 2.13 renamed the tensor collectives (the old names warn); the device's 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GatherHandle:
    """An all-gather in flight: :func:`gather_start` returns it, :func:`gather_wait` finishes it. In the backward
    it carries the reduce-scatter of the gathered tensor's gradient from :func:`gather_wait`'s backward (which
    starts it) to :func:`gather_start`'s (which waits for it)."""
    work = None
    grad_work = None
    grad_out = None


OVERLAP_GRAD_REDUCE_SCATTER = True  # start the gradient reduce-scatter as soon as it is complete (see _GatherWait)


def _reorder(buf: torch.Tensor, shard: CPShard, per_chunk: int, inverse: bool = False) -> torch.Tensor:
    """``[P, b, n_local * m, ...]`` in rank order <-> ``[b, num_chunks * m, ...]`` in sequence order."""
    m = per_chunk
    if not inverse:
        parts = [None] * shard.num_chunks
        for r in range(shard.cp_size):
            for i, g in enumerate(shard.chunks_of(r)):
                parts[g] = buf[r, :, i * m:(i + 1) * m]
        return torch.cat(parts, dim=1)
    per_rank = [torch.cat([buf[:, g * m:(g + 1) * m] for g in shard.chunks_of(r)], dim=1)
                for r in range(shard.cp_size)]
    return torch.stack(per_rank)


class _GatherStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard: CPShard, handle: GatherHandle):
        x = x.contiguous()
        buf = x.new_empty(shard.cp_size * x.shape[0], *x.shape[1:])  # rank-major, as every backend takes it
        handle.work = _all_gather(buf, x, group=shard.group, async_op=True)
        ctx.shard, ctx.handle = shard, handle
        return buf

    @staticmethod
    def backward(ctx, gbuf):
        # every rank's copy of a token got gradient from its own queries: the owner takes the sum
        h = ctx.handle
        if h.grad_work is not None:  # started by _GatherWait.backward; other backward work ran meanwhile
            h.grad_work.wait()
            out, h.grad_work, h.grad_out = h.grad_out, None, None
            return out, None, None
        out = gbuf.new_empty(gbuf.shape[0] // ctx.shard.cp_size, *gbuf.shape[1:])
        _reduce_scatter(out, gbuf.contiguous(), group=ctx.shard.group)
        return out, None, None


class _GatherWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, shard: CPShard, handle: GatherHandle, per_chunk: int):
        handle.work.wait()
        handle.work = None  # done: the graph that keeps the handle alive need not keep gloo's / NCCL's work object
        ctx.shard, ctx.handle, ctx.per_chunk = shard, handle, per_chunk
        return _reorder(buf.view(shard.cp_size, -1, *buf.shape[1:]), shard, per_chunk)

    @staticmethod
    def backward(ctx, grad):
        gbuf = _reorder(grad, ctx.shard, ctx.per_chunk, inverse=True).flatten(0, 1).contiguous()
        if OVERLAP_GRAD_REDUCE_SCATTER:
            # The gradient is complete here, but autograd reaches _GatherStart.backward only after every node
            # recorded after the gather started (at layer entry for the selection K/V: the compressed and window
            # branches' backward, phi's): start the reduce-scatter now so that it runs behind them.
            h = ctx.handle
            h.grad_out = gbuf.new_empty(gbuf.shape[0] // ctx.shard.cp_size, *gbuf.shape[1:])
            h.grad_work = _reduce_scatter(h.grad_out, gbuf, group=ctx.shard.group, async_op=True)
        return gbuf, None, None, None


def gather_start(x: torch.Tensor, shard: CPShard):
    """Start gathering every rank's ``x [b, t_local, ...]``; returns ``(buffer, handle)`` for :func:`gather_wait`.
    Work queued in between overlaps the transfer."""
    handle = GatherHandle()
    return _GatherStart.apply(x, shard, handle), handle


def gather_wait(buf: torch.Tensor, handle: GatherHandle, shard: CPShard, per_chunk: int) -> torch.Tensor:
    """The whole sequence ``[b, num_chunks * per_chunk, ...]`` in order; its backward reduce-scatters."""
    return _GatherWait.apply(buf, shard, handle, per_chunk)


def all_gather_sequence(x: torch.Tensor, shard: CPShard, per_chunk: int) -> torch.Tensor:
    buf, handle = gather_start(x, shard)
    return gather_wait(buf, handle, shard, per_chunk)
