"""Transformer-layer specs that put NSA into Megatron-Core's GPT layer.

- megatron-core >= 0.19: ``--spec nsa_parallel.megatron get_gpt_layer_nsa_spec`` (called with the model config).
- megatron-core 0.16-0.18: the builder hands the object straight to GPTModel, so pass the module-level
  ``nsa_layer_spec`` (paper hyperparameters) or build one in code with ``get_gpt_layer_nsa_spec(nsa_config=...)``.
Only the local (non-Transformer-Engine) flavour exists so far.
"""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..kernels import NSAConfig
from .attention import NSACoreAttention, NSASelfAttention


def get_gpt_layer_nsa_spec(config=None, nsa_config: Optional[NSAConfig] = None,
                           backend: Optional[str] = None) -> ModuleSpec:
    """Megatron's local GPT layer spec with NSA self-attention.

    Args:
        config: the model's TransformerConfig (megatron-core >= 0.19 passes it); unused for now.
        nsa_config: NSA hyperparameters (paper defaults when None).
        backend: ``nsa_attention`` backend; default triton on CUDA tensors, reference otherwise.
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    core = ModuleSpec(module=NSACoreAttention, params={"nsa_config": nsa_config or NSAConfig(), "backend": backend})
    spec.submodules.self_attention = ModuleSpec(
        module=NSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core,
                                           linear_proj=RowParallelLinear))
    return spec


nsa_layer_spec = get_gpt_layer_nsa_spec()
