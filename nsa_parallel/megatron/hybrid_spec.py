"""The ``--spec`` target for Megatron-LM's hybrid entry point: ``--spec nsa_parallel.megatron.hybrid_spec
nsa_hybrid_stack_spec`` (megatron-core >= 0.19 with transformer-engine; NSA settings from ``$NSA_CONFIG``).

A module of its own because megatron's ``import_module`` reads the attribute at import: building it needs what
:func:`~nsa_parallel.megatron.hybrid.get_hybrid_nsa_stack_spec` needs, and a missing piece must stop the run with its
ValueError rather than an ImportError, which megatron would log and answer with its default (non-NSA) stack.
"""
from .hybrid import get_hybrid_nsa_stack_spec

nsa_hybrid_stack_spec = get_hybrid_nsa_stack_spec()
