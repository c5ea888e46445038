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
@pytest.mark.parametrize("tiles_per_program", [1, 3])  # 3: a program whose last tiles lie past n / the window
def test_decode_triton_in_interpreter(tiles_per_program, monkeypatch):
    assert INTERPRET  # conftest sets it before triton is imported
    from nsa_parallel.kernels import decode_triton
    monkeypatch.setattr(decode_triton, "SPARSE_TILES_PER_PROGRAM", tiles_per_program)
    _triton_vs_reference("cpu", torch.float32, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_decode_triton_gpu():
    _triton_vs_reference("cuda", torch.bfloat16, 2e-2)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter; the GPU covers it through test_decode_triton_gpu")
def test_decode_topn_ties_go_to_lower_blocks():
    """The decode top-n (one sort + threshold) picks what the reference's stable sort picks, ties included."""
    from nsa_parallel.kernels import reference as ref
    from nsa_parallel.kernels.decode_triton import _p2, _topn
    lens = torch.tensor([200, 130, 64, 1], dtype=torch.int32)
    nsmax = 13  # ceil(200 / 16)
    base = torch.tensor([3., 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1])  # many ties at 1 and at 2
    scores = torch.stack([base, base.flip(0), torch.zeros(nsmax), base])[:, None].contiguous()  # [B, hkv=1, ns]
    idx = torch.empty(4, 1, CFG.select_topn, dtype=torch.int32)
    _topn[(4,)](scores, lens, idx, nsmax, HKV=1, SB=CFG.select_block, TOPN=CFG.select_topn,
                INIT=CFG.select_initial, LOCAL=CFG.select_local, BNS=_p2(nsmax), BTOP=_p2(CFG.select_topn))
    for b, n in enumerate(lens.tolist()):
        ns = CFG.num_select_blocks(n)
        want = ref.select_topn(scores[b:b + 1, :, None, :ns], CFG, q_offset=n - 1)[0, 0, 0]
        assert idx[b, 0].tolist() == want.tolist(), (b, idx[b, 0].tolist(), want.tolist())
