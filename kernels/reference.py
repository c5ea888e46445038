"""Plain-PyTorch Native Sparse Attention: the readable definition and the oracle for every kernel.

Shapes follow flash-attention: ``[b, t, h, d]``; packed batches are ``[1, total, h, d]`` with ``cu_seqlens``.
Query head ``h`` reads KV head ``h // G`` with ``G = hq // hkv`` (GQA, as Megatron and flash-attention group heads).
Everything is computed in at least fp32 and returned in the input dtype. The window and selected branches gather
each query's keys (O(t * keys per query) memory); the compressed branch is dense over the t/d compressed tokens.
Use it for tests and small models, the Triton backend for real lengths.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .config import NSAConfig
from .varlen import sequence_bounds


class BranchOutput(NamedTuple):
    o: torch.Tensor
    """``[b, t, hq, dv]`` attention output of the branch."""
    lse: torch.Tensor
    """``[b, t, hq]`` natural-log sum of exp of the scaled scores (-inf where a query sees no key)."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _softmax_attend(s: torch.Tensor, mask: torch.Tensor):
    """Masked softmax of scores ``s [..., K]``: returns ``(p, lse)``; rows with no allowed key give p = 0 and
    lse = -inf, NaN-free in forward and backward."""
    # A finite fill (not -inf) keeps empty rows NaN-free; they are zeroed by the mask.
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)) * mask
    lse = torch.where(mask.any(dim=-1), lse, torch.full_like(lse, float("-inf")))
    return p, lse


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     return_probs: bool = False):
    """Softmax attention of ``q [b,t,hq,dk]`` over all of ``k [b,s,hkv,dk]``, ``v [b,s,hkv,dv]`` where ``mask``
    (bool, broadcastable to ``[b, hkv, t, s]``) allows it. Rows with no allowed key give 0 output and lse -inf.

    Returns ``(o, lse)`` and, if asked, the probabilities ``[b, hq, t, s]`` (zero where masked).
    """
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    cd = _compute_dtype(q)
    qg = q.to(cd).reshape(b, t, hkv, hq // hkv, dk)
    s = torch.einsum("bthgd,bshd->bhgts", qg, k.to(cd)) * scale
    p, lse = _softmax_attend(s, mask.unsqueeze(2))
    o = torch.einsum("bhgts,bshd->bthgd", p, v.to(cd)).reshape(b, t, hq, v.shape[-1])
    out = BranchOutput(o.to(q.dtype), lse.reshape(b, hq, t).transpose(1, 2))
    if return_probs:
        return out, p.reshape(b, hq, t, -1)
    return out


# ---------------------------------------------------------------------------------------------- compressed branch
def compressed_visibility(seqlen: int, num_cmp: int, config: NSAConfig, device=None, q_offset: int = 0):
    """``[t, tc]`` bool: query ``t`` (at position ``t + q_offset``) sees compressed block ``i`` iff the block ends
    at or before it, ``i*d + l - 1 <= t + q_offset``."""
    t = torch.arange(seqlen, device=device)[:, None] + q_offset
    block_end = torch.arange(num_cmp, device=device)[None, :] * config.compress_stride + config.compress_block - 1
    return block_end <= t


def compressed_attention(q, k_cmp, v_cmp, config: NSAConfig, scale: float, return_probs: bool = False,
                         q_offset: int = 0):
    """Attention of every query over the compressed tokens it may see.

    q ``[b, t, hq, dk]`` at positions ``q_offset ..``; k_cmp / v_cmp ``[b, tc, hkv, dk|dv]`` (compressed by phi
    from position 0). Returns ``BranchOutput`` and, if asked, the probabilities ``[b, hq, t, tc]`` that selection
    scores come from.
    """
    vis = compressed_visibility(q.shape[1], k_cmp.shape[1], config, q.device, q_offset)
    return masked_attention(q, k_cmp, v_cmp, vis[None, None], scale, return_probs)


# ----------------------------------------------------------------------------------------------- selection
def block_overlap_weights(num_cmp: int, num_sel: int, config: NSAConfig, device=None) -> torch.Tensor:
    """``[tc, ns]`` weight of compressed block ``i`` in the score of selection block ``j`` (the paper's eq. 9).

    Our reading of eq. 9: cut the sequence into stride slots of ``d`` tokens. Compressed block ``i`` covers slots
    ``i .. i + l/d - 1``; selection block ``j`` covers slots ``j*l'/d .. (j+1)*l'/d - 1``. The weight is the number
    of slots they share, i.e. ``p_slc[j] = sum_{m=0}^{l'/d-1} sum_{n=0}^{l/d-1} p_cmp[j*l'/d + m - n]``.
    With l=32, d=16, l'=64: ``p_slc[j] = p[4j-1] + 2p[4j] + 2p[4j+1] + 2p[4j+2] + p[4j+3]``.
    """
    a = config.stride_slots_per_compress_block
    s = config.stride_slots_per_select_block
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_sel, device=device)[None, :]
    overlap = torch.minimum(i + a, (j + 1) * s) - torch.maximum(i, j * s)
    return overlap.clamp_min(0).to(torch.float32)


def selection_scores(probs: torch.Tensor, num_kv_heads: int, seqlen: int, config: NSAConfig) -> torch.Tensor:
    """Importance of each selection block for each query, shared by the query heads of a GQA group (eq. 10).

    probs ``[b, hq, t, tc]`` compressed-attention probabilities -> ``[b, hkv, t, ns]``.
    """
    b, hq, t, tc = probs.shape
    grouped = probs.reshape(b, num_kv_heads, hq // num_kv_heads, t, tc).sum(dim=2)
    w = block_overlap_weights(tc, config.num_select_blocks(seqlen), config, probs.device).to(probs.dtype)
    return grouped @ w


def forced_and_valid_blocks(seqlen: int, config: NSAConfig, device=None, q_offset: int = 0):
    """``([t, ns] forced, [t, ns] valid)``: valid blocks start at or before the query (at ``t + q_offset``);
    forced are the first ``select_initial`` blocks and the ``select_local`` most recent valid ones."""
    t = torch.arange(seqlen, device=device)[:, None] + q_offset
    j = torch.arange(config.num_select_blocks(seqlen + q_offset), device=device)[None, :]
    own = t // config.select_block
    valid = j <= own
    forced = valid & ((j < config.select_initial) | (j > own - config.select_local))
    return forced, valid


def select_topn(scores: torch.Tensor, config: NSAConfig, q_offset: int = 0) -> torch.Tensor:
    """Top-n selection blocks per query and KV head, forced blocks always in, future blocks never.

    scores ``[b, hkv, t, ns]`` -> indices ``[b, t, hkv, n]`` (int32), ascending, -1 after the last selected block
    where fewer than n blocks exist. Ties go to the lower block index. Queries sit at ``q_offset ..``.
    """
    b, hkv, t, ns = scores.shape
    n = config.select_topn
    forced, valid = forced_and_valid_blocks(t, config, scores.device, q_offset)
    s = scores.float().masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    if ns < n:  # fewer blocks than n: pad so that topk can take n, padding never valid
        s = torch.nn.functional.pad(s, (0, n - ns), value=float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True)
    idx = order.indices[..., :n]
    idx = torch.where(order.values[..., :n] == float("-inf"), torch.full_like(idx, -1), idx)
    # ascending with the -1 padding last
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(idx < 0, torch.full_like(idx, big), idx), dim=-1).values
    idx = torch.where(idx == big, torch.full_like(idx, -1), idx)
    return idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()


def selected_attention(q, k, v, indices, config: NSAConfig, scale: float, q_offset: int = 0,
                       k_base: int = 0) -> BranchOutput:
    """Attention of each query over the raw tokens of its selected blocks (causal inside its own block).

    q ``[b, t, hq, dk]``; k / v ``[b, tk, hkv, dk|dv]``; indices ``[b, t, hkv, n]`` from :func:`select_topn`.
    Whole blocks are gathered (one index per block, not per token), so memory is O(t * n * l').
    Context parallelism: queries sit at ``q_offset ..``, the keys hold positions ``[k_base, k_base + tk)``
    (``k_base`` a multiple of the block); selected blocks outside the keys are skipped (o = 0, lse = -inf for a
    query that has none inside).
    """
    b, t, hq, dk = q.shape
    tk, hkv, bs = k.shape[1], k.shape[2], config.select_block
    ns = config.num_select_blocks(tk)
    cd = _compute_dtype(q)

    def blocks(x):  # [b, tk, hkv, d] -> [b, hkv, ns, l', d]
        x = torch.nn.functional.pad(x.to(cd), (0, 0, 0, 0, 0, ns * bs - tk))
        return x.view(b, ns, bs, hkv, -1).permute(0, 3, 1, 2, 4)

    blk = indices.permute(0, 2, 1, 3).long()  # [b, hkv, t, n]
    local = blk - k_base // bs
    inside = (blk >= 0) & (local >= 0) & (local < ns)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(hkv, device=q.device)[None, :, None, None]
    kg = blocks(k)[bi, hi, local.clamp(0, ns - 1)].flatten(3, 4)  # [b, hkv, t, n*l', dk]
    vg = blocks(v)[bi, hi, local.clamp(0, ns - 1)].flatten(3, 4)
    key_pos = (blk[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)
    tq = torch.arange(t, device=q.device)[:, None] + q_offset
    valid = inside[..., None].expand(-1, -1, -1, -1, bs).flatten(-2) & (key_pos <= tq) & (key_pos < k_base + tk)
    qg = q.to(cd).reshape(b, t, hkv, hq // hkv, dk)
    s = torch.einsum("bthgd,bhtkd->bhgtk", qg, kg) * scale
    p, lse = _softmax_attend(s, valid.unsqueeze(2))
    o = torch.einsum("bhgtk,bhtkd->bthgd", p, vg).reshape(b, t, hq, v.shape[-1])
    return BranchOutput(o.to(q.dtype), lse.reshape(b, hq, t).transpose(1, 2))


# -------------------------------------------------------------------------------------------------- window
def window_attention(q, k, v, config: NSAConfig, scale: float, q_offset: int = 0) -> BranchOutput:
    """Causal sliding-window attention. q ``[b, t, hq, dk]``, k / v ``[b, tk, hkv, dk|dv]``.

    Queries go in chunks of ``w``; chunk ``c`` reads keys ``[c*w - w, c*w + w)`` (a strided view of the
    front-padded keys, no gather), masked to ``t - w < s <= t``. With ``q_offset`` (a context-parallel chunk behind
    a halo of ``q_offset`` keys) query ``i`` sits at key ``i + q_offset``: a dense masked product, for tests.
    """
    if q_offset:
        tq = torch.arange(q.shape[1], device=q.device)[:, None] + q_offset
        ts = torch.arange(k.shape[1], device=q.device)[None, :]
        return masked_attention(q, k, v, ((ts <= tq) & (ts > tq - config.window))[None, None], scale)
    b, t, hq, dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    w = min(config.window, t)
    nc = -(-t // w)
    cd = _compute_dtype(q)
    pad = nc * w - t

    def chunked_keys(x):  # [b, t, hkv, d] -> [b, nc, hkv, 2w, d]
        x = torch.nn.functional.pad(x.to(cd), (0, 0, 0, 0, w, pad))
        return x.unfold(1, 2 * w, w).transpose(-1, -2)

    kc, vc = chunked_keys(k), chunked_keys(v)
    qc = torch.nn.functional.pad(q.to(cd), (0, 0, 0, 0, 0, pad)).view(b, nc, w, hkv, hq // hkv, dk)
    tq = torch.arange(nc * w, device=q.device).view(nc, w, 1)
    ts = (torch.arange(nc, device=q.device) * w - w).view(nc, 1, 1) + torch.arange(2 * w, device=q.device)
    mask = (ts <= tq) & (ts > tq - config.window) & (ts >= 0)  # [nc, w, 2w]
    s = torch.einsum("bcqhgd,bchkd->bchgqk", qc, kc) * scale
    p, lse = _softmax_attend(s, mask[None, :, None, None])
    o = torch.einsum("bchgqk,bchkd->bcqhgd", p, vc).reshape(b, nc * w, hq, dv)[:, :t]
    lse = lse.permute(0, 1, 4, 2, 3).reshape(b, nc * w, hq)[:, :t]
    return BranchOutput(o.to(q.dtype), lse)


# ---------------------------------------------------------------------------------------------------- gates
def gate_combine(o_cmp, o_slc, o_swa, gate):
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``; gate ``[b, t, hq, 3]`` (already activated)."""
    g = gate.to(_compute_dtype(o_cmp))
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_swa
    return o.to(o_cmp.dtype)


def activate_gates(gate_logits: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Per-head gate logits ``[..., 3]`` -> branch weights, as ``config.gate_activation`` says."""
    if config.gate_activation == "sigmoid":
        return torch.sigmoid(gate_logits)
    return torch.softmax(gate_logits, dim=-1)


# ------------------------------------------------------------------------------------------------ whole NSA
class NSAOutput(NamedTuple):
    o: torch.Tensor
    """``[b, t, hq, dv]`` gated sum of the three branches."""
    block_indices: torch.Tensor
    """``[b, t, hkv, n]`` selected blocks (sequence-local indices, -1 = none)."""


def _nsa_one(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config, scale) -> NSAOutput:
    t = q.shape[1]
    cmp, probs = compressed_attention(q, k_cmp_c, v_cmp_c, config, scale, return_probs=True)
    with torch.no_grad():  # selection is discrete: no gradient flows through the scores
        scores = selection_scores(probs.detach(), k_slc.shape[2], t, config)
        indices = select_topn(scores, config)
    slc = selected_attention(q, k_slc, v_slc, indices, config, scale)
    swa = window_attention(q, k_swa, v_swa, config, scale)
    return NSAOutput(gate_combine(cmp.o, slc.o, swa.o, gate), indices)


def nsa_reference(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config: NSAConfig,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  cmp_cu_seqlens: Optional[torch.Tensor] = None) -> NSAOutput:
    """NSA over already-compressed ``k_cmp_c``/``v_cmp_c`` ``[b, tc, hkv, d]``; see ``nsa_attention`` for the rest.

    Packed batches run each sequence on its own, which is what packing means.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _nsa_one(q, k_cmp_c, v_cmp_c, k_slc, v_slc, k_swa, v_swa, gate, config, scale)
    outs, idxs = [], []
    for (s, e), (cs, ce) in zip(sequence_bounds(cu_seqlens), sequence_bounds(cmp_cu_seqlens)):
        r = _nsa_one(q[:, s:e], k_cmp_c[:, cs:ce], v_cmp_c[:, cs:ce], k_slc[:, s:e], v_slc[:, s:e],
                     k_swa[:, s:e], v_swa[:, s:e], gate[:, s:e], config, scale)
        outs.append(r.o)
        idxs.append(r.block_indices)
    return NSAOutput(torch.cat(outs, 1), torch.cat(idxs, 1))
