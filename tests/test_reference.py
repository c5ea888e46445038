"""The plain-PyTorch reference against an independent brute force, and its exact properties."""
import math
from types import SimpleNamespace

import pytest
import torch

import bruteforce as bf
from conftest import SMALL, make_inputs, rel_err
from nsa_parallel.kernels import Compression, NSAConfig, nsa_attention, unfold_blocks
from nsa_parallel.kernels import reference as ref
from nsa_parallel.kernels.varlen import compressed_cu_seqlens


@pytest.mark.parametrize("t,hq,hkv,dk,dv", [
    (37, 4, 4, 8, 8),     # G=1, length not a multiple of any block
    (64, 4, 2, 8, 6),     # G=2, dk != dv, exact multiple
    (71, 8, 2, 12, 8),    # G=4
    (50, 16, 1, 8, 8),    # G=16
])
def test_each_branch_matches_bruteforce(t, hq, hkv, dk, dv):
    cfg = SMALL
    q, kvs, gate, ck, cv = make_inputs(2, t, hq, hkv, dk, dv, cfg, dtype=torch.float64, seed=t + hq)
    k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa = kvs
    with torch.no_grad():
        kc, vc = ck(k_cmp), cv(v_cmp)
        kc_bf, vc_bf = bf.compress(k_cmp, ck, cfg), bf.compress(v_cmp, cv, cfg)
        assert kc.shape[1] == cfg.num_compressed(t) == kc_bf.shape[1]
        assert rel_err(kc, kc_bf) < 1e-12 and rel_err(vc, vc_bf) < 1e-12

        o_bf, (c_bf, s_bf, w_bf), idx_bf = bf.nsa(q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, cfg)
        scale = 1 / math.sqrt(dk)
        cmp, probs = ref.compressed_attention(q, kc, vc, cfg, scale, return_probs=True)
        idx = ref.select_topn(ref.selection_scores(probs, hkv, t, cfg), cfg)
        slc = ref.selected_attention(q, k_slc, v_slc, idx, cfg, scale)
        swa = ref.window_attention(q, k_swa, v_swa, cfg, scale)
        assert rel_err(cmp.o, c_bf) < 1e-12
        assert torch.equal(idx, idx_bf)
        assert rel_err(slc.o, s_bf) < 1e-12
        assert rel_err(swa.o, w_bf) < 1e-12
        o = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg)
        assert rel_err(o, o_bf) < 1e-12


def test_lse_matches_logsumexp_of_visible_scores():
    cfg = SMALL
    q, kvs, gate, ck, cv = make_inputs(1, 40, 4, 2, 8, 8, cfg, dtype=torch.float64)
    scale = 0.3
    swa = ref.window_attention(q, kvs[4], kvs[5], cfg, scale)
    for t in (0, 5, 39):
        for h in range(4):
            s0 = max(0, t - cfg.window + 1)
            s = (kvs[4][0, s0:t + 1, h // 2] @ q[0, t, h]) * scale
            assert abs(torch.logsumexp(s, 0).item() - swa.lse[0, t, h].item()) < 1e-10


def test_queries_without_compressed_blocks_get_zero_and_minus_inf_lse():
    cfg = SMALL  # first compressed block ends at token 7
    q, kvs, gate, ck, cv = make_inputs(1, 20, 2, 1, 8, 8, cfg, dtype=torch.float64)
    kc, vc = ck(kvs[0]), cv(kvs[1])
    out = ref.compressed_attention(q, kc, vc, cfg, 0.5)
    assert torch.all(out.o[0, :7] == 0) and torch.all(out.lse[0, :7] == float("-inf"))
    assert torch.all(torch.isfinite(out.lse[0, 7:])) and torch.all(out.o[0, 7:].abs().sum(-1) > 0)


def test_block_overlap_weights_hand_worked_paper_config():
    """l=32, d=16, l'=64: compressed block i spans stride slots {i, i+1}; selection block j spans {4j..4j+3}."""
    cfg = NSAConfig()
    w = ref.block_overlap_weights(num_cmp=10, num_sel=3, config=cfg)
    expected = torch.zeros(10, 3)
    expected[0:3, 0] = 2          # blocks 0,1,2 lie inside selection block 0 (tokens 0..63)
    expected[3, 0] = 1            # block 3 = tokens 48..79: one slot in block 0 ...
    expected[3, 1] = 1            # ... and one in block 1
    expected[4:7, 1] = 2          # blocks 4,5,6 = tokens 64..127 inside block 1
    expected[7, 1] = expected[7, 2] = 1
    expected[8:10, 2] = 2
    assert torch.equal(w, expected)
    # p_slc[1] = p[3] + 2 p[4] + 2 p[5] + 2 p[6] + p[7]
    p = torch.arange(1.0, 11.0).reshape(1, 1, 1, 10)
    s = ref.selection_scores(p, num_kv_heads=1, seqlen=160, config=cfg)
    assert s[0, 0, 0, 1].item() == 4 + 2 * 5 + 2 * 6 + 2 * 7 + 8


def test_selection_scores_sum_over_gqa_group():
    cfg = SMALL
    probs = torch.rand(1, 4, 30, cfg.num_compressed(30), dtype=torch.float64)
    s = ref.selection_scores(probs, num_kv_heads=2, seqlen=30, config=cfg)
    s0 = ref.selection_scores(probs[:, 0:1] + probs[:, 1:2], 1, 30, cfg)
    s1 = ref.selection_scores(probs[:, 2:3] + probs[:, 3:4], 1, 30, cfg)
    assert torch.allclose(s[:, 0:1], s0) and torch.allclose(s[:, 1:2], s1)


@pytest.mark.parametrize("seed", range(5))
def test_topn_forced_blocks_in_and_future_blocks_out(seed):
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_topn=5, select_initial=1,
                    select_local=2, window=8)
    t = 97
    scores = torch.rand(2, 3, t, cfg.num_select_blocks(t), generator=torch.Generator().manual_seed(seed))
    idx = ref.select_topn(scores, cfg)
    for ti in range(t):
        own = ti // cfg.select_block
        for bi in range(2):
            for h in range(3):
                sel = [j for j in idx[bi, ti, h].tolist() if j >= 0]
                assert len(sel) == min(cfg.select_topn, own + 1) == len(set(sel))
                assert max(sel) <= own                          # never a future block
                assert {0, own, max(own - 1, 0)} <= set(sel)    # first + 2 local always in
                rest = [j for j in range(own + 1) if j not in sel]
                chosen_free = [j for j in sel if j not in {0, own, own - 1}]
                if rest and chosen_free:                        # the others are the best-scored
                    assert min(scores[bi, h, ti, chosen_free]) >= max(scores[bi, h, ti, rest])


def test_topn_larger_than_available_blocks_is_handled():
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=64, window=8)
    idx = ref.select_topn(torch.rand(1, 1, 50, cfg.num_select_blocks(50)), cfg)
    assert idx.shape == (1, 50, 1, 64)
    assert idx[0, 49, 0, :4].tolist() == [0, 1, 2, 3] and torch.all(idx[0, 49, 0, 4:] == -1)


def test_packed_equals_separate_sequences():
    cfg = SMALL
    lens = [37, 16, 5, 64]
    hq, hkv, dk, dv = 4, 2, 8, 6
    q, kvs, gate, ck, cv = make_inputs(1, sum(lens), hq, hkv, dk, dv, cfg, dtype=torch.float64, seed=3)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    o, idx = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, cu_seqlens=cu,
                           return_block_indices=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o_i, idx_i = nsa_attention(q[:, s:e], *[x[:, s:e] for x in kvs], gate[:, s:e], compress_k=ck,
                                   compress_v=cv, config=cfg, return_block_indices=True)
        assert rel_err(o[:, s:e], o_i) < 1e-13
        assert torch.equal(idx[:, s:e], idx_i)
    assert compressed_cu_seqlens(cu, 8, 4).tolist() == [0, 8, 11, 11, 26]


def test_padded_batch_equals_unpadded():
    """Right padding never changes the outputs of the real tokens (causality)."""
    cfg = SMALL
    q, kvs, gate, ck, cv = make_inputs(1, 61, 4, 2, 8, 8, cfg, dtype=torch.float64, seed=4)
    full = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg)
    short = nsa_attention(q[:, :45], *[x[:, :45] for x in kvs], gate[:, :45], compress_k=ck, compress_v=cv,
                          config=cfg)
    assert rel_err(full[:, :45], short) < 1e-13


def test_gradcheck_fp64_whole_nsa():
    cfg = NSAConfig(compress_block=4, compress_stride=2, select_block=4, select_topn=3, window=5)
    q, kvs, gate, ck, cv = make_inputs(1, 13, 4, 2, 4, 3, cfg, dtype=torch.float64, seed=5, requires_grad=True)
    params = list(ck.parameters()) + list(cv.parameters())

    def f(q, *rest):
        kv, gate = rest[:6], rest[6]
        return nsa_attention(q, *kv, gate, compress_k=ck, compress_v=cv, config=cfg)

    assert torch.autograd.gradcheck(f, (q, *kvs, gate), eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the compression MLP's own parameters get their exact gradient too
    out = f(q, *kvs, gate)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), params)
    with torch.no_grad():
        for p, gp in zip(params, grads):
            e = torch.zeros_like(p).view(-1)
            i = torch.randint(0, e.numel(), (1,)).item()
            e[i] = 1e-6
            p.view(-1)[i] += 1e-6
            up = (f(q, *kvs, gate) * w).sum()
            p.view(-1)[i] -= 2e-6
            dn = (f(q, *kvs, gate) * w).sum()
            p.view(-1)[i] += 1e-6
            fd = (up - dn) / 2e-6
            assert abs(fd - gp.view(-1)[i]) <= 1e-6 + 1e-5 * abs(fd)


def test_fp32_matches_fp64():
    cfg = SMALL
    q, kvs, gate, ck, cv = make_inputs(2, 53, 8, 2, 16, 8, cfg, dtype=torch.float64, seed=6)
    o64 = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg)
    ck32, cv32 = ck.float(), cv.float()
    o32 = nsa_attention(q.float(), *[x.float() for x in kvs], gate.float(), compress_k=ck32, compress_v=cv32,
                        config=cfg)
    assert o32.dtype == torch.float32 and rel_err(o32, o64) < 1e-5


@pytest.mark.parametrize("block,stride,hidden,t", [
    (32, 16, None, 100),  # the paper's l = 2d
    (8, 4, 5, 64),        # exact multiple, narrow hidden layer
    (12, 4, None, 45),    # l = 3d
    (8, 8, None, 47),     # l = d: no overlap
    (10, 4, None, 50),    # l not a multiple of d
    (32, 16, None, 32),   # a single block
    (32, 16, None, 20),   # no whole block
])
def test_compression_equals_bruteforce_with_gradients(block, stride, hidden, t):
    """phi (``Compression``) against the explicit block-by-block MLP, fp64: output and the gradients of the input
    and of every parameter, fixed-length and packed."""
    torch.manual_seed(block + stride + t)
    phi = Compression(3, 8, block, stride, hidden, dtype=torch.float64)
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_()
    cfg = SimpleNamespace(compress_block=block, compress_stride=stride)  # (10, 4) is not an NSAConfig
    x = torch.randn(2, t, 3, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *phi.parameters()]
    got = phi(x)
    want = bf.compress(x, phi, cfg)
    assert got.shape == want.shape == (2, max(0, (t - block) // stride + 1), 3, 8)
    if got.numel() == 0:
        return
    assert rel_err(got, want) < 1e-12
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        assert rel_err(a, b) < 1e-12
    # packed: two sequences of lengths t and t // 2 + 3, each compressed on its own
    cu = torch.tensor([0, t, t + t // 2 + 3])
    xp = torch.randn(1, int(cu[-1]), 3, 8, dtype=torch.float64)
    packed = phi(xp, cu)
    want = torch.cat([bf.compress(xp[:, s:e], phi, cfg) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert packed.shape == want.shape and rel_err(packed, want) < 1e-12


def test_compression_rounds_like_compress_blocks_in_bf16():
    """Training (chunk products) and decoding (one block at a time, ``compress_blocks`` and the decode kernel)
    round phi the same way, so a compressed token does not depend on which of them made it."""
    phi = Compression(2, 32, 32, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        phi.pos_emb.normal_()  # a pe as large as the tokens: rounding block + pe would show
    x = torch.randn(1, 300, 2, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got, want = phi(x).float(), phi.compress_blocks(unfold_blocks(x, 32, 16)).float()
    assert ((got - want).abs() <= 2 ** -7 * want.abs()).all()  # at most one bf16 rounding step apart
