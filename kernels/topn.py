"""Top-n selection from block scores: forced blocks in, future blocks out, ties to the lower index."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import NSAConfig
from .select import sequence_ids
from .varlen import host_values, max_seqlen


# scores per program (rows x blocks, at most 64 rows) and warps: at 64k (1024 blocks a row) one row on one warp keeps
# the n reductions inside a warp: 2.07 ms against 3.63 for 4 rows on 4 warps (H100, benchmarks/selection_sweep.py)
TOPN_ELEMENTS, TOPN_WARPS = 1024, 1
# rows of at least 256 blocks walk TOPN_CANDIDATES candidates of each of 32 block groups (``_rounds_over_candidates``)
# instead of the whole row: same blocks, top-n 1.15 -> 0.74 ms at 64k on an H100 (docs/benchmarks.md, 23rd session)
TOPN_PREFILTER, TOPN_CANDIDATES = True, 4


@triton.jit
def _rounds(s, out, j, col, ROUNDS: tl.constexpr, FIRST: tl.constexpr):
    """``ROUNDS`` rounds of max / argmax over the rows of ``s`` [rows, blocks], each pick into column
    ``FIRST + round`` of ``out`` (``1 << 30`` where none is left)."""
    for i in tl.static_range(ROUNDS):
        # one reduction for value and index; the lower block index wins ties, as in the reference
        best, arg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        pick = tl.where(best == float("-inf"), 1 << 30, arg)
        out = tl.where(col[None, :] == FIRST + i, pick[:, None], out)
        s = tl.where(j[None, :] == arg[:, None], float("-inf"), s)
    return out


@triton.jit
def _rounds_over_candidates(s, out, col, BR: tl.constexpr, NSP: tl.constexpr,
                            ROUNDS: tl.constexpr, FIRST: tl.constexpr, E: tl.constexpr):
    """:func:`_rounds` over a prefiltered row: blocks ``j`` with the same ``j % 32`` form a group, each group's
    ``E`` best (value down, block up) are the candidates, and the rounds walk those ``32 E`` instead of the row's
    ``NSP``. Exact unless some group gave all ``E`` of its candidates (its next one may rank among the picks):
    then ``whole`` is set and the caller repeats the rounds over the whole rows."""
    C: tl.constexpr = NSP // 32
    s3 = tl.reshape(s, (BR, C, 32))
    c = tl.arange(0, C)
    lane = tl.arange(0, 32)
    e = tl.arange(0, E)
    cv = tl.full((BR, E, 32), float("-inf"), tl.float32)
    cj = tl.zeros((BR, E, 32), tl.int32)
    for k in tl.static_range(E):
        best, arg = tl.max(s3, 1, return_indices=True, return_indices_tie_break_left=True)
        cv = tl.where(e[None, :, None] == k, best[:, None, :], cv)
        cj = tl.where(e[None, :, None] == k, (arg * 32 + lane[None, :])[:, None, :], cj)
        s3 = tl.where(c[None, :, None] == arg[:, None, :], float("-inf"), s3)
    # a group's last candidate is only picked after its others; picking is the only way a finite one turns -inf
    last = tl.reshape((e[None, :, None] == E - 1) & (cv > float("-inf")), (BR, E * 32))
    v = tl.reshape(cv, (BR, E * 32))
    blk = tl.reshape(cj, (BR, E * 32))
    for i in tl.static_range(ROUNDS):
        best = tl.max(v, 1)
        pick = tl.min(tl.where(v == best[:, None], blk, 1 << 30), 1)  # ties: the lower block
        pick = tl.where(best == float("-inf"), 1 << 30, pick)
        out = tl.where(col[None, :] == FIRST + i, pick[:, None], out)
        v = tl.where(blk == pick[:, None], float("-inf"), v)
    return out, tl.max(tl.max((last & (v == float("-inf"))).to(tl.int32), 1), 0) > 0


@triton.jit
def _topn_kernel(SC, LOCAL_T, IDX, ROWS, NS, HKV: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                 NSP: tl.constexpr, BR: tl.constexpr, SEL_BLOCK: tl.constexpr, INITIAL: tl.constexpr,
                 LOCAL: tl.constexpr, PAIRS: tl.constexpr, CANDIDATES: tl.constexpr = 0):
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # rows = (token, KV head)
    rv = r < ROWS
    j = tl.arange(0, NSP)
    t = tl.load(LOCAL_T + r // HKV, mask=rv, other=0)
    own = t // SEL_BLOCK
    valid = (j[None, :] <= own[:, None]) & (j[None, :] < NS) & rv[:, None]
    forced = valid & ((j[None, :] < INITIAL) | (j[None, :] > own[:, None] - LOCAL))
    at = r.to(tl.int64)[:, None] * NS + j[None, :]
    if PAIRS:  # the scores kernel's (own, spill) pairs: block j's own + block j - 1's spill
        s = tl.load(SC + at * 2, mask=valid, other=float("-inf"))
        s += tl.load(SC + at * 2 - 1, mask=valid & (j[None, :] > 0), other=0.0)
    else:
        s = tl.load(SC + at, mask=valid, other=float("-inf"))
    s = tl.where(forced | (~valid), float("-inf"), s)
    # The forced blocks go straight to columns [0, INITIAL + LOCAL): the first INITIAL blocks, then the LOCAL
    # blocks ending at the row's own one (each only if it exists and is not an initial one). Where fewer exist,
    # every block of the row is forced and the rounds below find none, so N - INITIAL - LOCAL rounds always
    # suffice (the config guarantees N >= INITIAL + LOCAL); the rounds were the kernel's bound (93% SM
    # throughput, H100) and the forced blocks took 3 of the paper config's 16.
    col = tl.arange(0, NP)
    loc = own[:, None] - LOCAL + 1 + (col[None, :] - INITIAL)
    fblk = tl.where(col[None, :] < INITIAL, col[None, :], loc)
    fok = (col[None, :] < INITIAL + LOCAL) & (fblk <= own[:, None]) & (fblk >= 0) & (fblk < NS) & rv[:, None]
    fok &= (col[None, :] < INITIAL) | (fblk >= INITIAL)
    out = tl.where(fok, fblk, 1 << 30)
    if CANDIDATES:
        out, whole = _rounds_over_candidates(s, out, col, BR, NSP, N - INITIAL - LOCAL, INITIAL + LOCAL,
                                             CANDIDATES)
        if whole:  # a row may have lost a pick to the prefilter: the rounds over the whole rows decide
            out = _rounds(s, out, j, col, N - INITIAL - LOCAL, INITIAL + LOCAL)
    else:
        out = _rounds(s, out, j, col, N - INITIAL - LOCAL, INITIAL + LOCAL)
    out = tl.sort(out, 1)
    out = tl.where(out == (1 << 30), -1, out)
    tl.store(IDX + r.to(tl.int64)[:, None] * N + col[None, :], out, mask=rv[:, None] & (col[None, :] < N))


def select_topn(scores: torch.Tensor, config: NSAConfig, cu_seqlens: Optional[torch.Tensor] = None,
                q_offset: int = 0) -> torch.Tensor:
    """scores ``[b, t, hkv, ns]`` (or the scores kernel's ``[b, t, hkv, ns, 2]`` pairs, ``compress.score_pairs``)
    -> block indices ``[b, t, hkv, n]`` int32, ascending, -1 padded, exactly as :func:`reference.select_topn`
    (which takes ``[b, hkv, t, ns]``): the forced blocks placed directly, then ``n - select_initial -
    select_local`` rounds of max/argmax per row in registers.
    Query ``i`` sits at position ``i + q_offset`` (a context-parallel chunk); the block ids are global."""
    pairs = scores.dim() == 5
    b, t, hkv, ns = scores.shape[:4]
    n = config.select_topn
    _, local_t = sequence_ids(b, t, cu_seqlens, scores.device)
    rows = b * t * hkv
    nsp = triton.next_power_of_2(ns)
    br = max(1, min(64, TOPN_ELEMENTS // nsp))
    idx = torch.empty(b, t, hkv, n, device=scores.device, dtype=torch.int32)
    _topn_kernel[(triton.cdiv(rows, br),)](
        scores.contiguous(), (local_t + q_offset).to(torch.int32).contiguous(), idx, rows, ns, HKV=hkv, N=n,
        NP=triton.next_power_of_2(n), NSP=nsp, BR=br, SEL_BLOCK=config.select_block,
        INITIAL=config.select_initial, LOCAL=config.select_local, PAIRS=pairs,
        CANDIDATES=TOPN_CANDIDATES if TOPN_PREFILTER and nsp >= 64 * TOPN_CANDIDATES else 0, num_warps=TOPN_WARPS)
    return idx


# the most block scores select_blocks keeps at once: 1 GiB scores 64k queries x 4 KV heads in two halves (H100: 4
# quarters took 0.25 ms more, benchmarks/scores_ab.py --sweep)
SCORES_BUFFER_BYTES = 1 << 30
SCORE_BYTES = 8  # a block's score as the scores kernel writes it: an fp32 (own, spill) pair


def _fits(rows: int, hkv: int, seqlen: int, config: NSAConfig) -> bool:
    """Whether the scores of ``rows`` queries (``hkv`` heads, blocks up to ``seqlen``) fit the budget."""
    return rows * hkv * config.num_select_blocks(seqlen) * SCORE_BYTES <= SCORES_BUFFER_BYTES


def select_blocks(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens=None, cmp_cu_seqlens=None,
                  max_t=None, q_offset: int = 0) -> torch.Tensor:
    """Selection scores then top-n: block indices ``[b, t, hkv, n]`` (no autograd).

    The ``[b, t, hkv, ns, 2]`` fp32 score pairs grow as t^2 (2 GiB at 64k with 4 KV heads, 128 GiB at 512k), so
    at most ``SCORES_BUFFER_BYTES`` of them exist at once: fixed-length batches are scored query chunk by query chunk
    (each chunk's top-n right after its scores); packed batches whose scores would pass the budget are scored in
    runs of neighbouring sequences that fit it, and a sequence too long for it alone in query chunks."""
    from .compress import score_pairs
    b, t, _, _ = q.shape
    hkv = k_cmp.shape[2]
    if cu_seqlens is not None:
        max_t = max_seqlen(cu_seqlens) if max_t is None else max_t
        if _fits(t, hkv, max_t + q_offset, config):
            scores = score_pairs(q, k_cmp, lse_cmp, config, scale, cu_seqlens, cmp_cu_seqlens, max_t, q_offset)
            return select_topn(scores, config, cu_seqlens, q_offset)
        return _select_packed_runs(q, k_cmp, lse_cmp, config, scale, cu_seqlens, cmp_cu_seqlens, q_offset)
    ns = config.num_select_blocks(t + q_offset)
    rows = max(64, SCORES_BUFFER_BYTES // (SCORE_BYTES * b * hkv * max(ns, 1)) // 64 * 64)
    if rows >= t:
        return select_topn(score_pairs(q, k_cmp, lse_cmp, config, scale, q_offset=q_offset), config,
                           q_offset=q_offset)
    parts = []
    for s in range(0, t, rows):
        e = min(t, s + rows)
        scores = score_pairs(q[:, s:e], k_cmp, lse_cmp[:, s:e].contiguous(), config, scale,
                             q_offset=q_offset + s)
        parts.append(select_topn(scores, config, q_offset=q_offset + s))
        del scores
    return torch.cat(parts, dim=1)


def _select_packed_runs(q, k_cmp, lse_cmp, config: NSAConfig, scale: float, cu_seqlens, cmp_cu_seqlens,
                        q_offset: int):
    """:func:`select_blocks` of a packed batch (``b = 1``) whose whole scores would pass the budget: neighbouring
    sequences grouped into runs whose scores fit it (a packed call each), a sequence that alone does not through
    the fixed-length path's query chunks. The bounds on the host (:func:`varlen.host_values`: read once per tensor)."""
    hkv = k_cmp.shape[2]
    cu, ccu = host_values(cu_seqlens), host_values(cmp_cu_seqlens)
    idx = torch.full((1, q.shape[1], hkv, config.select_topn), -1, device=q.device, dtype=torch.int32)
    i = 0
    while i < len(cu) - 1:
        j, longest = i + 1, cu[i + 1] - cu[i]
        while j < len(cu) - 1 and _fits(cu[j + 1] - cu[i], hkv, max(longest, cu[j + 1] - cu[j]) + q_offset, config):
            longest = max(longest, cu[j + 1] - cu[j])
            j += 1
        lo, hi, clo, chi = cu[i], cu[j], ccu[i], ccu[j]
        if hi > lo:
            part = (q[:, lo:hi], k_cmp[:, clo:chi], lse_cmp[:, lo:hi].contiguous(), config, scale)
            if j == i + 1:
                idx[:, lo:hi] = select_blocks(*part, q_offset=q_offset)
            else:
                rebase = [torch.tensor(c[i:j + 1], dtype=cu_seqlens.dtype, device=q.device) - c[i] for c in (cu, ccu)]
                idx[:, lo:hi] = select_blocks(*part, *rebase, longest, q_offset)
        i = j
    return idx
