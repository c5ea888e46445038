"""``--nsa-*`` command-line arguments, generated from :class:`NSAConfig` so the two never drift apart."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .kernels import BACKENDS, NSAConfig
from .kernels.config import GATE_ACTIVATIONS


def _flag(name: str) -> str:
    return "--nsa-" + name.replace("_", "-")


def add_nsa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--nsa-<field>`` per NSAConfig field plus ``--nsa-backend`` (Megatron's extra-args style)."""
    group = parser.add_argument_group("NSA", "Native Sparse Attention hyperparameters (paper defaults)")
    for f in fields(NSAConfig):
        kw = dict(dest="nsa_" + f.name, default=f.default, help=f"{f.metadata['help']} Default: {f.default}.")
        if f.name == "gate_activation":
            kw["choices"] = GATE_ACTIVATIONS
        else:
            kw["type"] = int
        group.add_argument(_flag(f.name), **kw)
    group.add_argument("--nsa-backend", choices=BACKENDS, default=None,
                       help="NSA kernels: 'triton' on GPUs, 'reference' (plain PyTorch); default: triton on CUDA, "
                            "reference on CPU.")
    return parser


def nsa_config_from_args(args: argparse.Namespace) -> NSAConfig:
    """Build (and so validate) the NSAConfig that the parsed ``--nsa-*`` args describe."""
    return NSAConfig(**{f.name: getattr(args, "nsa_" + f.name) for f in fields(NSAConfig)})
