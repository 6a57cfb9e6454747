"""Shared helpers: the real SmolLM2 tokenizer, tiny random models of each supported family, engines."""

from __future__ import annotations

import pytest
import torch

from ragcache.engine.loader import LoadedModel, ModelSpec, default_model_file, load_model, model_fingerprint
from ragcache.engine.runner import BlendEngine, EngineConfig
from ragcache.engine.stack import DecoderStack
from ragcache.kv import KVChunk
from ragcache.storage.cpu import CpuTier
from ragcache.storage.tiered import TieredStore
from redis_server import *  # noqa: F401,F403  real Redis fixtures: redis_url, redis_namespace, throwaway_redis, redis_cluster

DOCUMENTS = (
    "The Amazon river flows through Brazil, Peru and Colombia into the Atlantic Ocean.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, at 5,895 metres.",
    "The Danube passes through ten countries, more than any other river in the world.",
    "Lake Baikal in Siberia holds about a fifth of the fresh surface water on Earth.",
)
QUESTION = "Which river flows into the Atlantic Ocean?"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    path = default_model_file()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def kv_chunk(tokens: int = 4) -> KVChunk:
    """A small all-zero chunk for store tests: (1 layer, 1 head, tokens, 2 dims) of K and V."""
    return KVChunk(tuple(range(tokens)), torch.zeros(1, 1, tokens, 2), torch.zeros(1, 1, tokens, 2), "fp")


class ManualClock:
    """A clock that moves only when a test sets .now."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiny_config(family: str = "llama", vocab_size: int = 49152, **overrides):
    """A 4-layer random model of the given family; GQA (4 query heads, 2 KV heads) as the real ones."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**common)


def tiny_model(family: str = "llama", dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.to(dtype).eval().requires_grad_(False)


def loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer), "tiny-llama", torch.device("cpu"), model.dtype)


@pytest.fixture
def make_engine(tokenizer):
    def make(model=None, store=None, **config) -> BlendEngine:
        model = model if model is not None else tiny_model()
        return BlendEngine(loaded(model, tokenizer), store or TieredStore([CpuTier(1 << 30)]), EngineConfig(**config))

    return make


@pytest.fixture
def stack():
    return DecoderStack(tiny_model())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama and the real tokenizer saved as a model directory (the path users pass)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    return load_model(ModelSpec())
