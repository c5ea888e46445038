"""Context-parallel building blocks: the sequence layouts (and their named errors) and the lse merge."""
import pytest
import torch

from conftest import SMALL, rel_err
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
    for cp in (2, 4):
        for rank in range(cp):
            monkeypatch.setattr(mutils.parallel_state, "get_context_parallel_world_size", lambda: cp)
            monkeypatch.setattr(mutils.parallel_state, "get_context_parallel_rank", lambda: rank)
            theirs = mutils.get_batch_on_this_cp_rank({"tokens": tokens.clone()})["tokens"]
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
