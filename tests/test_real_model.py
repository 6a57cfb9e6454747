"""The default model, SmolLM2-135M-Instruct from its GGUF file: where the claims are about the real thing."""

import pytest

from ragcache.demo import demo_example
from ragcache.engine.generate import SamplingParams
from ragcache.engine.loader import ModelSpec, load_model
from ragcache.engine.runner import BlendEngine, RagRequest
from ragcache.storage.cpu import CpuTier
from ragcache.storage.tiered import TieredStore

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def engine(real_model):
    return BlendEngine(real_model, TieredStore([CpuTier(1 << 30)]))


def test_default_model_loads_once_with_its_architecture(real_model):
    config = real_model.model.config
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 30, 3)
    assert load_model(ModelSpec()) is real_model
    assert len(real_model.fingerprint) == 16


def test_full_prefill_answers_from_the_documents(engine):
    question, documents = demo_example()
    answer = engine.generate(RagRequest(question, documents, mode="full", sampling=SamplingParams(max_tokens=24)))
    assert "Eiffel" in answer.text and answer.prompt_tokens > 500


def test_blend_modes_against_full_prefill_on_the_real_model(engine):
    question, documents = demo_example()
    engine.add_documents(list(documents))

    def run(mode, ratio=None):
        request = RagRequest(question, documents, mode=mode, blend_ratio=ratio, sampling=SamplingParams(max_tokens=1))
        return engine.generate(request, return_logprobs=True)

    full, everything, blended, reuse = run("full"), run("blend", 1.0), run("blend", 0.15), run("reuse")
    reference = full.first_token_logprobs

    def kl(result):
        return float((reference.exp() * (reference - result.first_token_logprobs)).sum())

    # r=1 recomputes every chunk token: full prefill's distribution, to float32 summation noise over 30 layers.
    assert (everything.first_token_logprobs - reference).abs().max() < 1e-3
    assert kl(everything) < 1e-5 < kl(reuse)  # pure reuse really does deviate on this prompt
    assert blended.chunk_hits == len(documents) and blended.chunk_misses == 0
    assert blended.token_ids == full.token_ids  # the same first token (fidelity over many prompts: `ragcache bench rag`)
    assert reuse.recomputed_fraction < blended.recomputed_fraction < 0.3
