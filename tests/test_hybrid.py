"""NSA as the attention layer of megatron-core's HybridModel (>= 0.19): the spec's named errors everywhere, and
where HybridModel exists, a model of NSA layers equal to GPTModel built from the same layer spec."""
import importlib.util
import warnings

import pytest
import torch

from conftest import SMALL

warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

pytest.importorskip("megatron.core")
from test_megatron import _config, model_parallel  # noqa: E402,F401  (the fixture, shared)

from nsa_parallel.megatron import hybrid  # noqa: E402
from nsa_parallel.megatron.spec import transformer_engine_available  # noqa: E402

HAVE_HYBRID = importlib.util.find_spec("megatron.core.models.hybrid") is not None


def test_hybrid_spec_names_what_it_needs():
    from megatron.core.transformer.spec_utils import import_module
    if HAVE_HYBRID and transformer_engine_available():
        spec = hybrid.get_hybrid_nsa_stack_spec(nsa_config=SMALL)
        assert spec.submodules.attention_layer.submodules.self_attention.module.__name__ == "NSASelfAttention"
        return
    if not HAVE_HYBRID:
        match = r"HybridModel needs megatron-core >= 0\.19 \(this is .*GPTModel"
    else:
        match = (r"HybridStack builds its final norm with Transformer Engine.*"
                 r"get_gpt_layer_nsa_spec\(transformer_impl='local'\)")
    with pytest.raises(ValueError, match=match):
        hybrid.get_hybrid_nsa_stack_spec(nsa_config=SMALL)
    # the --spec target: megatron's import_module answers an ImportError with None (and HybridModel then builds
    # its default, non-NSA stack), so the error must reach the user as itself
    with pytest.raises(ValueError, match=match):
        import_module(("nsa_parallel.megatron.hybrid_spec", "nsa_hybrid_stack_spec"))


@pytest.mark.skipif(not HAVE_HYBRID, reason="HybridModel needs megatron-core >= 0.19")
def test_hybrid_model_of_nsa_layers_equals_gpt_model(model_parallel, monkeypatch):  # noqa: F811
    """Pattern ``**`` (two NSA layers, local flavour) against GPTModel built from the stack's attention layer: same
    weights (after one rename), same logits and gradients. Without transformer-engine HybridStack's TENorm is swapped
    for megatron's torch norm, the only TE piece such a stack builds."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    if not transformer_engine_available():
        monkeypatch.setattr(hybrid, "transformer_engine_available", lambda: True)
        monkeypatch.setattr(hybrid_block, "TENorm", lambda config, hidden_size, eps=1e-5, has_residual=False:
                            WrappedTorchNorm(config, hidden_size, eps))
    cfg = _config()
    stack = hybrid.get_hybrid_nsa_stack_spec(cfg, nsa_config=SMALL, backend="reference", transformer_impl="local")
    layer = stack.submodules.attention_layer
    assert layer.submodules.self_attention.module.__name__ == "NSASelfAttention"
    assert layer.submodules.mlp.__name__ == "IdentityOp"
    torch.manual_seed(0)
    kw = dict(config=cfg, vocab_size=64, max_sequence_length=96, position_embedding_type="learned_absolute")
    hyb = HybridModel(hybrid_stack_spec=stack, hybrid_layer_pattern="**", **kw)
    gpt = GPTModel(transformer_layer_spec=layer, **kw)
    rename = lambda name: name.replace("decoder.final_norm.", "decoder.final_layernorm.")  # noqa: E731
    hs = hyb.state_dict()
    assert {rename(k) for k in hs} == set(gpt.state_dict())
    gpt.load_state_dict({rename(k): v for k, v in hs.items()})

    tokens = torch.randint(0, 64, (2, 95), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(95)[None].expand(2, -1)
    losses = [m(tokens, pos, None, labels=tokens) for m in (hyb, gpt)]
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for loss in losses:
        loss.float().mean().backward()
    theirs = dict(gpt.named_parameters())
    for name, p in hyb.named_parameters():
        assert torch.allclose(p.grad, theirs[rename(name)].grad, rtol=1e-5, atol=1e-7), name
    phi = hyb.decoder.layers[1].self_attention.core_attention.compress_k.w1
    assert phi.grad.abs().sum() > 0
