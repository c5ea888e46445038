"""Every Triton kernel against the reference: forward, lse and all gradients.

On CPU they run through the Triton interpreter (fp32/fp16: bf16 tl.dot is wrong there); on a GPU the tests marked
``gpu`` run the same checks in bf16 at realistic sizes (``python -m pytest -m gpu``).
"""
import math

import pytest
import torch
import triton

from conftest import DEVICE, HAS_CUDA, SMALL, gpu_tiles_on_cpu, make_inputs, rel_err
from nsa_parallel.kernels import NSAConfig, nsa_attention
from nsa_parallel.kernels import reference as ref
from nsa_parallel.kernels.compress import compressed_attention, selection_scores
from nsa_parallel.kernels import flash
from nsa_parallel.kernels.flash import position_masked_attention
from nsa_parallel.kernels.select import selected_attention
from nsa_parallel.kernels.topn import select_topn

# relative error bounds: fp32 (interpreter: exact fp32 dots), fp16 / bf16 operands with fp32 accumulation
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rand(*shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)


def _grads(out, inputs, seed=123):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, do)


def _check(got, want, dtype, what):
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _launches(monkeypatch, module, kernel: str) -> list:
    """The grids of ``module.kernel``'s launches from here on (a spy in its place)."""
    grids, real = [], getattr(module, kernel)

    class Counted:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]
    monkeypatch.setattr(module, kernel, Counted())
    return grids


SHAPES = [  # (t, hq, hkv, dk, dv)
    (70, 4, 2, 16, 8),    # G=2, dk != dv, length not a multiple of any block
    (45, 6, 2, 8, 8),     # G=3: not a power of two, two groups
    (33, 16, 1, 16, 16),  # G=16
    (40, 4, 4, 32, 16),   # G=1
]


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hq,hkv,dk,dv", SHAPES)
def test_window_and_compressed_attention(t, hq, hkv, dk, dv, dtype, tma, monkeypatch):
    """Both ways the query-major kernels load K/V tiles: TMA descriptors and pointer loads."""
    monkeypatch.setattr(flash, "USE_TMA", tma)
    cfg = SMALL
    q = _rand(2, t, hq, dk, dtype=dtype, seed=1)
    k, v = _rand(2, t, hkv, dk, dtype=dtype, seed=2), _rand(2, t, hkv, dv, dtype=dtype, seed=3)
    o, lse = position_masked_attention(q, k, v, 0.3, 1, 0, cfg.window)
    r = ref.window_attention(q, k, v, cfg, 0.3)
    _check(o, r.o, dtype, "window o")
    _check(lse, r.lse, dtype, "window lse")
    for name, a, b in zip("qkv", _grads(o, (q, k, v)), _grads(r.o, (q, k, v))):
        _check(a, b, dtype, f"window d{name}")

    tc = cfg.num_compressed(t)
    kc, vc = _rand(2, tc, hkv, dk, dtype=dtype, seed=4), _rand(2, tc, hkv, dv, dtype=dtype, seed=5)
    o, lse = compressed_attention(q, kc, vc, cfg, 0.3)
    r = ref.compressed_attention(q, kc, vc, cfg, 0.3)
    seen = torch.isfinite(r.lse)
    assert torch.all(lse[~seen] == -math.inf) and torch.all(o[~seen.unsqueeze(-1).expand_as(o)] == 0)
    _check(o, r.o, dtype, "compressed o")
    _check(lse[seen], r.lse[seen], dtype, "compressed lse")
    for name, a, b in zip(["q", "kc", "vc"], _grads(o, (q, kc, vc)), _grads(r.o, (q, kc, vc))):
        _check(a, b, dtype, f"compressed d{name}")


def _masked_attention(q, k, v, scale, kstride, koff, window):
    """Dense softmax attention with key j at position j*kstride + koff visible to query t iff t - window < pos <= t."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bthd,bjhd->bhtj", q, kk) * scale
    pos = torch.arange(k.shape[1], device=q.device) * kstride + koff
    t = torch.arange(q.shape[1], device=q.device)[:, None]
    s = s.masked_fill(~((pos[None, :] <= t) & (pos[None, :] > t - window)), float("-inf"))
    return torch.einsum("bhtj,bjhd->bthd", torch.softmax(s, -1).nan_to_num(), vv)


@pytest.mark.parametrize("kstride,koff,window", [(4, 7, 1 << 30), (1, 0, 200)])
def test_flash_unmasked_middle_tiles(kstride, koff, window):
    """Long enough that whole 64-key tiles lie inside every query's range (the unmasked middle loop): a compressed
    layout (stride 4) and a window of 200."""
    t, hq, hkv, d = 400, 4, 2, 16
    tk = t if kstride == 1 else (t - koff - 1) // kstride + 1
    q = _rand(1, t, hq, d, dtype=torch.float32, seed=31)
    k, v = _rand(1, tk, hkv, d, dtype=torch.float32, seed=32), _rand(1, tk, hkv, d, dtype=torch.float32, seed=33)
    o, _ = position_masked_attention(q, k, v, 0.3, kstride, koff, window)
    r = _masked_attention(q, k, v, 0.3, kstride, koff, window)
    _check(o, r, torch.float32, "o")
    for name, a, b in zip("qkv", _grads(o, (q, k, v)), _grads(r, (q, k, v))):
        _check(a, b, torch.float32, f"d{name}")


@pytest.mark.parametrize("kstride,koff,window", [(4, 7, 1 << 30), (1, 0, 200)])
@pytest.mark.parametrize("gated", [False, True])
def test_flash_dkdv_gpu_tiles(kstride, koff, window, gated):
    """dK/dV (and dq) on the tiles a GPU takes at G >= 16 (64 query rows x 128 keys, transposed products), with and
    without the core's gate plane, against autograd through the masked reference."""
    t, hq, hkv, d = 300, 16, 1, 16
    tk = t if kstride == 1 else (t - koff - 1) // kstride + 1
    q = _rand(1, t, hq, d, dtype=torch.float32, seed=41)
    k, v = _rand(1, tk, hkv, d, dtype=torch.float32, seed=42), _rand(1, tk, hkv, d, dtype=torch.float32, seed=43)
    do = torch.randn(1, t, hq, d, generator=torch.Generator().manual_seed(44)).to(q)
    g = torch.rand(1, t, hq, generator=torch.Generator().manual_seed(45)).to(q) if gated else torch.ones(1, t, hq).to(q)
    L = flash._Launch(q, k, v, kstride, koff, window, None, None, dkdv_tiles=(64, 128, 4, 1))
    assert L.dkdv[1]["BLOCK_N"] == 128 and L.dkdv[1]["BLOCK_T"] == 4
    with torch.no_grad():
        o, lse = flash.masked_forward(q, k, v, 0.3, L)
        delta = (o * do).sum(-1)
        got = flash.masked_backward(q, k, v, do, lse, delta, 0.3, L, gate=g.contiguous() if gated else None)
    want = torch.autograd.grad(_masked_attention(q, k, v, 0.3, kstride, koff, window), (q, k, v), do * g[..., None])
    for name, a, b in zip("qkv", got, want):
        _check(a, b, torch.float32, f"d{name}")


@pytest.mark.parametrize("hq", [4, 8, 16])
def test_flash_tuned_query_tiles(hq):
    """The compressed branch's forward and dq on the tiles a GPU takes for groups of ``flash.TUNED_MIN_GP`` heads
    and more (128 query rows = 128 / GP positions, 128 / 64 keys), G = 4 / 8 / 16, against the masked reference."""
    t, hkv, d, kstride, koff = 300, 1, 16, 4, 7
    tk = (t - koff - 1) // kstride + 1
    q = _rand(1, t, hq, d, dtype=torch.float32, seed=51)
    k, v = _rand(1, tk, hkv, d, dtype=torch.float32, seed=52), _rand(1, tk, hkv, d, dtype=torch.float32, seed=53)
    do = torch.randn(1, t, hq, d, generator=torch.Generator().manual_seed(54)).to(q)
    L = flash._Launch(q, k, v, kstride, koff, flash.NO_WINDOW, None, None)
    for name, tiles in (("fwd", flash.COMPRESSED_FWD_TILES), ("dq", flash.COMPRESSED_DQ_TILES)):
        const, opts = L._tiled(tiles[:2] + (tiles[2], 1))  # one stage: the interpreter
        setattr(L, name, ((triton.cdiv(t, const["BLOCK_T"]), hkv), const, opts))
    assert L.fwd[1]["BLOCK_T"] * L.fwd[1]["GP"] == flash.COMPRESSED_FWD_TILES[0]
    with torch.no_grad():
        o, lse = flash.masked_forward(q, k, v, 0.3, L)
        dq, _ = flash.masked_dq(q, k, v, do, lse, (o * do).sum(-1), 0.3, L)
    want = _masked_attention(q.requires_grad_(), k, v, 0.3, kstride, koff, flash.NO_WINDOW)
    _check(o, want, torch.float32, "o")
    _check(dq, torch.autograd.grad(want, q, do)[0], torch.float32, "dq")


@pytest.mark.parametrize("dk,dv,tma", [(128, 128, True), (64, 64, True), (192, 128, False), (128, 256, False)])
def test_selected_loops_take_tma_for_narrow_tiles_only(dk, dv, tma):
    """The per-position selected loops (G >= 16) fetch K/V by TMA up to 128-wide tiles; wider (head dims above 128)
    they load by pointers, which an H100 ran faster at dk/dv 192/128 (docs/benchmarks.md, twenty-third session)."""
    from nsa_parallel.kernels.select import _SelLaunch
    q = torch.zeros(1, 64, 16, dk, device=DEVICE, dtype=torch.float16)
    k = torch.zeros(1, 64, 1, dk, device=DEVICE, dtype=torch.float16)
    v = torch.zeros(1, 64, 1, dv, device=DEVICE, dtype=torch.float16)
    idx = torch.zeros(1, 64, 1, 4, device=DEVICE, dtype=torch.int32)
    L = _SelLaunch(q, k, v, idx, 16, None)
    assert L.loop and L.tma is tma and (set(L.kv(k, v)) == {"KD", "VD", "TMA"}) is tma


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hq,hkv,dk,dv", SHAPES[:3])
def test_selected_attention(t, hq, hkv, dk, dv, dtype, tma, monkeypatch):
    """G >= 16 (one position per program) takes its K/V blocks by TMA descriptors or by pointers."""
    monkeypatch.setattr(flash, "USE_TMA", tma)
    cfg = SMALL
    scores = torch.rand(2, hkv, t, cfg.num_select_blocks(t), generator=torch.Generator().manual_seed(t))
    idx = ref.select_topn(scores, cfg).to(DEVICE)
    q = _rand(2, t, hq, dk, dtype=dtype, seed=6)
    k, v = _rand(2, t, hkv, dk, dtype=dtype, seed=7), _rand(2, t, hkv, dv, dtype=dtype, seed=8)
    o, lse = selected_attention(q, k, v, idx, cfg.select_block, 0.25)
    r = ref.selected_attention(q, k, v, idx, cfg, 0.25)
    _check(o, r.o, dtype, "selected o")
    _check(lse, r.lse, dtype, "selected lse")
    for name, a, b in zip("qkv", _grads(o, (q, k, v)), _grads(r.o, (q, k, v))):
        _check(a, b, dtype, f"selected d{name}")


@pytest.mark.parametrize("cfg", [SMALL, NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                                                  select_topn=3, window=16),
                                 NSAConfig(compress_block=32, compress_stride=8, select_block=16,  # l > l'
                                           select_topn=3, window=16)])
# t = 300: several tiles of 16 selection blocks (spill carried across); the kernel orders its columns by G
@pytest.mark.parametrize("t,hq,hkv", [(75, 8, 2), (300, 8, 2), (75, 3, 1), (300, 16, 1), (75, 4, 4), (75, 64, 1)])
def test_selection_scores_and_topn(cfg, t, hq, hkv):
    dk = 16
    q = _rand(1, t, hq, dk, dtype=torch.float32, seed=9).detach()
    kc = _rand(1, cfg.num_compressed(t), hkv, dk, dtype=torch.float32, seed=10).detach()
    vc = torch.zeros_like(kc)
    _, lse = compressed_attention(q, kc, vc, cfg, 0.3)
    got = selection_scores(q, kc, lse, cfg, 0.3)                      # [b, t, hkv, ns]
    _, probs = ref.compressed_attention(q, kc, vc, cfg, 0.3, return_probs=True)
    want = ref.selection_scores(probs, hkv, t, cfg).permute(0, 2, 1, 3)
    _, valid = ref.forced_and_valid_blocks(t, cfg, q.device)
    valid = valid[None, :, None, :].expand_as(want)
    _check(got[valid], want[valid], torch.float32, "block scores")
    assert torch.equal(select_topn(got, cfg), ref.select_topn(want.permute(0, 2, 1, 3), cfg))


@pytest.mark.parametrize("q_offset", [0, 48])  # 48: a context-parallel chunk's queries
def test_select_blocks_in_query_chunks_equals_whole(q_offset, monkeypatch):
    """Scoring fixed-length batches a few query rows at a time gives the whole buffer's top-n."""
    from nsa_parallel.kernels import topn
    b, t, hq, hkv, dk = 2, 200, 4, 2, 16
    q = _rand(b, t, hq, dk, dtype=torch.float32, seed=3).detach()
    kc = _rand(b, SMALL.num_compressed(t + q_offset), hkv, dk, dtype=torch.float32, seed=4).detach()
    _, lse = compressed_attention(q, kc, torch.zeros_like(kc), SMALL, 0.3, q_offset=q_offset)
    whole = topn.select_blocks(q, kc, lse, SMALL, 0.3, q_offset=q_offset)
    # 64 query rows per chunk: 4 chunks
    monkeypatch.setattr(topn, "SCORES_BUFFER_BYTES", topn.SCORE_BYTES * b * hkv * 64)
    assert torch.equal(topn.select_blocks(q, kc, lse, SMALL, 0.3, q_offset=q_offset), whole)
    want = select_topn(selection_scores(q, kc, lse, SMALL, 0.3, q_offset=q_offset), SMALL, q_offset=q_offset)
    assert torch.equal(whole, want)


def test_packed_query_chunks_take_the_fixed_length_work_items(monkeypatch):
    """A packed batch whose longest sequence's buffers pass the budget goes in query chunks, cut into the same work
    items as the fixed-length batch's row chunks: the item size follows the entries a chunk lists (the short last
    chunk: short items), not the whole batch's."""
    from nsa_parallel.kernels import select
    t, hkv, g = 600, 2, 8
    monkeypatch.setattr(select, "SEL_BWD_CHUNK", 16)
    monkeypatch.setattr(select, "SEL_BWD_CHUNK_LONG", 64)
    gen = torch.Generator().manual_seed(7)
    idx = ref.select_topn(torch.rand(1, hkv, t, SMALL.num_select_blocks(t), generator=gen), SMALL)
    monkeypatch.setattr(select, "SEL_BWD_LONG_ENTRIES", 300 * hkv * idx.shape[-1])  # the 88-position tail is short
    q, k = torch.randn(1, t, hkv * g, 16, generator=gen), torch.randn(1, t, hkv, 16, generator=gen)
    ways = []
    for cu in (None, torch.tensor([0, t], dtype=torch.int32)):
        L = select._SelLaunch(q, k, k, idx, SMALL.select_block, cu)
        _, chunks = select._index_chunks(idx, L, 100, (t - 64) * 100)  # rows of 512 positions: [0, 512), [512, 600)
        way = []
        for s, m, qlist, (key, start, end), *_ in chunks:
            real = end > start
            way.append((s, m, key[real].tolist(), [qlist[a:b].tolist() for a, b in zip(start[real], end[real])]))
        ways.append(way)
    assert [(s, m) for s, m, *_ in ways[0]] == [(0, 512)] * hkv + [(512, 88)] * hkv
    assert max(len(x) for x in ways[0][-1][3]) == 16 and ways[1] == ways[0]


def test_packed_select_blocks_within_the_buffer_equals_whole(monkeypatch):
    """A packed batch whose scores pass the buffer is scored in runs of neighbouring sequences (and a sequence too
    long alone in query chunks): the same blocks as scoring it whole, no scores tensor above the budget."""
    from nsa_parallel.kernels import compress, topn
    from nsa_parallel.kernels.varlen import compressed_cu_seqlens
    lens, hq, hkv, dk = [300, 40, 0, 75, 30, 200], 4, 2, 16
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(DEVICE, torch.int32)
    ccu = compressed_cu_seqlens(cu, SMALL.compress_block, SMALL.compress_stride)
    q = _rand(1, sum(lens), hq, dk, dtype=torch.float32, seed=5).detach()
    kc = _rand(1, int(ccu[-1]), hkv, dk, dtype=torch.float32, seed=6).detach()
    _, lse = compressed_attention(q, kc, torch.zeros_like(kc), SMALL, 0.3, cu, ccu)
    whole = topn.select_blocks(q, kc, lse, SMALL, 0.3, cu, ccu)
    budget = topn.SCORE_BYTES * hkv * SMALL.num_select_blocks(75) * 120  # 120 rows of a 75-token sequence's width
    sizes, real = [], compress.score_pairs

    def spy(*a, **k):
        out = real(*a, **k)
        sizes.append((out.numel() * 4, out.shape[1]))
        return out
    monkeypatch.setattr(compress, "score_pairs", spy)
    monkeypatch.setattr(topn, "SCORES_BUFFER_BYTES", budget)
    assert torch.equal(topn.select_blocks(q, kc, lse, SMALL, 0.3, cu, ccu), whole)
    # 300: 64-row chunks; 40 + 0 + 75 together; 30 alone (with 75 it passes); 200 in chunks
    assert all(n <= budget or rows <= 64 for n, rows in sizes), sizes  # 64 rows: the chunks' floor
    assert [rows for _, rows in sizes] == [64, 64, 64, 64, 44, 115, 30, 64, 64, 64, 8], sizes
    want = select_topn(selection_scores(q, kc, lse, SMALL, 0.3, cu, ccu), SMALL, cu)
    assert torch.equal(whole, want)


def _nsa_both(b, t, hq, hkv, dk, dv, cfg, dtype, cu=None, seed=0):
    q, kvs, gate, ck, cv = make_inputs(b, t, hq, hkv, dk, dv, cfg, dtype=dtype, seed=seed, requires_grad=True,
                                       device=DEVICE)
    kw = dict(compress_k=ck, compress_v=cv, config=cfg, cu_seqlens=cu, return_block_indices=True)
    o, idx = nsa_attention(q, *kvs, gate, backend="triton", **kw)
    r, ridx = nsa_attention(q, *kvs, gate, backend="reference", **kw)
    inputs = [q, *kvs, gate, *ck.parameters(), *cv.parameters()]
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gate"] + \
        [f"phi_k.{n}" for n, _ in ck.named_parameters()] + [f"phi_v.{n}" for n, _ in cv.named_parameters()]
    return o, idx, r, ridx, inputs, names


def _check_nsa(o, idx, r, ridx, inputs, names, dtype):
    assert torch.equal(idx, ridx)
    _check(o, r, dtype, "nsa o")
    ga, gb = _grads(o, inputs), _grads(r, inputs)
    scale = max(x.abs().max().item() for x in gb)
    for name, a, b in zip(names, ga, gb):
        if name == "phi_k.b2":  # shifts every compressed score of a query equally: softmax cancels it, grad ~ 0
            assert (a - b).abs().max().item() < TOL[dtype] * scale, name
        else:
            _check(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("t,hq,hkv,dk,dv", [
    (70, 4, 2, 16, 8), (45, 3, 1, 8, 8),
    (40, 64, 1, 16, 16),  # G=64: the per-position selected kernels with 64-row accumulators
])
def test_nsa_triton_matches_reference(t, hq, hkv, dk, dv):
    _check_nsa(*_nsa_both(1, t, hq, hkv, dk, dv, SMALL, torch.float32), torch.float32)


@pytest.mark.parametrize("hq", [8, 32])
def test_nsa_triton_tuned_tiles_match_reference(hq, monkeypatch):
    """The core on the tiles a GPU takes in 16-bit (``flash.tuned_tiles``: the compressed branch's 128-row forward
    and dq tiles, dK/dV's 64 x 128) at G = 4 and 16, output and every gradient against the reference."""
    gpu_tiles_on_cpu(monkeypatch)
    _check_nsa(*_nsa_both(1, 150, hq, 2, 16, 16, SMALL, torch.float32, seed=4), torch.float32)


def test_nsa_triton_packed_sequences():
    lens = [37, 16, 5, 40]
    cu = torch.tensor([0, 37, 53, 58, 98], dtype=torch.int32, device=DEVICE)
    _check_nsa(*_nsa_both(1, sum(lens), 4, 2, 16, 16, SMALL, torch.float32, cu=cu, seed=2), torch.float32)


def test_packed_bounds_read_to_the_host_once(monkeypatch):
    """A packed batch's cu_seqlens is read to the host once per tensor (each read of a CUDA tensor is a sync that
    drains the GPU queue): both backends' forward and backward on one tensor read it once (the compressed bounds
    follow on the host); an in-place change is read again and takes effect."""
    from nsa_parallel.kernels import varlen
    reads, real = [], varlen._read
    monkeypatch.setattr(varlen, "_read", lambda cu: reads.append(cu) or real(cu))
    cu = torch.tensor([0, 37, 53, 58, 98], dtype=torch.int32, device=DEVICE)
    _check_nsa(*_nsa_both(1, 98, 4, 2, 16, 16, SMALL, torch.float32, cu=cu, seed=2), torch.float32)
    assert len(reads) == 1 and reads[0] is cu
    cu[1:4] = torch.tensor([20, 61, 70], dtype=torch.int32)
    _check_nsa(*_nsa_both(1, 98, 4, 2, 16, 16, SMALL, torch.float32, cu=cu, seed=2), torch.float32)
    assert len(reads) == 2
    assert varlen.sequence_bounds(cu) == [(0, 20), (20, 61), (61, 70), (70, 98)] and varlen.max_seqlen(cu) == 41


@pytest.mark.parametrize("initial,local,block,packed,on,handoff", [
    (1, 2, 16, False, True, True), (0, 1, 16, False, True, True), (2, 1, 16, True, True, True),
    (3, 3, 32, False, True, True),
    (1, 2, 16, True, True, False),  # dq of the chosen blocks recomputed from K and V, not from stored dS
    (1, 2, 16, False, True, "pairs"), (1, 2, 16, True, True, "pairs"),  # one (sequence, KV head) at a time
    (1, 2, 16, False, True, "chunks"), (1, 2, 16, True, True, "chunks"),  # ... and in query chunks of 64 positions
    (1, 2, 16, True, False, True),  # switched off: the selected loops walk whole lists
])
def test_nsa_triton_forced_blocks_in_window_kernels(initial, local, block, packed, on, handoff, monkeypatch):
    """G >= 16: the window kernels attend to the selected branch's forced blocks and the selected loops walk the
    rest of each list (forced.py), dq of those from the dS tiles that the dK/dV pass stores (``handoff``); output
    and every gradient against the reference."""
    from nsa_parallel.kernels import forced, select
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=block, select_topn=initial + local + 2,
                    select_initial=initial, select_local=local, window=24)
    monkeypatch.setattr(forced, "FORCED_TILES", on)
    monkeypatch.setattr(select, "SEL_DQ_FROM_DS", bool(handoff))
    row = 5 * 16 * 16 * 4  # one position's dS tiles of a KV head: 5 entries x 16 heads x 16 keys x 4 bytes
    budget = {"pairs": (75 if packed else 192) * row, "chunks": 64 * row}.get(handoff)  # 75: the longest sequence
    if budget:
        monkeypatch.setattr(select, "SEL_DS_BUFFER_BYTES", budget)
    launches = _launches(monkeypatch, select, "_sel_dq_ds_kernel")  # the dq kernel that reads the stored tiles
    calls = []
    real = forced.window_forced_forward
    monkeypatch.setattr(forced, "window_forced_forward", lambda *a: calls.append(1) or real(*a))
    import nsa_parallel.kernels.parallel as core
    monkeypatch.setattr(core, "window_forced_forward", forced.window_forced_forward)
    cu = torch.tensor([0, 75, 91, 160], dtype=torch.int32, device=DEVICE) if packed else None
    t = 160 if packed else 150
    _check_nsa(*_nsa_both(1, t, 32, 2, 16, 16, cfg, torch.float32, cu=cu, seed=3), torch.float32)
    assert len(calls) == on
    pairs = 6 if packed else 2
    chunks = 2 if packed else 3  # 64 (local) positions each: the longest sequence has 75, the fixed one 150
    assert len(launches) == (0 if not (on and handoff) else {"pairs": pairs, "chunks": chunks * pairs}.get(handoff,
                                                                                                        1))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("t,hq,hkv,dk,dv", [(4096, 64, 4, 128, 128), (2048, 16, 2, 192, 128), (3000, 8, 8, 64, 64),
                                            (2048, 64, 1, 192, 128),  # G=64: 4/8-warp selected loop kernels
                                            (4096, 32, 8, 128, 128)])  # G=4: KV-block-major forward, dq from dS
def test_gpu_nsa_bf16_paper_config(t, hq, hkv, dk, dv):
    cfg = NSAConfig()
    q, kvs, gate, ck, cv = make_inputs(1, t, hq, hkv, dk, dv, cfg, dtype=torch.float32, seed=7, device=DEVICE)
    # block choice is discrete: pick it from fp32 so that bf16 rounding cannot flip near-ties, then compare
    with torch.no_grad():
        _, idx32 = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton",
                                 return_block_indices=True)
        _, ridx32 = nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="reference",
                                  return_block_indices=True)
    agree = (idx32 == ridx32).float().mean().item()
    # TF32 dots on the GPU vs fp32 matmuls in the reference flip a few near-tied choices
    assert agree > 0.995, f"fp32 block selection agrees on {agree:.4%} of entries"
    bf = [x.detach().bfloat16().requires_grad_(True) for x in (q, *kvs)]
    scale = 1 / math.sqrt(dk)
    o, _ = selected_attention(bf[0], bf[3], bf[4], ridx32, cfg.select_block,
                              scale)
    r = ref.selected_attention(bf[0], bf[3], bf[4], ridx32, cfg, scale)
    _check(o, r.o, torch.bfloat16, "selected o")
    for name, a, b in zip("qkv", _grads(o, (bf[0], bf[3], bf[4])), _grads(r.o, (bf[0], bf[3], bf[4]))):
        _check(a, b, torch.bfloat16, f"selected d{name}")
    o, _ = position_masked_attention(bf[0], bf[5], bf[6], scale, 1, 0, cfg.window)
    r = ref.window_attention(bf[0], bf[5], bf[6], cfg, scale)
    _check(o, r.o, torch.bfloat16, "window o")
    for name, a, b in zip("qkv", _grads(o, (bf[0], bf[5], bf[6])), _grads(r.o, (bf[0], bf[5], bf[6]))):
        _check(a, b, torch.bfloat16, f"window d{name}")
    kc = ck(kvs[0]).detach().bfloat16().requires_grad_(True)
    vc = cv(kvs[1]).detach().bfloat16().requires_grad_(True)
    o, _ = compressed_attention(bf[0], kc, vc, cfg, scale)
    r = ref.compressed_attention(bf[0], kc, vc, cfg, scale)
    _check(o, r.o, torch.bfloat16, "compressed o")
    for name, a, b in zip(["q", "kc", "vc"], _grads(o, (bf[0], kc, vc)), _grads(r.o, (bf[0], kc, vc))):
        _check(a, b, torch.bfloat16, f"compressed d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("t,hq,hkv,d", [(4096, 64, 4, 128), (3000, 8, 8, 64),
                                         (2048, 32, 1, 256)])  # 256-wide heads: 32-key window tiles + forced blocks
def test_gpu_nsa_core_equals_its_branches_bf16(t, hq, hkv, d):
    """The one-function core (gate backward yielding the deltas, dq summed in one buffer, the compressed branch's
    own forward / dq tiles at G >= 16) against the separately tested branch functions composed by autograd, with
    the core's blocks: output and every gradient in bf16."""
    from nsa_parallel.kernels.gate import gate_combine
    from nsa_parallel.kernels.parallel import nsa_triton
    cfg, scale = NSAConfig(), 1 / math.sqrt(d)
    x = [_rand(1, n, h, d, dtype=torch.bfloat16, seed=40 + i)
         for i, (n, h) in enumerate([(t, hq), (cfg.num_compressed(t), hkv), (cfg.num_compressed(t), hkv)]
                                    + [(t, hkv)] * 4)]
    gate = torch.rand(1, t, hq, 3, generator=torch.Generator().manual_seed(47)).to(DEVICE, torch.bfloat16)
    gate.requires_grad_(True)
    out = nsa_triton(*x, gate, cfg, scale)
    q, kc, vc, ks, vs, kw, vw = x
    want = gate_combine(compressed_attention(q, kc, vc, cfg, scale)[0],
                        selected_attention(q, ks, vs, out.block_indices, cfg.select_block, scale)[0],
                        position_masked_attention(q, kw, vw, scale, 1, 0, cfg.window)[0], gate)
    _check(out.o, want, torch.bfloat16, "core o")
    names = ["q", "kc", "vc", "k_slc", "v_slc", "k_swa", "v_swa", "gate"]
    for name, a, b in zip(names, _grads(out.o, (*x, gate)), _grads(want, (*x, gate))):
        _check(a, b, torch.bfloat16, f"core d{name}")


def test_topn_kernel_breaks_ties_like_reference():
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_topn=5, window=8)
    sc = torch.rand(2, 97, 3, cfg.num_select_blocks(97), generator=torch.Generator().manual_seed(0))
    sc[0, 50, 0, :] = 0.5
    sc[1, 90, 2, ::2] = 0.25
    assert torch.equal(select_topn(sc.to(DEVICE), cfg).cpu(), ref.select_topn(sc.permute(0, 2, 1, 3), cfg))


@pytest.mark.parametrize("initial,local,n", [(1, 2, 5), (0, 1, 3), (2, 1, 4), (3, 3, 6), (1, 2, 3), (0, 2, 7)])
def test_topn_kernel_forced_blocks(initial, local, n):
    """The forced blocks (placed without search rounds) for every position, including the first ones, where
    they overlap or do not all exist yet; n = initial + local leaves no search round at all."""
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_topn=n, window=8,
                    select_initial=initial, select_local=local)
    sc = torch.rand(2, 75, 2, cfg.num_select_blocks(75), generator=torch.Generator().manual_seed(n))
    sc[1, 40:, 1, :] = 0.5  # ties everywhere: the lower block index wins
    assert torch.equal(select_topn(sc.to(DEVICE), cfg).cpu(), ref.select_topn(sc.permute(0, 2, 1, 3), cfg))


@pytest.mark.parametrize("prefilter", [False, True])
def test_topn_kernel_on_candidates(prefilter, monkeypatch):
    """Rows of at least 64 x TOPN_CANDIDATES blocks (here 2: rows from 128 blocks on) prefiltered to each block
    group's best candidates: ties, neighbouring winners, and rows where one group (blocks j % 32 == 1) holds more
    winners than it has candidates, which the rounds over the whole row must decide (without them this test fails)."""
    from nsa_parallel.kernels import topn
    monkeypatch.setattr(topn, "TOPN_PREFILTER", prefilter)
    monkeypatch.setattr(topn, "TOPN_CANDIDATES", 2)
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_topn=8, window=8)
    t = 700
    sc = torch.rand(1, t, 2, cfg.num_select_blocks(t), generator=torch.Generator().manual_seed(0))
    sc[0, 560:580, 1, :] = 0.5
    sc[0, 600:620, 0, 1::32] += 2.0  # blocks 1, 33, 65
    sc[0, 640:660, :, 20:40] += 2.0
    assert torch.equal(select_topn(sc.to(DEVICE), cfg).cpu(), ref.select_topn(sc.permute(0, 2, 1, 3), cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_topn_prefilter_at_64k_rows(monkeypatch):
    """The prefiltered top-n (4 candidates a group) on rows of up to 1024 blocks, as at 64k with the paper config
    (positions 48k..64k), scores from the selection-scores kernel's pairs of random inputs plus rows of ties and of
    one group's blocks winning: the same indices as the rounds over whole rows."""
    from nsa_parallel.kernels import topn
    cfg = NSAConfig()
    t, hkv, q_offset = 16384, 4, 49152
    ns = cfg.num_select_blocks(t + q_offset)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sc = torch.rand(1, t, hkv, ns, 2, generator=g, device=DEVICE)
    sc[0, :512, 1] = 0.5
    sc[0, 512:1024, 2, 7::32, 0] += 2.0
    got = {}
    for prefilter in (False, True):
        monkeypatch.setattr(topn, "TOPN_PREFILTER", prefilter)
        got[prefilter] = select_topn(sc, cfg, q_offset=q_offset)
    assert torch.equal(got[True], got[False])
    own = sc[..., 0] + torch.nn.functional.pad(sc[..., :-1, 1], (1, 0))
    # the reference sizes its rows' blocks from their own positions: the first 2048 rows see 800 of the 1024
    want = ref.select_topn(own[:, :2048, :, :cfg.num_select_blocks(2048 + q_offset)].permute(0, 2, 1, 3).cpu(), cfg,
                           q_offset=q_offset)
    assert torch.equal(got[True][:, :2048].cpu(), want.to(got[True].dtype))


def test_gate_combine_kernel():
    from nsa_parallel.kernels.gate import gate_combine
    o = [_rand(2, 9, 4, 12, dtype=torch.float32, seed=s) for s in range(3)]
    g = torch.rand(2, 9, 4, 3, device=DEVICE).requires_grad_(True)
    x, y = gate_combine(*o, g), ref.gate_combine(*o, g)
    _check(x, y, torch.float32, "gate o")
    for a, b in zip(_grads(x, o + [g]), _grads(y, o + [g])):
        _check(a, b, torch.float32, "gate grads")


def test_compressed_dkdv_query_split(monkeypatch):
    """The split of a key tile's queries over programs (long sequences) gives the same gradients."""
    import nsa_parallel.kernels.flash as flash
    monkeypatch.setattr(flash, "choose_q_split", lambda max_t, programs, window: 16 if window > max_t else 0)
    t, hq, hkv, dk, dv = 70, 4, 2, 16, 8
    q = _rand(2, t, hq, dk, dtype=torch.float32, seed=1)
    tc = SMALL.num_compressed(t)
    kc, vc = _rand(2, tc, hkv, dk, dtype=torch.float32, seed=2), _rand(2, tc, hkv, dv, dtype=torch.float32, seed=3)
    o, _ = compressed_attention(q, kc, vc, SMALL, 0.3)
    r = ref.compressed_attention(q, kc, vc, SMALL, 0.3)
    for name, a, b in zip(["q", "kc", "vc"], _grads(o, (q, kc, vc)), _grads(r.o, (q, kc, vc))):
        _check(a, b, torch.float32, f"split d{name}")


@pytest.mark.parametrize("long_lists", [False, True])  # the chunk size long index lists get
def test_selected_dkdv_many_work_items(monkeypatch, long_lists):
    """A block selected by many queries (block 0: by all) is split into several work items."""
    import nsa_parallel.kernels.select as sel
    monkeypatch.setattr(sel, "SEL_BWD_CHUNK", 3)
    monkeypatch.setattr(sel, "SEL_BWD_CHUNK_LONG", 5)
    monkeypatch.setattr(sel, "SEL_BWD_LONG_ENTRIES", 0 if long_lists else 1 << 30)
    t, hq, hkv, dk, dv = 70, 4, 2, 16, 8
    idx = ref.select_topn(torch.rand(1, hkv, t, SMALL.num_select_blocks(t)), SMALL).to(DEVICE)
    q = _rand(1, t, hq, dk, dtype=torch.float32, seed=4)
    k, v = _rand(1, t, hkv, dk, dtype=torch.float32, seed=5), _rand(1, t, hkv, dv, dtype=torch.float32, seed=6)
    o, _ = selected_attention(q, k, v, idx, SMALL.select_block, 0.3)
    r = ref.selected_attention(q, k, v, idx, SMALL, 0.3)
    for name, a, b in zip("qkv", _grads(o, (q, k, v)), _grads(r.o, (q, k, v))):
        _check(a, b, torch.float32, f"items d{name}")


@pytest.mark.parametrize("hq", [4, 16])  # G=4: union walk of neighbouring positions; G=16: one position per program
def test_selected_query_offset_and_key_buffers(hq):
    """What context parallelism asks of the selected kernels: a query chunk at an offset (block ids global), and
    keys held in two buffers whose partial outputs merge by log-sum-exp, both equal to one whole call."""
    b, t, hkv, d, blk = 2, 70, 1, 16, SMALL.select_block
    g = torch.Generator().manual_seed(hq)
    idx = ref.select_topn(torch.rand(b, hkv, t, SMALL.num_select_blocks(t), generator=g), SMALL).to(DEVICE)
    q = _rand(b, t, hq, d, dtype=torch.float32, seed=21).detach()
    k, v = _rand(b, t, hkv, d, dtype=torch.float32, seed=22).detach(), _rand(b, t, hkv, d, dtype=torch.float32,
                                                                            seed=23).detach()
    o, lse = selected_attention(q, k, v, idx, blk, 0.3)
    s = 2 * blk
    o_q, lse_q = selected_attention(q[:, s:].contiguous(), k, v, idx[:, s:].contiguous(), blk, 0.3, q_offset=s)
    _check(o_q, o[:, s:], torch.float32, "query chunk o")
    _check(lse_q, lse[:, s:], torch.float32, "query chunk lse")
    (o1, l1), (o2, l2) = (selected_attention(q, k[:, a:e].contiguous(), v[:, a:e].contiguous(), idx, blk, 0.3,
                                             k_base=a) for a, e in ((0, s), (s, t)))
    lse_m = torch.logaddexp(l1, l2)
    o_m = o1 * torch.exp(l1 - lse_m)[..., None] + o2 * torch.exp(l2 - lse_m)[..., None]
    _check(o_m, o, torch.float32, "two key buffers o")
    _check(lse_m, lse, torch.float32, "two key buffers lse")


def _small_g_case(packed, dtype, seed: int, data_seed: int):
    """The small-G selected-attention tests' inputs (8 query / 2 KV heads, dk 16, dv 8): ``(b, t, cu, seqs, idx, q,
    k, v)``, two sequences of 150 tokens or one packed batch of 37 + 16 + 45 (``packed == "long"``: 150 + 20 +
    130), top-n block lists per sequence."""
    b, t, hq, hkv, dk, dv = 2, 150, 8, 2, 16, 8
    lens = ([150, 20, 130] if packed == "long" else [37, 16, 45]) if packed else None
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32) if packed else None
    if packed:
        b, t = 1, sum(lens)
    g = torch.Generator().manual_seed(seed)
    seqs = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())] if packed else [(0, t)]
    idx = torch.cat([ref.select_topn(torch.rand(b, hkv, e - s, SMALL.num_select_blocks(e - s), generator=g), SMALL)
                     for s, e in seqs], dim=1).to(DEVICE)
    q = _rand(b, t, hq, dk, dtype=dtype, seed=data_seed)
    k, v = (_rand(b, t, hkv, d, dtype=dtype, seed=data_seed + i) for i, d in ((1, dk), (2, dv)))
    return b, t, cu, seqs, idx, q, k, v


@pytest.mark.parametrize("case", ["whole", "query-chunks", "pair-groups", "fp16", "packed", "packed-chunks",
                                  "offsets", "core"])
def test_selected_forward_kv_block_major(case, monkeypatch):
    """G < 16 with ``select.SEL_FWD_KMAJOR``: each block's queries attend to it in full tiles and a merge kernel
    combines a position's per-block softmaxes, against the reference (gradients too), with the partials' budget
    forcing query chunks or groups of (sequence, KV head) pairs (a packed batch whose longest sequence's partials do
    not fit: chunks of its sequences' local positions); context parallelism's query offset and key buffers equal
    the union walk's."""
    from nsa_parallel.kernels import select
    monkeypatch.setattr(select, "SEL_FWD_KMAJOR", True)
    merges = _launches(monkeypatch, select, "_sel_merge_kernel")
    dtype = torch.float16 if case == "fp16" else torch.float32
    b, t, hq, hkv, dk, dv, blk = 2, 150, 8, 2, 16, 8, SMALL.select_block
    row = SMALL.select_topn * 4 * (dv * (2 if case == "fp16" else 4) + 4)  # one position's partials, G = 4
    budget = {"query-chunks": 64 * row, "pair-groups": 2 * t * row, "packed-chunks": 64 * row}.get(case)
    if budget:
        monkeypatch.setattr(select, "SEL_FWD_BUFFER_BYTES", budget)
    if case == "core":
        _check_nsa(*_nsa_both(1, 90, 4, 2, 16, 8, SMALL, torch.float32, seed=4), torch.float32)
        assert merges == [(90, 2)]
        return
    packed = {"packed": True, "packed-chunks": "long"}.get(case, False)
    b, t, cu, seqs, idx, q, k, v = _small_g_case(packed, dtype, len(case), 31)
    if case == "offsets":  # a query chunk at an offset, and keys in two buffers, against the union walk
        s = 3 * blk
        runs = [dict(q=q[:, s:], idx=idx[:, s:], q_offset=s)] + [dict(k=k[:, a:e], v=v[:, a:e], k_base=a)
                                                                 for a, e in ((0, s), (s, t))]
        for run in runs:
            args = [run.pop(n, x).detach().contiguous() for n, x in zip(("q", "k", "v", "idx"), (q, k, v, idx))]
            got = selected_attention(*args, blk, 0.3, **run)
            monkeypatch.setattr(select, "SEL_FWD_KMAJOR", False)
            want = selected_attention(*args, blk, 0.3, **run)
            monkeypatch.setattr(select, "SEL_FWD_KMAJOR", True)
            _check(got[0], want[0], dtype, "offsets o")
            lse_ok = torch.isfinite(want[1])  # rows with no block in a key buffer: -inf both
            assert torch.equal(torch.isfinite(got[1]), lse_ok)
            _check(got[1][lse_ok], want[1][lse_ok], dtype, "offsets lse")
        assert len(merges) == 3
        return
    o, lse = selected_attention(q, k, v, idx, blk, 0.3, cu)
    want = [ref.selected_attention(*(x[:, s:e] for x in (q, k, v, idx)), SMALL, 0.3) for s, e in seqs]
    r_o, r_lse = (torch.cat([getattr(w, n) for w in want], dim=1) for n in ("o", "lse"))
    _check(o, r_o, dtype, "selected o")
    _check(lse, r_lse, dtype, "selected lse")
    for name, a, c in zip("qkv", _grads(o, (q, k, v)), _grads(r_o, (q, k, v))):
        _check(a, c, dtype, f"selected d{name}")
    pairs = b * hkv if cu is None else 3 * hkv
    assert merges == {"whole": [(t, pairs)], "fp16": [(t, pairs)], "query-chunks":
                      [(m, 1) for m in (64, 64, 22) for _ in range(pairs)], "pair-groups": [(t, 2), (t, 2)],
                      "packed": [(45, pairs)], "packed-chunks": [(m, 1) for m in (64, 64, 22) for _ in range(pairs)]
                      }[case]


@pytest.mark.parametrize("shares", [False, True], ids=["ds", "dq-shares"])
@pytest.mark.parametrize("case", ["standalone", "query-chunks", "packed", "packed-chunks", "core", "offsets"])
def test_selected_dq_from_ds_small_g(case, shares, monkeypatch):
    """G < 16 with ``select.SEL_DQ_FROM_DS_SMALL_G``: the dK/dV pass stores every listed block's dS tile and dq
    reads them with K (zero rows padding the product to 16), or with ``SEL_DQ_PARTIALS_SMALL_G`` each entry's dq
    share (dS K) and dq sums them; dq stored (standalone) or added onto the other branches' (the NSA core), delta
    from the output first; all gradients against the reference, and for a context-parallel ring step's query
    offset and key buffer against the union walk's."""
    from nsa_parallel.kernels import select
    monkeypatch.setattr(select, "SEL_DQ_FROM_DS_SMALL_G", True)
    monkeypatch.setattr(select, "SEL_DQ_PARTIALS_SMALL_G", shares)
    grids = _launches(monkeypatch, select, "_sel_dq_sum_kernel" if shares else "_sel_dq_ds_kernel")
    b, t, hq, hkv, dk, dv, blk = 2, 150, 8, 2, 16, 8, SMALL.select_block
    if case.endswith("chunks"):  # 64 positions' tiles of one KV head: 4 entries x 4 heads x 16 keys (or dk) x 4 bytes
        monkeypatch.setattr(select, "SEL_DS_BUFFER_BYTES", 64 * SMALL.select_topn * 4 * blk * 4)
    if case == "core":
        _check_nsa(*_nsa_both(1, 90, 4, 2, 16, 8, SMALL, torch.float32, seed=5), torch.float32)
        assert grids == [(90, 2)]
        return
    b, t, cu, seqs, idx, q, k, v = _small_g_case({"packed": True, "packed-chunks": "long"}.get(case, False),
                                                 torch.float32, 7, 41)
    if case == "offsets":  # queries from 48 on, keys [32, 150) (blocks outside it skipped), vs the union walk
        s, a = 3 * blk, 2 * blk
        args = [x.detach()[:, f:].contiguous().requires_grad_(True) for x, f in ((q, s), (k, a), (v, a))]
        got = _grads(selected_attention(*args, idx[:, s:].contiguous(), blk, 0.3, q_offset=s, k_base=a)[0], args)
        monkeypatch.setattr(select, "SEL_DQ_FROM_DS_SMALL_G", False)
        want = _grads(selected_attention(*args, idx[:, s:].contiguous(), blk, 0.3, q_offset=s, k_base=a)[0], args)
        for name, x, y in zip("qkv", got, want):
            _check(x, y, torch.float32, f"offsets d{name}")
        assert grids == [(t - s, b * hkv)]
        return
    o, _ = selected_attention(q, k, v, idx, blk, 0.3, cu)
    r_o = torch.cat([ref.selected_attention(*(x[:, s:e] for x in (q, k, v, idx)), SMALL, 0.3).o for s, e in seqs],
                    dim=1)
    for name, a, c in zip("qkv", _grads(o, (q, k, v)), _grads(r_o, (q, k, v))):
        _check(a, c, torch.float32, f"selected d{name}")
    assert grids == {"standalone": [(t, b * hkv)], "query-chunks": [(m, 1) for m in (64, 64, 22) for _ in range(4)],
                     "packed": [(45, 3 * hkv)],
                     "packed-chunks": [(m, 1) for m in (64, 64, 22) for _ in range(3 * hkv)]}[case]


def test_selected_attention_blocks_in_the_future(monkeypatch):
    """Block lists not from top-n may hold blocks wholly in a query's future (no key visible there): G < 16's
    KV-block-major forward and dq from dS give what the union walk gives (those blocks add nothing), no NaN."""
    from nsa_parallel.kernels import select
    q = _rand(1, 70, 4, 16, dtype=torch.float32, seed=51)
    k, v = _rand(1, 70, 2, 16, dtype=torch.float32, seed=52), _rand(1, 70, 2, 8, dtype=torch.float32, seed=53)
    # block 1 lies in the future of positions < 16, block 3 of positions < 48
    idx = torch.tensor([0, 1, 3, -1], dtype=torch.int32, device=DEVICE).expand(1, 70, 2, 4).contiguous()
    runs, empty = [], torch.empty

    def dirty(*shape, **kw):  # buffers as a caching allocator hands them out: never zeros to rely on
        x = empty(*shape, **kw)
        return x.fill_(float("nan") if x.is_floating_point() else -(1 << 20))
    for on, shares in ((True, False), (True, True), (False, False)):  # the union walk last: the reference
        monkeypatch.setattr(select, "SEL_FWD_KMAJOR", on)
        monkeypatch.setattr(select, "SEL_DQ_FROM_DS_SMALL_G", on)
        monkeypatch.setattr(select, "SEL_DQ_PARTIALS_SMALL_G", shares)
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", dirty)
            o, lse = selected_attention(q, k, v, idx, 16, 0.3)
            runs.append((o, lse, *_grads(o, (q, k, v))))
    assert torch.isfinite(runs[0][0]).all()
    for run in runs[:2]:
        for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], run, runs[-1]):
            _check(a, b, torch.float32, f"future blocks {name}")


@pytest.mark.parametrize("hq", [4, 16])  # G=2: KV-block-major forward, dq from dS; G=16: per-position loops
def test_selected_attention_of_no_tokens(hq):
    """A sequence of no tokens: empty output and gradients (no work item, no chunk of the partials' buffer)."""
    q, k, v = (torch.zeros(1, 0, h, d, device=DEVICE, requires_grad=True) for h, d in ((hq, 16), (2, 16), (2, 8)))
    o, lse = selected_attention(q, k, v, torch.zeros(1, 0, 2, 4, dtype=torch.int32, device=DEVICE), 16, 0.3)
    o.sum().backward()
    assert o.shape == (1, 0, hq, 8) and lse.shape == (1, 0, hq) and q.grad.shape == q.shape


def test_inverted_block_index():
    """Per (sequence, KV head, block): the queries that chose it, ascending; -1 and blocks outside [lo, hi) left
    out; packed sequences keep their own lists and local positions."""
    from nsa_parallel.kernels.select import invert_block_indices
    idx = torch.tensor([[0, 2, -1], [0, 1, 2], [1, 2, -1]], dtype=torch.int32).view(1, 3, 1, 3)
    lists = lambda q, o: [q[o[i]:o[i + 1]].tolist() for i in range(len(o) - 1)]  # noqa: E731
    assert lists(*invert_block_indices(idx, 3, None)) == [[0, 1], [1, 2], [0, 1, 2]]
    assert lists(*invert_block_indices(idx, 3, None, lo=1, hi=2)) == [[], [1, 2], []]
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)  # sequences of 1 and 2 tokens
    assert lists(*invert_block_indices(idx, 3, cu)) == [[0], [], [0], [0], [0, 1], [0, 1]]
    # entries: where each listed query's block sits in indices (the dS handoff's slots)
    qlist, offsets, entries = invert_block_indices(idx, 3, None, entries=True)
    assert entries.dtype == torch.int32 and lists(entries, offsets) == [[0, 3], [4, 6], [1, 5, 7]]
    assert (idx.flatten()[entries[:offsets[-1]].long()] ==
            torch.repeat_interleave(torch.arange(3), (offsets[1:] - offsets[:-1]).long())).all()


def test_work_items_cover_every_query_once():
    from nsa_parallel.kernels.select import work_items
    key, start, end = work_items(torch.tensor([0, 5, 5, 12, 13], dtype=torch.int32), 13, 3)
    real = start < end
    assert list(zip(key[real].tolist(), start[real].tolist(), end[real].tolist())) == \
        [(0, 0, 3), (0, 3, 5), (2, 5, 8), (2, 8, 11), (2, 11, 12), (3, 12, 13)]


@pytest.mark.parametrize("hq", [4, 32])  # G=2 and G=16: both selected-attention kernels
def test_packed_kernels_called_directly_equal_per_sequence(hq):
    """Kernels called on a packed batch without the longest length work it out themselves."""
    cu = torch.tensor([0, 37, 53, 98], dtype=torch.int32, device=DEVICE)
    q = _rand(1, 98, hq, 16, dtype=torch.float32, seed=11).detach()
    k, v = _rand(1, 98, 2, 16, dtype=torch.float32, seed=12).detach(), _rand(1, 98, 2, 8, dtype=torch.float32,
                                                                            seed=13).detach()
    o, _ = position_masked_attention(q, k, v, 0.3, 1, 0, SMALL.window, cu, cu)
    idx = torch.cat([ref.select_topn(torch.rand(1, 2, e - s, SMALL.num_select_blocks(e - s)), SMALL)
                     for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1).to(DEVICE)
    o_sel, _ = selected_attention(q, k, v, idx, SMALL.select_block, 0.3, cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        _check(o[:, s:e], position_masked_attention(q[:, s:e], k[:, s:e], v[:, s:e], 0.3, 1, 0, SMALL.window)[0],
               torch.float32, "packed window")
        _check(o_sel[:, s:e], selected_attention(q[:, s:e], k[:, s:e], v[:, s:e], idx[:, s:e], SMALL.select_block,
                                                 0.3)[0], torch.float32, "packed selected")


@pytest.mark.parametrize("shape,dtype", [((2, 5, 3, 24), torch.float16), ((1, 70, 4, 128), torch.float32)])
def test_row_dot_kernel(shape, dtype):
    from nsa_parallel.kernels.flash import row_dot
    o, do = (_rand(*shape, dtype=dtype, seed=s).detach() for s in (41, 42))
    want = (o.float() * do.float()).sum(-1)
    assert row_dot(o, do).shape == want.shape
    _check(row_dot(o, do), want, torch.float32, "delta")
