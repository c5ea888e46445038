"""NSA kernels: the plain-PyTorch reference (the oracle) and the Triton kernels, behind ``nsa_attention``."""
from .compression import Compression, unfold_blocks
from .config import NSAConfig, NSAConfigError
from .interface import BACKENDS, nsa_attention

__all__ = ["BACKENDS", "Compression", "NSAConfig", "NSAConfigError", "nsa_attention", "unfold_blocks"]
