"""Selected-block attention with the selection K/V moving around the CP ring (Triton backend).

Forward: ``P`` steps; at step ``s`` a rank holds the K/V of rank ``r - s`` and attends each of its query chunks to
the selected blocks inside each visiting chunk that is not wholly in the chunk's future, merging the partial
results by log-sum-exp in fp32. The send of the next visitor overlaps the step's compute (batched isend/irecv).
Backward: the K/V go around again, each with an fp32 dK/dV accumulator that every rank adds its share to; one
last hop returns the accumulators to their owners. Memory: one visiting K/V (and accumulator) at a time instead
of the whole sequence's, at the price of recomputing nothing but moving the K/V twice.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from ..kernels.flash import row_dot
from ..kernels.select import _SelLaunch, selected_backward, selected_forward
from .comm import CPShard
from .merge import merge_partial


def _shift(shard: CPShard, tensors: List[torch.Tensor]):
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns (received, requests)."""
    nxt, prv = (shard.rank + 1) % shard.cp_size, (shard.rank - 1) % shard.cp_size
    recv = [torch.empty_like(x) for x in tensors]
    ops = [dist.P2POp(dist.isend, x.contiguous(), shard.peer(nxt), shard.group, tag) for tag, x in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, x, shard.peer(prv), shard.group, tag) for tag, x in enumerate(recv)]
    return recv, dist.batch_isend_irecv(ops)


def _steps(shard: CPShard, src: int, q, cur, indices, block: int):
    """The kernel calls of one ring step: ``(rows, keys, q_i, k_j, v_j, launch)`` for every local query chunk and
    visiting chunk (of rank ``src``) with causal work to do."""
    c = shard.chunk
    for i, g in enumerate(shard.chunks):
        for j, h in enumerate(shard.chunks_of(src)):
            if h > g:  # a visiting chunk after the query chunk holds no key any of its queries may see
                continue
            rows, keys = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
            q_i, k_j, v_j = (x.contiguous() for x in (q[:, rows], cur[0][:, keys], cur[1][:, keys]))
            yield rows, keys, i, q_i, k_j, v_j, _SelLaunch(q_i, k_j, v_j, indices[i], block, None, q_offset=g * c,
                                                           k_base=h * c)


class RingSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, shard: CPShard, block: int, scale: float):
        """q ``[b, t_local, hq, dk]``, k / v ``[b, t_local, hkv, d]`` (this rank's chunks), indices per local
        chunk (global block ids). Returns this rank's ``o [b, t_local, hq, dv]``."""
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, t, hq, _ = q.shape
        o = q.new_zeros(b, t, hq, v.shape[-1], dtype=torch.float32)
        lse = q.new_full((b, t, hq), float("-inf"), dtype=torch.float32)
        cur = [k, v]
        for s in range(shard.cp_size):
            src = (shard.rank - s) % shard.cp_size
            nxt, reqs = _shift(shard, cur) if s + 1 < shard.cp_size else (None, [])
            for rows, _, i, q_i, k_j, v_j, L in _steps(shard, src, q, cur, indices, block):
                o_p, lse_p = selected_forward(q_i, k_j, v_j, indices[i], L, scale)
                o[:, rows], lse[:, rows] = merge_partial(o[:, rows], lse[:, rows], o_p, lse_p)
            for req in reqs:
                req.wait()
            cur = nxt
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *indices)
        ctx.shard, ctx.block, ctx.scale = shard, block, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *indices = ctx.saved_tensors
        shard, block, scale = ctx.shard, ctx.block, ctx.scale
        do = do.contiguous()
        delta = row_dot(o, do)
        dq = torch.zeros_like(q, dtype=torch.float32)
        cur = [k, v]
        acc = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for s in range(shard.cp_size):
            src = (shard.rank - s) % shard.cp_size
            nxt, reqs = _shift(shard, cur) if s + 1 < shard.cp_size else (None, [])
            for rows, keys, i, q_i, k_j, v_j, L in _steps(shard, src, q, cur, indices, block):
                dq_p, dk_p, dv_p = selected_backward(q_i, k_j, v_j, indices[i], do[:, rows].contiguous(),
                                                     lse[:, rows].contiguous(), delta[:, rows].contiguous(), L,
                                                     scale, dq_dtype=torch.float32)
                dq[:, rows] += dq_p
                acc[0][:, keys] += dk_p
                acc[1][:, keys] += dv_p
            # the accumulators follow their K/V to the next rank; after the last step this hop takes them home
            acc, acc_reqs = _shift(shard, acc)
            for req in list(reqs) + list(acc_reqs):
                req.wait()
            cur = nxt
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None, None


def ring_selected_attention(q, k, v, indices, shard: CPShard, block: int, scale: float) -> torch.Tensor:
    return RingSelected.apply(q, k, v, list(indices), shard, block, scale)
