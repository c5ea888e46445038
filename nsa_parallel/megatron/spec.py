"""Transformer-layer specs that put NSA into Megatron-Core's GPT layer.

- megatron-core >= 0.19: ``--spec nsa_parallel.megatron get_gpt_layer_nsa_spec`` (called with the model config).
- megatron-core 0.16-0.18: the builder hands the object straight to GPTModel, so pass the module-level
  ``nsa_layer_spec`` or build one in code with ``get_gpt_layer_nsa_spec(nsa_config=...)``.

With stock ``pretrain_gpt.py --spec ...`` nothing passes NSA settings in: they are the paper defaults, or the JSON
file named by the environment variable ``NSA_CONFIG`` (keys: the :class:`NSAConfig` fields and ``backend``), read
when the spec is built.

Two flavours: ``local`` (megatron.core's own layers, always available) and ``transformer_engine`` (TE's fused
layernorm + column-parallel projection and TE's row-parallel output; needs transformer-engine).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from typing import Optional, Tuple

from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..kernels import BACKENDS, NSAConfig
from .attention import NSACoreAttention, NSASelfAttention

CONFIG_ENV = "NSA_CONFIG"


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def nsa_settings_from_env() -> Tuple[NSAConfig, Optional[str]]:
    """The NSAConfig and backend from the JSON file named by ``$NSA_CONFIG`` (paper defaults when unset)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return NSAConfig(), None
    with open(path) as f:
        raw = json.load(f)
    allowed = {f.name for f in fields(NSAConfig)} | {"backend"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{CONFIG_ENV}={path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    backend = raw.pop("backend", None)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{CONFIG_ENV}={path}: backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    return NSAConfig(**raw), backend


def get_gpt_layer_nsa_spec(config=None, nsa_config: Optional[NSAConfig] = None, backend: Optional[str] = None,
                           transformer_impl: Optional[str] = None) -> ModuleSpec:
    """Megatron's GPT layer spec with NSA self-attention.

    Args:
        config: the model's TransformerConfig (megatron-core >= 0.19 passes it): its ``normalization`` and, when
            ``transformer_impl`` is not given, its ``transformer_impl`` are used.
        nsa_config: NSA hyperparameters; default: ``$NSA_CONFIG``'s, else the paper's.
        backend: ``nsa_attention`` backend; default triton on CUDA tensors, reference otherwise.
        transformer_impl: ``"local"`` or ``"transformer_engine"``; default: the config's, else local.
    """
    if nsa_config is None:
        nsa_config, env_backend = nsa_settings_from_env()
        backend = backend or env_backend
    impl = transformer_impl or getattr(config, "transformer_impl", None) or "local"
    source = "transformer_impl" if transformer_impl else "config.transformer_impl (TransformerConfig's default)"
    normalization = getattr(config, "normalization", None)
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise ValueError(f"get_gpt_layer_nsa_spec: {source}='transformer_engine' needs transformer-engine, "
                             "which is not importable; allowed without it: 'local' (--transformer-impl local)")
        from megatron.core.extensions.transformer_engine import (TELayerNormColumnParallelLinear,
                                                                 TERowParallelLinear)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
        linear_qkv, linear_proj = TELayerNormColumnParallelLinear, TERowParallelLinear
    elif impl == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization) if normalization
                             else get_gpt_layer_local_spec())
        linear_qkv, linear_proj = ColumnParallelLinear, RowParallelLinear
    else:
        raise ValueError(f"get_gpt_layer_nsa_spec: transformer_impl={impl!r}; allowed: 'local', "
                         "'transformer_engine'")
    core = ModuleSpec(module=NSACoreAttention, params={"nsa_config": nsa_config, "backend": backend})
    spec.submodules.self_attention = ModuleSpec(
        module=NSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=linear_qkv, core_attention=core, linear_proj=linear_proj))
    return spec


nsa_layer_spec = get_gpt_layer_nsa_spec()
