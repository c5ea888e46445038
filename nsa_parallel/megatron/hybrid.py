"""NSA as the attention layer of megatron-core's ``HybridModel`` (megatron-core >= 0.19).

megatron-core 0.19 deprecates ``GPTModel`` (critical fixes only) in favour of ``HybridModel``, whose layers come
from a pattern (``--hybrid-layer-pattern``: ``*`` attention, ``-`` MLP, ``M`` Mamba, ``E`` MoE, ...) and one stack
spec. :func:`get_hybrid_nsa_stack_spec` is megatron's own ``hybrid_stack_spec`` with every ``*`` layer's
self-attention replaced by NSA; the other layer kinds stay Megatron's.

``HybridStack`` builds its final norm as ``TENorm`` whatever the layer specs say, so a ``HybridModel`` needs
transformer-engine; without it, use ``GPTModel`` with :func:`~nsa_parallel.megatron.get_gpt_layer_nsa_spec` (it still
works in 0.19). With Megatron-LM's hybrid entry point: ``--spec nsa_parallel.megatron.hybrid_spec
nsa_hybrid_stack_spec`` (NSA settings from ``$NSA_CONFIG``, as for the GPT spec).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from ..kernels import NSAConfig
from .spec import get_gpt_layer_nsa_spec, transformer_engine_available


def _megatron_hybrid_stack_spec() -> ModuleSpec:
    try:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    except ImportError as e:
        import megatron.core
        raise ValueError(f"get_hybrid_nsa_stack_spec: HybridModel needs megatron-core >= 0.19 (this is "
                         f"{getattr(megatron.core, '__version__', 'unknown')}: {e}); with older versions build "
                         "GPTModel with get_gpt_layer_nsa_spec") from e
    return hybrid_stack_spec


def get_hybrid_nsa_stack_spec(config=None, nsa_config: Optional[NSAConfig] = None, backend: Optional[str] = None,
                              transformer_impl: Optional[str] = None) -> ModuleSpec:
    """megatron-core's ``hybrid_stack_spec`` whose attention layers (``*`` in the pattern) run NSA.

    Args:
        config: the model's TransformerConfig (normalisation for the local flavour's input norm).
        nsa_config: NSA hyperparameters; default: ``$NSA_CONFIG``'s, else the paper's.
        backend: ``nsa_attention`` backend; default triton on CUDA tensors, reference otherwise.
        transformer_impl: ``"transformer_engine"`` (default, as Megatron's hybrid layers: the input norm fused
            into the q/K/V/gate projection) or ``"local"`` (megatron.core's norm and linears in the NSA layer).

    Raises:
        ValueError: megatron-core < 0.19 (no HybridModel), or transformer-engine not importable (HybridStack's
            final norm is always TE's).
    """
    stack = _megatron_hybrid_stack_spec()
    if not transformer_engine_available():
        raise ValueError("get_hybrid_nsa_stack_spec: megatron-core's HybridStack builds its final norm with "
                         "Transformer Engine (TENorm), which is not importable; without transformer-engine build "
                         "GPTModel with get_gpt_layer_nsa_spec(transformer_impl='local')")
    impl = transformer_impl or "transformer_engine"
    layer = get_gpt_layer_nsa_spec(config, nsa_config=nsa_config, backend=backend, transformer_impl=impl)
    # an attention-only layer: the pattern's '-' / 'E' layers carry the MLPs
    layer.submodules.pre_mlp_layernorm = IdentityOp
    layer.submodules.mlp = IdentityOp
    layer.submodules.mlp_bda = IdentityFuncOp
    layer.submodules.sharded_state_dict_keys_map = {
        k: v for k, v in layer.submodules.sharded_state_dict_keys_map.items() if not k.startswith("pre_mlp")}
    # megatron's spec object stays as it is (other models in the process may use it)
    return dataclasses.replace(stack, params=dict(stack.params),
                               submodules=dataclasses.replace(stack.submodules, attention_layer=layer))
