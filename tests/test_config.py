"""NSAConfig validation and the input checks of nsa_attention: each bad value gets an error naming it."""
import pytest
import torch

from conftest import SMALL, make_inputs
from nsa_parallel.kernels import NSAConfig, NSAConfigError, nsa_attention


def test_paper_defaults():
    c = NSAConfig()
    assert (c.compress_block, c.compress_stride, c.select_block, c.select_topn, c.window) == (32, 16, 64, 16, 512)
    assert (c.select_initial, c.select_local, c.gate_activation) == (1, 2, "sigmoid")


@pytest.mark.parametrize("kwargs,field,allowed", [
    (dict(compress_block=24), "compress_block", "multiple of compress_stride=16"),
    (dict(select_block=40), "select_block", "multiple of compress_stride=16"),
    (dict(compress_stride=0), "compress_stride", ">= 1"),
    (dict(window=0), "window", ">= 1"),
    (dict(select_topn=2), "select_topn", "allowed: 3 or more"),
    (dict(select_local=0), "select_local", ">= 1"),
    (dict(select_initial=-1), "select_initial", ">= 0"),
    (dict(gate_activation="tanh"), "gate_activation", "allowed: sigmoid, softmax"),
    (dict(window=512.0), "window", "must be an int"),
])
def test_bad_values_named(kwargs, field, allowed):
    with pytest.raises(NSAConfigError) as e:
        NSAConfig(**kwargs)
    assert f"NSAConfig.{field}" in str(e.value) and allowed in str(e.value)


def _inputs(hq=4, hkv=2):
    return make_inputs(1, 20, hq, hkv, 8, 8, SMALL)


def test_heads_not_divisible_is_named_error():
    q, kvs, gate, ck, cv = make_inputs(1, 20, 6, 4, 8, 8, SMALL)
    with pytest.raises(ValueError, match=r"hq=6 must be a multiple of the KV heads hkv=4.*allowed.*\[1, 2, 3\]"):
        nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=SMALL)


def test_bad_backend_and_shapes_named():
    q, kvs, gate, ck, cv = _inputs()
    with pytest.raises(ValueError, match="backend='cuda'; allowed: reference, triton"):
        nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=SMALL, backend="cuda")
    with pytest.raises(ValueError, match="v_swa must be"):
        nsa_attention(q, *kvs[:5], kvs[5][:, :10], gate, compress_k=ck, compress_v=cv, config=SMALL)
    with pytest.raises(ValueError, match="gate must be"):
        nsa_attention(q, *kvs, gate[..., :2], compress_k=ck, compress_v=cv, config=SMALL)
    with pytest.raises(ValueError, match="k_cmp is torch.float64"):
        nsa_attention(q, kvs[0].double(), *kvs[1:], gate, compress_k=ck, compress_v=cv, config=SMALL)


@pytest.mark.parametrize("cu,msg", [
    ([0, 5, 19], "end at the packed length 20"),
    ([0, 10, 10, 20], "strictly increasing"),
    ([3, 20], "start at 0"),
])
def test_bad_cu_seqlens_named(cu, msg):
    q, kvs, gate, ck, cv = _inputs()
    with pytest.raises(ValueError, match=msg):
        nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=SMALL,
                      cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_cu_seqlens_needs_packed_batch():
    q, kvs, gate, ck, cv = make_inputs(2, 20, 4, 2, 8, 8, SMALL)
    with pytest.raises(ValueError, match="packed as \\[1, total, h, d\\]"):
        nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=SMALL,
                      cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))


@pytest.mark.parametrize("cfg,msg", [
    (NSAConfig(compress_block=16, compress_stride=8, select_block=48, select_topn=4, window=8),
     "NSAConfig.select_block to be a power of two >= 16 .* got 48"),
    (NSAConfig(compress_block=8, compress_stride=8, select_block=8, select_topn=4, window=8),
     "NSAConfig.select_block to be a power of two >= 16 .* got 8"),
    (NSAConfig(compress_block=24, compress_stride=12, select_block=36, select_topn=4, window=8),
     "power of two >= 16 .* got 36"),
])
def test_triton_backend_names_unsupported_block_sizes(cfg, msg):
    q, kvs, gate, ck, cv = make_inputs(1, 20, 4, 2, 8, 8, cfg)
    with pytest.raises(ValueError, match=msg):
        nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg, backend="triton")
