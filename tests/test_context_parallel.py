"""Context-parallel building blocks: the sequence layouts (and their named errors) and the lse merge."""
import inspect

import pytest
import torch

from conftest import SMALL, rel_err
from conftest import make_inputs
from nsa_parallel.distributed import all_done, leave_spawned_rank
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.context_parallel import (check_sequence_length, chunk_ranges, join_from_ranks, local_positions,
                                           merge_partial, split_for_rank)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("layout", ["load_balanced", "contiguous"])
def test_split_and_join_round_trip(cp, layout):
    x = torch.randn(2, 16 * 2 * cp, 3)
    parts = [split_for_rank(x, cp, r, layout) for r in range(cp)]
    assert all(p.shape[1] == x.shape[1] // cp for p in parts)
    assert torch.equal(join_from_ranks(parts, layout), x)
    pos = torch.cat([local_positions(x.shape[1], cp, r, layout) for r in range(cp)])
    assert torch.equal(pos.sort().values, torch.arange(x.shape[1]))


def test_load_balanced_is_megatrons_split(monkeypatch):
    """Rank r holds chunks r and 2P-1-r, exactly what megatron.core's get_batch_on_this_cp_rank hands it."""
    mutils = pytest.importorskip("megatron.core.utils")
    assert chunk_ranges(64, 2, 0) == [(0, 16), (48, 64)] and chunk_ranges(64, 2, 1) == [(16, 32), (32, 48)]
    tokens = torch.arange(2 * 96).view(2, 96)
    # megatron-core 0.19 added a required is_hybrid_cp (False: the plain per-sequence split) and asks the CP group
    # passed in for size and rank instead of parallel_state
    hybrid_cp = "is_hybrid_cp" in inspect.signature(mutils.get_batch_on_this_cp_rank).parameters
    extra = {"is_hybrid_cp": False, "cp_group": "cp"} if hybrid_cp else {}
    for cp in (2, 4):
        for rank in range(cp):
            monkeypatch.setattr(mutils.parallel_state, "get_context_parallel_world_size", lambda: cp)
            monkeypatch.setattr(mutils.parallel_state, "get_context_parallel_rank", lambda: rank)
            if hybrid_cp:
                monkeypatch.setattr(torch.distributed, "get_world_size", lambda group: cp)
                monkeypatch.setattr(torch.distributed, "get_rank", lambda group: rank)
            theirs = mutils.get_batch_on_this_cp_rank({"tokens": tokens.clone()}, **extra)["tokens"]
            assert torch.equal(split_for_rank(tokens, cp, rank), theirs)


def test_misaligned_lengths_are_named():
    assert check_sequence_length(4 * 16, 2, "load_balanced", SMALL) == 16   # SMALL: select_block 16
    assert check_sequence_length(2 * 16, 2, "contiguous", SMALL) == 16
    with pytest.raises(ValueError, match=r"must be a multiple of 4 chunks x select_block 16 = 64"):
        check_sequence_length(96, 2, "load_balanced", SMALL)
    with pytest.raises(ValueError, match=r"layout='ring'; allowed: load_balanced, contiguous"):
        check_sequence_length(64, 2, "ring", SMALL)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, cp_size=2\)"):
        chunk_ranges(64, 2, 2)


def _attend(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, lse


def test_merge_of_disjoint_key_sets_equals_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 40, 8, generator=gen) for _ in range(3))
    mask = torch.rand(5, 40, 40, generator=gen) < 0.5
    mask[:, 3] = False  # a query that sees nothing at all
    want_o, want_lse = _attend(q, k, v, mask)
    o = torch.zeros(5, 40, 8)
    lse = torch.full((5, 40), float("-inf"))
    for sl in (slice(0, 7), slice(7, 30), slice(30, 40)):   # three "ring steps"
        m = torch.zeros_like(mask)
        m[..., sl] = mask[..., sl]
        o_i, lse_i = _attend(q, k, v, m)
        o, lse = merge_partial(o, lse, o_i.half(), lse_i)  # low-precision partials, fp32 accumulators
    assert o.dtype == torch.float32
    seen = mask.any(-1)
    assert rel_err(o[seen], want_o[seen]) < 2e-3 and rel_err(lse[seen], want_lse[seen]) < 1e-6
    assert torch.all(o[~seen] == 0) and torch.all(lse[~seen] == float("-inf"))


# ------------------------------------------------------------------------------------ NSA over CP ranks (gloo)
# window 16: the smallest aligned chunk (one selection block of 16) still holds the w - 1 = 15 token halo
CP_CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=16)
# (name, chunks of select_block per chunk, b, hq, hkv, dk, dv, layout, backend, selection exchange)
CP_CASES = [
    ("smallest-lb", 1, 1, 4, 2, 16, 16, "load_balanced", "reference", "allgather"),
    ("smallest-contig", 1, 1, 4, 2, 16, 16, "contiguous", "reference", "allgather"),
    ("gqa4-lb", 3, 2, 8, 2, 16, 8, "load_balanced", "reference", "allgather"),
    ("mha-contig", 2, 1, 2, 2, 16, 16, "contiguous", "reference", "allgather"),
    ("triton-lb", 2, 1, 4, 2, 16, 16, "load_balanced", "triton", "allgather"),
    ("triton-ring-lb", 2, 1, 4, 2, 16, 16, "load_balanced", "triton", "ring"),
    ("triton-ring-contig", 2, 1, 8, 2, 16, 8, "contiguous", "triton", "ring"),
]


def _phi_grad_errs(full, mine, group):
    """phi is replicated: its gradient is the sum over ranks. Measured as one vector per phi: phi_k's b2 alone has
    an exactly-zero true gradient (adding one vector to every key shifts each softmax row by a constant)."""
    errs = {}
    for nm, full_phi, my_phi in zip(("phi_k", "phi_v"), full, mine):
        g = torch.cat([p.grad.flatten() for p in my_phi.parameters()])
        torch.distributed.all_reduce(g, group=group)
        errs[nm] = rel_err(g, torch.cat([p.grad.flatten() for p in full_phi.parameters()]))
    return errs


def _cp_case(case, world, rank, group):
    import copy
    from nsa_parallel.context_parallel import nsa_attention_cp
    from nsa_parallel.context_parallel.layout import num_chunks
    name, blocks, b, hq, hkv, dk, dv, layout, backend, exchange = case
    t = num_chunks(world, layout) * blocks * CP_CFG.select_block
    q, kvs, gate, ck, cv = make_inputs(b, t, hq, hkv, dk, dv, CP_CFG, seed=11, requires_grad=True)
    full = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=CP_CFG)
    do = torch.randn(full.shape, generator=torch.Generator().manual_seed(5))
    full.backward(do)

    def mine(x):
        return split_for_rank(x.detach(), world, rank, layout).requires_grad_()
    lq, lkvs, lgate = mine(q), [mine(x) for x in kvs], mine(gate)
    lck, lcv = copy.deepcopy(ck), copy.deepcopy(cv)
    for p in list(lck.parameters()) + list(lcv.parameters()):
        p.grad = None
    out = nsa_attention_cp(lq, *lkvs, lgate, compress_k=lck, compress_v=lcv, cp_group=group, config=CP_CFG,
                           layout=layout, backend=backend, selection_exchange=exchange)
    out.backward(split_for_rank(do, world, rank, layout))
    errs = {"out": rel_err(out.detach(), split_for_rank(full.detach(), world, rank, layout))}
    for nm, x, lx in [("q", q, lq), ("gate", gate, lgate)] + [(f"kv{j}", x, lx) for j, (x, lx) in
                                                              enumerate(zip(kvs, lkvs))]:
        errs[nm] = rel_err(lx.grad, split_for_rank(x.grad, world, rank, layout))
    errs.update(_phi_grad_errs((ck, cv), (lck, lcv), group))
    return errs


VARLEN = ("varlen", [128, 384, 256])  # packed sequences, each split over the ranks on its own


def _cp_varlen_case(world, rank, group, lengths):
    """Packed batch under CP: each rank holds its load-balanced chunks of every sequence; output and gradients
    equal the single-rank packed NSA (cu_seqlens), sliced the same way."""
    import copy
    from nsa_parallel.context_parallel import nsa_attention_cp
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, kvs, gate, ck, cv = make_inputs(1, sum(lengths), 4, 2, 16, 16, CP_CFG, seed=13, requires_grad=True)
    full = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=CP_CFG, cu_seqlens=cu)
    do = torch.randn(full.shape, generator=torch.Generator().manual_seed(6))
    full.backward(do)

    def mine(x):
        return torch.cat([split_for_rank(x[:, s:e], world, rank) for s, e in zip(cu[:-1], cu[1:])], dim=1)
    lq, lgate = mine(q.detach()).requires_grad_(), mine(gate.detach()).requires_grad_()
    lkvs = [mine(x.detach()).requires_grad_() for x in kvs]
    lck, lcv = copy.deepcopy(ck), copy.deepcopy(cv)
    for p in list(lck.parameters()) + list(lcv.parameters()):
        p.grad = None
    out = nsa_attention_cp(lq, *lkvs, lgate, compress_k=lck, compress_v=lcv, cp_group=group, config=CP_CFG,
                           cu_seqlens=cu)
    out.backward(mine(do))
    errs = {"out": rel_err(out.detach(), mine(full.detach()))}
    for nm, x, lx in [("q", q, lq), ("gate", gate, lgate)] + [(f"kv{j}", x, lx) for j, (x, lx) in
                                                              enumerate(zip(kvs, lkvs))]:
        errs[nm] = rel_err(lx.grad, mine(x.grad))
    errs.update(_phi_grad_errs((ck, cv), (lck, lcv), group))
    return errs


# documents split over the ranks and held whole (nsa_parallel.documents); "few": a rank with no document at all
DOCUMENT_CASES = [("documents", [150, 20, 7, 300, 40, 3]), ("documents-few", [20, 7, 3])]


def _cp_documents_case(world, rank, group, lengths):
    """A sample's documents under CP as :func:`nsa_parallel.documents.plan_cp_documents` places them (long ones
    split, short ones whole on one rank, padding): every real token's output and gradients equal the single-rank
    packed NSA's; padding rows get no gradient."""
    import copy
    from nsa_parallel.context_parallel import nsa_attention_cp
    from nsa_parallel.documents import documents_on_cp_rank, plan_cp_documents
    from nsa_parallel.metrics import nsa_stats
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    plan = plan_cp_documents(bounds, world, CP_CFG)
    local, params = documents_on_cp_rank({"tokens": torch.arange(bounds[-1])[None]}, -1, plan, rank)
    idx = local["tokens"][0]  # the sample's token at each local row; -1: padding
    real = idx >= 0
    q, kvs, gate, ck, cv = make_inputs(1, bounds[-1], 4, 2, 16, 16, CP_CFG, seed=19, requires_grad=True)
    full, full_idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=CP_CFG,
                                   cu_seqlens=torch.tensor(bounds, dtype=torch.int32), return_block_indices=True)
    do = torch.randn(full.shape, generator=torch.Generator().manual_seed(7))
    full.backward(do)

    def mine(x):
        return x.detach()[:, idx.clamp(min=0)].masked_fill(~real[None, :, None, None], 0)
    lq, lgate = mine(q).requires_grad_(), mine(gate).requires_grad_()
    lkvs = [mine(x).requires_grad_() for x in kvs]
    lck, lcv = copy.deepcopy(ck), copy.deepcopy(cv)
    for p in list(lck.parameters()) + list(lcv.parameters()):
        p.grad = None
    out, lidx = nsa_attention_cp(lq, *lkvs, lgate, compress_k=lck, compress_v=lcv, cp_group=group, config=CP_CFG,
                                 cu_seqlens=params.cu_seqlens_q_padded, cu_seqlens_whole=params.cu_seqlens_whole,
                                 return_block_indices=True)
    out.backward(mine(do))
    errs = {"out": rel_err(out.detach()[:, real], full.detach()[:, idx[real]])}
    # NSA's statistics (each token at its position in its document, padding out) equal the one-rank packed batch's
    lengths_t = torch.tensor(lengths)
    doc_pos = torch.arange(bounds[-1]) - torch.tensor(bounds[:-1]).repeat_interleave(lengths_t)
    want = nsa_stats(gate.detach(), full_idx, CP_CFG, positions=doc_pos)
    got = nsa_stats(lgate.detach(), lidx, CP_CFG, positions=params.positions, group=group, real=params.real)
    errs.update({f"stats_{k}": abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in want})
    for nm, x, lx in [("q", q, lq), ("gate", gate, lgate)] + [(f"kv{j}", x, lx) for j, (x, lx) in
                                                              enumerate(zip(kvs, lkvs))]:
        errs[nm] = rel_err(lx.grad[:, real], x.grad[:, idx[real]])
        errs[f"{nm}_padding"] = float(lx.grad[:, ~real].abs().max()) if (~real).any() else 0.0
    errs.update(_phi_grad_errs((ck, cv), (lck, lcv), group))
    kinds = torch.tensor([len(plan.split) > 0, any(plan.whole), (~real).any()], dtype=torch.int32)
    errs["kinds"] = kinds.tolist()
    return errs


def _cp_stats_case(world, rank, group):
    """NSA's TensorBoard statistics from P ranks' shards (global positions, reduced over the group) equal those of
    the whole sequence on one rank."""
    from nsa_parallel.context_parallel import local_positions, nsa_attention_cp
    from nsa_parallel.metrics import nsa_stats
    t = 2 * world * 4 * CP_CFG.select_block
    q, kvs, gate, ck, cv = make_inputs(2, t, 4, 2, 16, 16, CP_CFG, seed=17)
    _, idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=CP_CFG, return_block_indices=True)
    want = nsa_stats(gate, idx, CP_CFG)
    mine = [split_for_rank(x, world, rank) for x in (q, *kvs, gate)]
    _, lidx = nsa_attention_cp(*mine, compress_k=ck, compress_v=cv, cp_group=group, config=CP_CFG,
                               return_block_indices=True)
    got = nsa_stats(mine[-1], lidx, CP_CFG, positions=local_positions(t, world, rank), group=group)
    assert want["select_reach"] > 0 and 0 < want["select_forced_share"] < 1  # a non-trivial selection
    return {k: abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in want}


def _cp_worker(rank, world, port, cases, result):
    import warnings
    warnings.filterwarnings("ignore")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        for case in cases:
            group = torch.distributed.group.WORLD
            if case[0] == "varlen":
                result[(case[0], rank)] = _cp_varlen_case(world, rank, group, case[1])
            elif case[0].startswith("documents"):
                result[(case[0], rank)] = _cp_documents_case(world, rank, group, case[1])
            elif case[0] == "stats":
                result[(case[0], rank)] = _cp_stats_case(world, rank, group)
            else:
                result[(case[0], rank)] = _cp_case(case, world, rank, group)
        all_done()
    except BaseException as e:  # noqa: BLE001 - report it to the parent
        result[("error", rank)] = repr(e)
        raise
    finally:
        torch.distributed.destroy_process_group()
    leave_spawned_rank()


def run_cp(world, cases):
    import torch.multiprocessing as mp
    from nsa_parallel.distributed import free_port
    result = mp.Manager().dict()
    mp.spawn(_cp_worker, args=(world, free_port(), cases, result), nprocs=world, join=True)
    return dict(result)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_cp_equals_single_rank(world):
    """Output, every input gradient and phi's gradients on each of P ranks equal the single-rank NSA of the full
    sequence, sliced (fp32; the Triton case runs in the interpreter on CPU)."""
    cases = CP_CASES if world == 2 else [c for c in CP_CASES if c[8] == "reference" or
                                         (world == 4 and c[0] == "triton-ring-lb")]
    if torch.cuda.is_available():  # these gloo processes hold CPU tensors: Triton runs there only interpreted
        cases = [c for c in cases if c[8] == "reference"]
    cases = cases + [(VARLEN[0], [n * max(1, world // 4) for n in VARLEN[1]]),  # 2P x select_block multiples
                     ("stats",)] + DOCUMENT_CASES
    result = run_cp(world, cases)
    for name, _ in DOCUMENT_CASES:  # the layouts the cases were made for: split and whole documents, padding
        kinds = [result[(name, rank)].pop("kinds") for rank in range(world)]
        assert kinds[0][:2] == ([1, 1] if name == "documents" else [0, 1]) and any(k[2] for k in kinds), kinds
    for case in cases:
        bound = 1e-4 if len(case) > 8 and case[8] == "triton" else 1e-5
        for rank in range(world):
            errs = result[(case[0], rank)]
            bad = {k: v for k, v in errs.items() if not v < bound}
            assert not bad, (case[0], rank, bad)


def test_cp_bad_options_are_named():
    from nsa_parallel.context_parallel import check_cp_config, nsa_attention_cp
    q, kvs, gate, ck, cv = make_inputs(1, 64, 4, 2, 16, 16, CP_CFG)
    with pytest.raises(ValueError, match="selection_exchange='ring' runs the Triton kernels"):
        nsa_attention_cp(q, *kvs, gate, compress_k=ck, compress_v=cv, cp_group=None, config=CP_CFG,
                         selection_exchange="ring")
    with pytest.raises(ValueError, match="selection_exchange='p2p'; allowed: allgather, ring"):
        nsa_attention_cp(q, *kvs, gate, compress_k=ck, compress_v=cv, cp_group=None, config=CP_CFG,
                         selection_exchange="p2p")
    assert check_cp_config(64, 2, "load_balanced", CP_CFG) == 16
    with pytest.raises(ValueError, match="chunks of 16 tokens .* must be at least the halo .* = 23 tokens"):
        check_cp_config(64, 2, "load_balanced", SMALL)   # SMALL's window 24
    with pytest.raises(ValueError, match="must be a multiple of 4 chunks x select_block 16 = 64"):
        check_cp_config(80, 2, "load_balanced", CP_CFG)
