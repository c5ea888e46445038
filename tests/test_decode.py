"""Decoding with the NSA KV cache: step by step equals the full forward (reference, ragged prompts, batch 3), the
Triton decode kernels equal the reference decode (interpreter on CPU, bf16 on GPUs), bad inputs are named."""
import os

import pytest
import torch

from nsa_parallel.kernels import Compression, NSAConfig, nsa_attention
from nsa_parallel.kernels.cache import NSAKVCache
from nsa_parallel.kernels.decode import nsa_decode

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=16)
HQ, HKV, D = 4, 2, 16


def _sequence(t, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    q = mk(1, t, HQ, D)
    kvs = [mk(1, t, HKV, D) for _ in range(6)]
    gate = torch.rand(1, t, HQ, 3, generator=g, device=device).to(dtype)
    return q, kvs, gate


def _phi(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return (Compression(HKV, D, CFG.compress_block, CFG.compress_stride, device=device, dtype=dtype),
            Compression(HKV, D, CFG.compress_block, CFG.compress_stride, device=device, dtype=dtype))


def _decode_all(prompts, totals, backend, dtype=torch.float32, device="cpu"):
    """Prefill each sequence's first prompts[b] tokens, then decode up to totals[b]; returns per-step outputs
    ``{(b, position): o [hq, d]}`` and the full-forward outputs of the same sequences."""
    ck, cv = _phi(device, dtype)
    seqs = [_sequence(t, dtype, seed=b, device=device) for b, t in enumerate(totals)]
    bsz, tmax = len(totals), max(totals)
    cache = NSAKVCache(bsz, tmax, HKV, D, CFG, ck, cv, device=device, dtype=dtype, backend=backend)
    pad = lambda x, t: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, t - x.shape[1]))  # noqa: E731
    pmax = max(prompts)
    kvs = [torch.cat([pad(s[1][i][:, :p], pmax) for s, p in zip(seqs, prompts)]) for i in range(6)]
    cache.prefill(*kvs, lens=torch.tensor(prompts, device=device))
    got = {}
    for step in range(max(t - p for t, p in zip(totals, prompts))):
        # sequences that are done keep decoding padding (their outputs are not compared): ragged in practice
        pos = [min(p + step, t - 1) for p, t in zip(prompts, totals)]
        new = [torch.cat([s[1][i][:, q:q + 1] for s, q in zip(seqs, pos)]) for i in range(6)]
        live = [p + step < t for p, t in zip(prompts, totals)]
        if not all(live):
            break
        cache.append(*new)
        q = torch.cat([s[0][:, p] for s, p in zip(seqs, pos)])
        gate = torch.cat([s[2][:, p] for s, p in zip(seqs, pos)])
        o = nsa_decode(q, gate, cache, backend=backend)
        for b, p in enumerate(pos):
            got[(b, p)] = o[b]
    full = [nsa_attention(s[0], *s[1], s[2], compress_k=ck, compress_v=cv, config=CFG, backend="reference")[0]
            for s in seqs]
    return got, full


def test_decode_step_by_step_equals_full_forward():
    # ragged prompts: shorter than a compressed block, mid-window, past several selection blocks; decoding
    # crosses compressed-block, selection-block and window boundaries
    prompts, totals = [3, 37, 20], [40, 80, 60]
    got, full = _decode_all(prompts, [min(t, p + 40) for p, t in zip(prompts, totals)], "reference")
    assert len(got) > 100
    for (b, p), o in got.items():
        want = full[b][p]
        err = (o - want).abs().max() / want.abs().max()
        assert err < 1e-5, (b, p, err.item())


def test_prefill_only_first_token_and_errors():
    ck, cv = _phi()
    cache = NSAKVCache(2, 8, HKV, D, CFG, ck, cv, dtype=torch.float32)
    x = torch.zeros(2, 4, HKV, D)
    with pytest.raises(ValueError, match=r"lens=\[0, 4\] must be 2 lengths in \[1, 4\]"):
        cache.prefill(x, x, x, x, x, x, lens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"k_slc must be \[B=2, t=1, hkv=2, d=16\]"):
        cache.append(x[:, :1], x[:, :1], x, x[:, :1], x[:, :1], x[:, :1])
    cache.prefill(x, x, x, x, x, x, lens=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"q must be \[B=2"):
        nsa_decode(torch.zeros(3, HQ, D), torch.zeros(3, HQ, 3), cache, backend="reference")
    with pytest.raises(ValueError, match="backend='cuda'; allowed: reference, triton"):
        nsa_decode(torch.zeros(2, HQ, D), torch.zeros(2, HQ, 3), cache, backend="cuda")


HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_vs_reference(device, dtype, tol):
    prompts, totals = [3, 37, 20], [30, 70, 45]
    got_t, _ = _decode_all(prompts, totals, "triton", dtype, device)
    got_r, _ = _decode_all(prompts, totals, "reference", dtype, device)
    assert got_t.keys() == got_r.keys()
    for key, o in got_t.items():
        want = got_r[key].float()
        err = (o.float() - want).abs().max() / want.abs().max()
        assert err < tol, (key, err.item())


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run is for CPU hosts; GPUs run test_decode_triton_gpu")
# tiles 3: a program whose last tiles lie past n / the window; window partials in the top-n or the sparse launch
@pytest.mark.parametrize("tiles_per_program,window_tiles,window_in_topn", [(1, 2, True), (3, 1, True), (3, 3, False)])
def test_decode_triton_in_interpreter(tiles_per_program, window_tiles, window_in_topn, monkeypatch):
    assert INTERPRET  # conftest sets it before triton is imported
    from nsa_parallel.kernels import decode_triton
    monkeypatch.setattr(decode_triton, "SPARSE_TILES_PER_PROGRAM", tiles_per_program)
    monkeypatch.setattr(decode_triton, "WINDOW_TILES_PER_PROGRAM", window_tiles)
    monkeypatch.setattr(decode_triton, "WINDOW_IN_TOPN", window_in_topn)
    _triton_vs_reference("cpu", torch.float32, 1e-4)


def _append_both_backends(device, dtype, rows=None, monkeypatch=None):
    """Two caches (reference / triton append) of 20 ragged sequences, dk=16 != dv=32, phi hidden 24 (not a power
    of two) with fp32 weights; 6 appends cross block ends at different steps. Returns both caches."""
    if rows:
        from nsa_parallel.kernels import decode_triton
        monkeypatch.setattr(decode_triton, "APPEND_ROWS", rows)
    torch.manual_seed(0)
    ck = Compression(HKV, D, CFG.compress_block, CFG.compress_stride, hidden=24, device=device)
    cv = Compression(HKV, 2 * D, CFG.compress_block, CFG.compress_stride, hidden=24, device=device)
    for p in (*ck.parameters(), *cv.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    bsz, t = 20, 64
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 40, (bsz,), generator=g)
    kvs = [torch.randn(bsz, t, HKV, D * (1 + i % 2), generator=g).to(device, dtype) for i in range(6)]
    caches = [NSAKVCache(bsz, t, HKV, D, CFG, ck, cv, head_dim_v=2 * D, device=device, dtype=dtype,
                         backend=backend) for backend in ("reference", "triton")]
    for c in caches:
        c.prefill(*kvs, lens=lens.to(device))
    for _ in range(6):
        new = [torch.randn(bsz, 1, HKV, D * (1 + i % 2), generator=g).to(device, dtype) for i in range(6)]
        for c in caches:
            c.append(*new)
    return caches


@pytest.mark.skipif(HAS_CUDA, reason="interpreter; the GPU covers it through test_cache_append_triton_gpu")
@pytest.mark.parametrize("rows", [None, 8])  # 8: three programs per head, the last one partly past B
def test_cache_append_triton_equals_reference(rows, monkeypatch):
    ref_cache, tri = _append_both_backends("cpu", torch.float32, rows, monkeypatch)
    for name in ("lens", "k_slc", "v_slc", "k_swa", "v_swa", "k_raw", "v_raw"):
        assert torch.equal(getattr(tri, name), getattr(ref_cache, name)), name
    for name in ("k_cmp", "v_cmp"):  # phi in the kernel: fp32 accumulation in another order
        torch.testing.assert_close(getattr(tri, name), getattr(ref_cache, name), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cache_append_triton_gpu():
    ref_cache, tri = _append_both_backends("cuda", torch.bfloat16)
    for name in ("k_slc", "v_slc", "k_swa", "v_swa", "k_raw", "v_raw"):
        assert torch.equal(getattr(tri, name), getattr(ref_cache, name)), name
    for name in ("k_cmp", "v_cmp"):  # bf16 roundings of the hidden layer may differ by an ulp
        a, b = getattr(tri, name).float(), getattr(ref_cache, name).float()
        assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2, name


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run is for CPU hosts; GPUs run test_decode_triton_gpu")
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_triton_many_tiles_and_splits(splits, monkeypatch):
    """Block scores summed per tile of 16 compressed tokens (blocks straddling tiles and splits), ragged caches
    of 300 / 171 / 9 tokens: the same output and blocks as the reference."""
    from nsa_parallel.kernels import decode_triton
    from nsa_parallel.kernels import reference as ref
    monkeypatch.setattr(decode_triton, "CMP_BN", 16)
    monkeypatch.setattr(decode_triton, "SCORES_BJ", 8)  # several scores programs per (sequence, head)
    monkeypatch.setattr(decode_triton, "_num_splits", lambda *a: splits)
    ck, cv = _phi()
    lens = [300, 171, 9]
    cache = NSAKVCache(3, 300, HKV, D, CFG, ck, cv, dtype=torch.float32, backend="triton")
    kvs = [torch.randn(3, 300, HKV, D, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    cache.prefill(*kvs, lens=torch.tensor(lens))
    g = torch.Generator().manual_seed(9)
    q, gate = torch.randn(3, HQ, D, generator=g), torch.rand(3, HQ, 3, generator=g)
    o_t, i_t = nsa_decode(q, gate, cache, backend="triton", return_indices=True)
    o_r, i_r = nsa_decode(q, gate, cache, backend="reference", return_indices=True)
    assert torch.equal(i_t, i_r.to(i_t.dtype))
    assert ((o_t - o_r).abs().max() / o_r.abs().max()).item() < 1e-4
    _, scores = decode_triton.compressed_step(q, cache, D ** -0.5)
    for b, n in enumerate(lens):  # every block's score, not only the winners
        nc = CFG.num_compressed(n)
        _, probs = ref.compressed_attention(q[b:b + 1, None], cache.k_cmp[b:b + 1, :nc], cache.v_cmp[b:b + 1, :nc],
                                            CFG, D ** -0.5, return_probs=True, q_offset=n - 1)
        want = ref.selection_scores(probs, HKV, n, CFG)[0, :, 0]  # [hkv, ns]
        ns = want.shape[-1]
        torch.testing.assert_close(scores[b, :, :ns], want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run is for CPU hosts")
@pytest.mark.parametrize("window_in_topn", [True, False])
def test_decode_triton_odd_shapes(window_in_topn, monkeypatch):
    """G = 3 query heads per KV head, dk = 24 (not a power of two) != dv = 16, ragged caches of 200 / 57 / 5
    tokens, a window of 3 tiles in programs of 2: the Triton step gives the reference decode's output and blocks."""
    from nsa_parallel.kernels import decode_triton
    monkeypatch.setattr(decode_triton, "WINDOW_IN_TOPN", window_in_topn)
    monkeypatch.setattr(decode_triton, "WINDOW_TILES_PER_PROGRAM", 2)
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=48)
    hq, dk, dv, lens = 6, 24, 16, [200, 57, 5]
    torch.manual_seed(0)
    ck = Compression(HKV, dk, cfg.compress_block, cfg.compress_stride)
    cv = Compression(HKV, dv, cfg.compress_block, cfg.compress_stride)
    cache = NSAKVCache(3, 200, HKV, dk, cfg, ck, cv, head_dim_v=dv, dtype=torch.float32, backend="triton")
    g = torch.Generator().manual_seed(3)
    kvs = [torch.randn(3, 200, HKV, dk if i % 2 == 0 else dv, generator=g) for i in range(6)]
    cache.prefill(*kvs, lens=torch.tensor(lens))
    q, gate = torch.randn(3, hq, dk, generator=g), torch.rand(3, hq, 3, generator=g)
    o_t, i_t = nsa_decode(q, gate, cache, backend="triton", return_indices=True)
    o_r, i_r = nsa_decode(q, gate, cache, backend="reference", return_indices=True)
    assert o_t.shape == (3, hq, dv)
    assert torch.equal(i_t, i_r.to(i_t.dtype))
    assert ((o_t - o_r).abs().max() / o_r.abs().max()).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("window_in_topn,topn_chunks", [(True, 64), (False, 0)])
def test_decode_triton_gpu(window_in_topn, topn_chunks, monkeypatch):
    from nsa_parallel.kernels import decode_triton
    monkeypatch.setattr(decode_triton, "WINDOW_IN_TOPN", window_in_topn)
    monkeypatch.setattr(decode_triton, "TOPN_CHUNKS", topn_chunks)
    _triton_vs_reference("cuda", torch.bfloat16, 2e-2)


def _topn_kernel_vs_reference(scores, lens, cfg, chunks, candidates, monkeypatch, device="cpu"):
    """``_topn`` on ``scores [B, 1, ns]`` picks what the reference's stable sort picks."""
    from nsa_parallel.kernels import decode_triton
    from nsa_parallel.kernels import reference as ref
    monkeypatch.setattr(decode_triton, "TOPN_CHUNKS", chunks)
    monkeypatch.setattr(decode_triton, "TOPN_CANDIDATES", candidates)
    bsz, nsmax = scores.shape[0], scores.shape[-1]
    idx = torch.empty(bsz, 1, cfg.select_topn, dtype=torch.int32, device=device)
    args = decode_triton.topn_launch_args(cfg, nsmax, bsz, device)
    decode_triton._topn[(bsz,)](scores.to(device), lens.to(device), idx, args.pop("cand"), nsmax, HKV=1, **args)
    idx = idx.cpu()
    for b, n in enumerate(lens.tolist()):
        ns = cfg.num_select_blocks(n)
        want = ref.select_topn(scores[b:b + 1, :, None, :ns], cfg, q_offset=n - 1)[0, 0, 0]
        assert idx[b, 0].tolist() == want.tolist(), (b, idx[b, 0].tolist(), want.tolist())


@pytest.mark.skipif(HAS_CUDA, reason="interpreter; GPUs cover ties through test_decode_topn_threshold_gpu")
@pytest.mark.parametrize("topn", [4, 8])  # 1 and 5 free picks
@pytest.mark.parametrize("chunks", [0, 4])  # one argmax per pick; threshold from 4 chunk maxima
def test_decode_topn_ties_go_to_lower_blocks(topn, chunks, monkeypatch):
    """The decode top-n picks what the reference's stable sort picks, ties included."""
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=topn, window=16)
    lens = torch.tensor([200, 130, 64, 1], dtype=torch.int32)
    nsmax = 13  # ceil(200 / 16)
    base = torch.tensor([3., 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1])  # many ties at 1 and at 2
    scores = torch.stack([base, base.flip(0), torch.zeros(nsmax), base])[:, None].contiguous()  # [B, hkv=1, ns]
    _topn_kernel_vs_reference(scores, lens, cfg, chunks, 16, monkeypatch)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter; GPUs run test_decode_topn_threshold_gpu")
@pytest.mark.parametrize("chunks,candidates", [(0, 16), (16, 64), (64, 64), (128, 128), (16, 16)])
def test_decode_topn_threshold(chunks, candidates, monkeypatch, device="cpu"):
    """13 free picks of up to 300 blocks: random scores, scores rising towards the query (the picks cluster in
    the last chunks: up to 13 chunks' worth of candidates), coarse values with many ties, all equal; with 16
    candidate slots the clustered and tied rows overflow them and take the argmax fallback."""
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=16, window=16)
    nsmax = 300
    lens = torch.tensor([nsmax * 16, nsmax * 16, 3001, nsmax * 16, 250], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    rows = [torch.rand(nsmax, generator=g),
            torch.arange(nsmax, dtype=torch.float32) + 0.1 * torch.rand(nsmax, generator=g),
            torch.randint(0, 4, (nsmax,), generator=g).float(),
            torch.ones(nsmax),
            torch.rand(nsmax, generator=g)]
    _topn_kernel_vs_reference(torch.stack(rows)[:, None].contiguous(), lens, cfg, chunks, candidates, monkeypatch,
                              device)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("chunks,candidates", [(0, 16), (64, 64), (128, 128), (16, 16)])
def test_decode_topn_threshold_gpu(chunks, candidates, monkeypatch):
    test_decode_topn_threshold(chunks, candidates, monkeypatch, device="cuda")
