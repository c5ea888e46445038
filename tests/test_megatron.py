"""NSA inside megatron.core on CPU (gloo, one process): the layer's projection layout and math, a GPTModel built
from the NSA spec, and its named errors."""
import math
import os
import warnings

import pytest
import torch

from conftest import SMALL, rel_err

warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

megatron = pytest.importorskip("megatron.core")
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from nsa_parallel.kernels import nsa_attention  # noqa: E402
from nsa_parallel.megatron import get_gpt_layer_nsa_spec  # noqa: E402


@pytest.fixture(scope="module")
def model_parallel():
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def _config(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, use_cpu_initialization=True,
                hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, params_dtype=torch.float32)
    base.update(kw)
    return TransformerConfig(**base)


def test_layer_matches_per_group_reference(model_parallel):
    cfg = _config()
    spec = get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference")
    torch.manual_seed(0)
    attn = build_module(spec.submodules.self_attention, config=cfg, layer_number=1)
    s, b, h, d, groups, g = 70, 2, 64, 16, 2, 2
    hidden = torch.randn(s, b, h, requires_grad=True)
    out, _ = attn(hidden, None)
    # independent reading of the documented layout: per group [G q heads | k,v cmp | k,v slc | k,v swa | G*3 gates]
    mixed = hidden @ attn.linear_qkv.weight.t()
    width = g * d + 6 * d + 3 * g
    q, ks, gl = [], [[] for _ in range(6)], []
    for grp in range(groups):
        w = mixed[..., grp * width:(grp + 1) * width]
        q.append(w[..., :g * d].reshape(s, b, g, d))
        for i in range(6):
            ks[i].append(w[..., g * d + i * d:g * d + (i + 1) * d].reshape(s, b, 1, d))
        gl.append(w[..., g * d + 6 * d:].reshape(s, b, g, 3))
    to_bt = lambda xs: torch.cat(xs, 2).transpose(0, 1)  # noqa: E731
    core = attn.core_attention
    o = nsa_attention(to_bt(q), *[to_bt(x) for x in ks], torch.sigmoid(to_bt(gl)), compress_k=core.compress_k,
                      compress_v=core.compress_v, config=SMALL, scale=1 / math.sqrt(d))
    want = o.transpose(0, 1).reshape(s, b, -1) @ attn.linear_proj.weight.t()
    assert rel_err(out, want) < 1e-5
    g1 = torch.autograd.grad(out.square().sum(), hidden)[0]
    g2 = torch.autograd.grad(want.square().sum(), hidden)[0]
    assert rel_err(g1, g2) < 1e-5


def test_gpt_model_with_nsa_spec_trains(model_parallel):
    from megatron.core.models.gpt import GPTModel
    cfg = _config()
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_nsa_spec(nsa_config=SMALL),
                     vocab_size=64, max_sequence_length=96, position_embedding_type="learned_absolute")
    tokens = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(96)[None].expand(2, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    phi = model.decoder.layers[0].self_attention.core_attention.compress_k.w1
    assert phi.grad is not None and torch.isfinite(phi.grad).all() and phi.grad.abs().sum() > 0
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


def test_context_parallel_is_a_named_error(model_parallel):
    cfg = _config(context_parallel_size=2)
    with pytest.raises(ValueError, match="context_parallel_size=2 is not supported yet"):
        build_module(get_gpt_layer_nsa_spec().submodules.self_attention, config=cfg, layer_number=1)
