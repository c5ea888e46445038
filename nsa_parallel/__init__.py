"""nsa-parallel: Native Sparse Attention (arXiv 2502.11089) for Megatron-Core, with Triton kernels and CP."""
from .kernels import Compression, NSAConfig, NSAConfigError, nsa_attention

__version__ = "0.1.0"
__all__ = ["Compression", "NSAConfig", "NSAConfigError", "nsa_attention", "__version__"]
