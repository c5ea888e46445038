"""Megatron-Core side of NSA: the self-attention module, its core attention and the transformer-layer spec."""
from .attention import NSACoreAttention, NSASelfAttention
from .cpu_shims import enable_cpu_shims
from .spec import get_gpt_layer_nsa_spec, nsa_layer_spec

__all__ = ["NSACoreAttention", "NSASelfAttention", "enable_cpu_shims", "get_gpt_layer_nsa_spec", "nsa_layer_spec"]
