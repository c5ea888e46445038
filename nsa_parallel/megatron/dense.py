"""Dense causal attention through torch SDPA, for like-for-like comparisons with NSA (``--attention dense``).

Megatron's local ``DotProductAttention`` materialises ``[b, h, s, s]`` scores, which at 32k-64k tokens no GPU
holds; SDPA dispatches to the flash / cuDNN / memory-efficient kernels instead. With transformer-engine installed,
Megatron's TE spec (``get_gpt_layer_with_transformer_engine_spec``) is the other like-for-like choice.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from ..metrics import RegionTimer


class SDPACoreAttention(MegatronModule):
    """Causal ``F.scaled_dot_product_attention`` on Megatron's ``[s, b, h, d]`` tensors (GQA by repeating K/V)."""

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale: Optional[float] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention is causal only: attn_mask_type must be AttnMaskType.causal, "
                             f"got {attn_mask_type}")
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError(f"SDPACoreAttention: context_parallel_size={config.context_parallel_size} is not "
                             "supported (allowed: 1); use Megatron's TE spec for dense context parallelism")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.collect_stats = False  # set by the trainer on logging steps: time the attention then
        self.timer = RegionTimer()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query ``[s, b, hq, d]``, key/value ``[s, b, hkv, d]`` -> ``[s, b, hq * d]``."""
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention does not take packed sequences (packed_seq_params must be None)")
        s, b, hq, _ = query.shape
        group = hq // key.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if self.collect_stats:
            q, k, v = self.timer.enter(q, k, v)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        if self.collect_stats:
            o = self.timer.leave(o)
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)


def get_gpt_layer_dense_spec(config=None) -> ModuleSpec:
    """Megatron's local GPT layer spec with :class:`SDPACoreAttention` as its core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
