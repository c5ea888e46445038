"""A torch LayerNorm / RMSNorm that works under sequence parallelism, for the local (non-TE, non-apex) flavour.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``: each TP rank then normalises a different slice of
the sequence, so the norm weights' gradients differ per rank and must be summed. Megatron's
``finalize_model_grads`` does exactly that for parameters flagged ``sequence_parallel``; this norm sets the flag.
"""
from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (``config.normalization``) with Megatron's norm
    signature, its parameters flagged for the sequence-parallel gradient all-reduce."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"SequenceParallelTorchNorm: normalization={config.normalization!r}; allowed: "
                             f"{', '.join(norms)}")
        norm = norms[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(layer_spec, num_layers: int):
    """A TransformerBlock spec of ``num_layers`` copies of ``layer_spec`` whose norms (both per layer and the
    final one) are :class:`SequenceParallelTorchNorm`."""
    import copy

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    spec = copy.deepcopy(layer_spec)
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[spec] * num_layers, layer_norm=SequenceParallelTorchNorm))
