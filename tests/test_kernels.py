"""The Triton RoPE kernel equals its PyTorch twin (through Triton's CPU interpreter here)."""

import pytest
import torch

from ragcache.kernels import rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rope_matches_reference(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rope._triton_kernel.cache_clear()  # build the kernel under the interpreter
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 8, generator=generator).to(dtype)  # (layers, kv_heads, tokens, head_dim)
    angles = torch.randn(5, 4, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    expected = rope.apply_rope_reference(x.float(), cos.float(), sin.float()).to(dtype)
    got = rope.apply_rope_triton(x, cos, sin)
    rope._triton_kernel.cache_clear()
    assert got.dtype == dtype
    # float32: the same arithmetic. bfloat16: both round an fp32 result; a tie may land one step (2**-8) apart.
    tolerance = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_dispatch_uses_the_reference_on_cpu():
    x, cos, sin = torch.ones(1, 1, 2, 4), torch.ones(2, 4), torch.zeros(2, 4)
    assert torch.equal(rope.apply_rope(x, cos, sin), x)
