"""Rotary position embedding applied to stored pre-RoPE keys.

Blending places each cached chunk at its real positions by rotating its keys once per
request: (layers, kv_heads, tokens, head_dim) keys against (tokens, head_dim) cos/sin
tables that the model's own rotary module computed (so every rope type and scaling is
honoured). This is the one elementwise pass over all reused keys on the critical path.
"""

from __future__ import annotations

import functools

import torch


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as transformers' Llama does it, in x's dtype.

    x: (..., tokens, head_dim); cos, sin: (tokens, head_dim).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_tokens, HALF: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one (layer, head, token) row of head_dim values
        token = row % num_tokens
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        x_row = x_ptr + row * 2 * HALF
        table = token * 2 * HALF
        x1 = tl.load(x_row + offs, mask=mask).to(tl.float32)
        x2 = tl.load(x_row + HALF + offs, mask=mask).to(tl.float32)
        cos1 = tl.load(cos_ptr + table + offs, mask=mask).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF + offs, mask=mask).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + offs, mask=mask).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + HALF + offs, mask=mask).to(tl.float32)
        out_row = out_ptr + row * 2 * HALF
        tl.store(out_row + offs, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + HALF + offs, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)

    return rope_kernel


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton twin of apply_rope_reference; computes in float32, stores in x's dtype."""
    import triton

    num_tokens, head_dim = x.shape[-2], x.shape[-1]
    if head_dim % 2 or cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(
            f"rope shapes do not match: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    num_rows = x.numel() // head_dim
    half = head_dim // 2
    _triton_kernel()[(num_rows,)](x, cos, sin, out, num_tokens, HALF=half, BLOCK=triton.next_power_of_2(half))
    return out


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dispatch: Triton on CUDA tensors when Triton is installed, the reference twin otherwise."""
    if x.is_cuda and _triton_available():
        return apply_rope_triton(x, cos, sin)
    return apply_rope_reference(x, cos, sin)
