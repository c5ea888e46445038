"""Megatron-Core side of NSA: the self-attention module, its core attention and the transformer-layer spec."""
from .attention import NSACoreAttention, NSASelfAttention
from .cpu_shims import enable_cpu_shims
from .hybrid import get_hybrid_nsa_stack_spec
from .spec import get_gpt_layer_nsa_spec, nsa_layer_spec

__all__ = ["NSACoreAttention", "NSASelfAttention", "enable_cpu_shims", "get_gpt_layer_nsa_spec",
           "get_hybrid_nsa_stack_spec", "nsa_layer_spec"]
