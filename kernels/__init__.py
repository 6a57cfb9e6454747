"""Kernels with their PyTorch reference twins (installed as ragcache.kernels).

The engine calls the dispatchers here; each picks the Triton kernel for CUDA tensors
and the twin everywhere else, so the CPU install never needs a GPU toolchain.
"""

from ragcache.kernels.rope import apply_rope

__all__ = ["apply_rope"]
