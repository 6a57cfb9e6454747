"""The runner's own layer loop must reproduce the model's forward, for every supported family."""

import pytest
import torch

from ragcache.engine.forward import TokenRun, run_tokens
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.stack import DecoderStack

from conftest import tiny_model


def own_logits(model, ids: torch.Tensor) -> torch.Tensor:
    stack = DecoderStack(model)
    buffer = KVBuffer(stack, ids.shape[0])
    buffer.length = ids.shape[0]
    out = run_tokens(stack, buffer, TokenRun.contiguous(ids, 0))
    return stack.logits(out.hidden)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": 16}),
    ],
    ids=["llama", "llama3-rope", "linear-rope", "yarn-rope", "qwen2", "mistral-window16"],
)
def test_layer_loop_matches_model_forward(family, overrides):
    model = tiny_model(family, **overrides)
    ids = torch.randint(0, 49152, (80,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0].float()
    assert torch.allclose(own_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_layer_loop_matches_model_forward_in_bfloat16():
    model = tiny_model(dtype=torch.bfloat16)
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids[None]).logits[0].float()
    # bfloat16 keeps 8 bits of mantissa: both paths round differently along 4 layers.
    assert (own_logits(model, ids) - expected).abs().max() < 0.05
