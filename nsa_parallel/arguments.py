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


# constraints beyond ">= 1" that NSAConfig checks, and what the Triton backend adds, for the docs table
_CONSTRAINTS = {
    "compress_block": "multiple of `compress_stride`",
    "compress_stride": ">= 1; divides `compress_block` and `select_block`",
    "select_block": "multiple of `compress_stride`; power of two >= 16 with `--nsa-backend triton`",
    "select_topn": ">= `select_initial + select_local`",
    "select_initial": ">= 0",
    "select_local": ">= 1 (the query's own block)",
    "window": ">= 1; with context parallelism a chunk (seq / 2CP) must hold >= `window - 1` tokens",
    "gate_activation": "`sigmoid` or `softmax`",
}


def markdown_table() -> str:
    """The ``--nsa-*`` flags as the Markdown table in docs/arguments.md (a test keeps the two equal)."""
    lines = ["| flag | NSAConfig field | default | meaning | allowed |", "|---|---|---|---|---|"]
    for f in fields(NSAConfig):
        lines.append(f"| `{_flag(f.name)}` | `{f.name}` | {f.default} | {f.metadata['help'].replace('|', '/')} "
                     f"| {_CONSTRAINTS[f.name]} |")
    lines.append(f"| `--nsa-backend` | - | triton on CUDA, reference on CPU | which kernels run | "
                 f"{', '.join(f'`{b}`' for b in BACKENDS)} |")
    return "\n".join(lines)
