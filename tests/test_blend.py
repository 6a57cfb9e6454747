"""Blending: r=1 is full prefill, r=0 is plain concatenation, exact KV where the math says so."""

import pytest
import torch

from ragcache.engine.blend import BlendConfig, blend
from ragcache.engine.chunks import compute_chunks
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.forward import TokenRun, causal_mask, run_tokens
from ragcache.engine.kvbuffer import KVBuffer
from ragcache.engine.prompt import build_rag_prompt
from ragcache.engine.stack import DecoderStack
from ragcache.engine.generate import SamplingParams
from ragcache.kernels.rope import apply_rope_reference
from ragcache.engine.runner import RagRequest

from conftest import DOCUMENTS, QUESTION, tiny_model


def cached_parts(stack, tokenizer, documents=DOCUMENTS):
    parts = build_rag_prompt(tokenizer, QUESTION, documents)
    prefix = compute_chunks(stack, [parts.prefix_ids], None, "fp")[0]
    return parts, prefix, compute_chunks(stack, parts.chunk_ids, prefix, "fp")


def run_blend(stack, tokenizer, mode, ratio=0.15, config=BlendConfig(), documents=DOCUMENTS):
    parts, prefix, chunks = cached_parts(stack, tokenizer, documents)
    return parts, blend(stack, parts, prefix, chunks, mode=mode, ratio=ratio, config=config)


def test_full_mode_matches_the_model_forward(stack, tokenizer):
    parts, full = run_blend(stack, tokenizer, "full")
    with torch.no_grad():
        expected = stack.model(torch.tensor([parts.all_ids])).logits[0, -1].float()
    assert full.cached_tokens == 0 and full.recomputed_fraction == 1.0
    assert torch.allclose(full.last_logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ratio_one_reproduces_full_prefill(family, tokenizer):
    stack = DecoderStack(tiny_model(family))
    _, full = run_blend(stack, tokenizer, "full")
    _, blended = run_blend(stack, tokenizer, "blend", ratio=1.0)
    length = full.prompt_tokens
    # Tolerance 1e-4 in float32: the same math, summed in a different order.
    assert torch.allclose(blended.last_logits, full.last_logits, atol=1e-4)
    assert torch.allclose(blended.buffer.keys[:, :, :length], full.buffer.keys[:, :, :length], atol=1e-4)
    assert torch.allclose(blended.buffer.values[:, :, :length], full.buffer.values[:, :, :length], atol=1e-4)


def test_ratio_zero_is_plain_concatenation_of_cached_kv(stack, tokenizer):
    parts, prefix, chunks = cached_parts(stack, tokenizer)
    result = blend(stack, parts, prefix, chunks, mode="blend", ratio=0.0)
    reuse = blend(stack, parts, prefix, chunks, mode="reuse")
    # By hand: concatenate the cached KV, rotate keys to their slots, compute the question over it.
    total = parts.num_tokens
    cos, sin = stack.rope_tables(torch.arange(total))
    buffer = KVBuffer(stack, total)
    buffer.length = total
    start = 0
    for kv in [prefix, *chunks]:
        buffer.place(kv, start, cos[start : start + kv.num_tokens], sin[start : start + kv.num_tokens])
        start += kv.num_tokens
    question = torch.tensor(parts.suffix_ids)
    out = run_tokens(stack, buffer, TokenRun.contiguous(question, start))
    assert result.cached_tokens == start and result.recomputed_tokens == 0
    assert torch.equal(result.buffer.keys[:, :, :total], buffer.keys)
    assert torch.equal(result.buffer.values[:, :, :total], buffer.values)
    assert torch.equal(result.last_logits, stack.logits(out.hidden[-1:])[0])
    assert torch.equal(reuse.last_logits, result.last_logits)


def test_blend_kv_equals_full_prefill_where_it_must(stack, tokenizer):
    config = BlendConfig(check_layer=1)
    parts, full = run_blend(stack, tokenizer, "full")
    _, blended = run_blend(stack, tokenizer, "blend", ratio=0.3, config=config)
    length = parts.num_tokens
    exact = len(parts.prefix_ids) + len(parts.chunk_ids[0])
    fk, fv = full.buffer.keys[:, :, :length], full.buffer.values[:, :, :length]
    bk, bv = blended.buffer.keys[:, :, :length], blended.buffer.values[:, :, :length]
    # Layers up to the check layer recompute every token from exact inputs.
    assert torch.allclose(bk[:2], fk[:2], atol=1e-5) and torch.allclose(bv[:2], fv[:2], atol=1e-5)
    # The prefix and the leading chunk were computed in exactly this context: exact at every layer.
    assert torch.allclose(bk[:, :, :exact], fk[:, :, :exact], atol=1e-5)
    assert torch.allclose(bv[:, :, :exact], fv[:, :, :exact], atol=1e-5)
    # Later chunks were cached without their predecessors: some deviation is left past the check layer.
    assert not torch.allclose(bv[2:, :, exact:], fv[2:, :, exact:], atol=1e-3)


def test_reused_layer0_keys_are_rotated_to_their_new_positions(tokenizer):
    """Layer-0 K/V depend on the token alone, so pure reuse must equal full prefill there at any position."""
    for overrides in ({}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}):
        stack = DecoderStack(tiny_model(**overrides))
        parts, full = run_blend(stack, tokenizer, "full")
        _, reuse = run_blend(stack, tokenizer, "reuse")
        length = parts.num_tokens
        assert torch.allclose(reuse.buffer.keys[0, :, :length], full.buffer.keys[0, :, :length], atol=1e-5)
        assert torch.allclose(reuse.buffer.values[0, :, :length], full.buffer.values[0, :, :length], atol=1e-5)


def test_blend_fidelity_sits_between_reuse_and_full(stack, tokenizer):
    _, full = run_blend(stack, tokenizer, "full")
    _, reuse = run_blend(stack, tokenizer, "reuse")
    _, blended = run_blend(stack, tokenizer, "blend", ratio=0.5)
    full_p = full.last_logits.log_softmax(-1)

    def kl(result):
        return float((full_p.exp() * (full_p - result.last_logits.log_softmax(-1))).sum())

    assert kl(blended) < kl(reuse)
    assert reuse.recomputed_fraction < blended.recomputed_fraction < full.recomputed_fraction


@pytest.mark.parametrize("deviation", ["value", "key"])
def test_selection_takes_the_most_deviating_tokens(stack, tokenizer, deviation):
    parts, prefix, chunks = cached_parts(stack, tokenizer)
    _, full = run_blend(stack, tokenizer, "full")
    exact = len(parts.prefix_ids) + len(parts.chunk_ids[0])
    end = exact + sum(c.num_tokens for c in chunks[1:])
    result = blend(stack, parts, prefix, chunks, mode="blend", ratio=0.25, config=BlendConfig(1, deviation))
    # The check layer's fresh K/V are full prefill's; deviation is measured against the cached ones.
    cos, sin = stack.rope_tables(torch.arange(parts.num_tokens))
    cached = torch.cat([c.values if deviation == "value" else c.keys for c in chunks[1:]], dim=2)[1]
    fresh = (full.buffer.values if deviation == "value" else full.buffer.keys)[1, :, exact:end]
    if deviation == "key":
        cached = apply_rope_reference(cached, cos[exact:end], sin[exact:end])
    deviations = (fresh - cached).square().sum(dim=(0, 2))
    expected = set((deviations.topk(round(0.25 * (end - exact))).indices + exact).tolist())
    # Selected tokens are those whose late-layer KV changed (unselected keep the cached values).
    late = (result.buffer.values[3, :, exact:end] - torch.cat([c.values for c in chunks[1:]], 2)[3]).abs().sum((0, 2))
    assert set((late.nonzero().flatten() + exact).tolist()) == expected


def test_exact_causal_mask_for_scattered_tokens():
    mask = causal_mask(torch.tensor([3, 7]), 10, None)
    assert mask.tolist() == [[k <= 3 for k in range(10)], [k <= 7 for k in range(10)]]
    windowed = causal_mask(torch.tensor([7]), 10, 4)
    assert windowed.tolist() == [[4 <= k <= 7 for k in range(10)]]


class FixedSelector:
    def __init__(self, layer, keep):
        self.layer, self.keep = layer, keep

    def select(self, layer, buffer, slots, queries, keys, values):
        return self.keep if layer == self.layer else None


def test_recomputed_tokens_never_see_later_chunks(stack, tokenizer):
    """Change the cached KV of the last chunk: tokens recomputed in an earlier chunk must not move."""
    parts, prefix, chunks = cached_parts(stack, tokenizer)
    total = parts.num_tokens
    second_start = len(parts.prefix_ids) + len(parts.chunk_ids[0])
    keep = torch.tensor([1, 4, 6])  # scattered tokens of the second chunk

    def recomputed_values(last_chunk_noise: float):
        cos, sin = stack.rope_tables(torch.arange(total))
        buffer = KVBuffer(stack, total)
        buffer.length = total
        start = 0
        for index, kv in enumerate([prefix, *chunks]):
            buffer.place(kv, start, cos[start : start + kv.num_tokens], sin[start : start + kv.num_tokens])
            if index == len(chunks):
                buffer.keys[:, :, start : start + kv.num_tokens] += last_chunk_noise
                buffer.values[:, :, start : start + kv.num_tokens] += last_chunk_noise
            start += kv.num_tokens
        buffer.length = start  # only the chunks: the question's slots stay unwritten
        ids = torch.tensor(parts.all_ids[second_start:start])
        run_tokens(stack, buffer, TokenRun.contiguous(ids, second_start), selector=FixedSelector(1, keep))
        return buffer.values[:, :, second_start + keep]

    assert torch.equal(recomputed_values(0.0), recomputed_values(5.0))


def test_reordered_chunks_hit_the_cache(make_engine):
    engine = make_engine()
    request = RagRequest(QUESTION, DOCUMENTS, sampling=SamplingParams(max_tokens=2))
    first = engine.generate(request)
    reordered = engine.generate(RagRequest(QUESTION, DOCUMENTS[::-1][1:] + DOCUMENTS[-1:], sampling=SamplingParams(max_tokens=2)))
    assert (first.chunk_hits, first.chunk_misses) == (0, 4)
    assert (reordered.chunk_hits, reordered.chunk_misses) == (4, 0)
    chunk_entries = engine.store.usage().entries - engine.prefix.stats()["nodes"]  # the rest are prefix-cache blocks
    assert chunk_entries == 5  # the prefix and four documents: the reordered prompt added none


def test_question_without_documents(make_engine):
    engine = make_engine()
    full = engine.generate(RagRequest(QUESTION, mode="full", sampling=SamplingParams(max_tokens=3)), return_logprobs=True)
    blended = engine.generate(RagRequest(QUESTION, sampling=SamplingParams(max_tokens=3)), return_logprobs=True)
    assert blended.cached_tokens > 0 and blended.chunk_hits == blended.chunk_misses == 0
    assert torch.allclose(full.first_token_logprobs, blended.first_token_logprobs, atol=1e-4)
    assert full.token_ids == blended.token_ids


@pytest.mark.parametrize(
    "documents, message",
    [(("fine", "   "), r"documents\[1\] is empty"), (("word " * 5000,), r"documents\[0\] has \d+ tokens")],
)
def test_bad_documents_get_a_clear_error(make_engine, documents, message):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(RagRequest(QUESTION, documents))
    assert engine.store.usage().entries == 0


def test_bfloat16_blend(tokenizer):
    stack = DecoderStack(tiny_model(dtype=torch.bfloat16))
    _, full = run_blend(stack, tokenizer, "full")
    _, blended = run_blend(stack, tokenizer, "blend", ratio=1.0)
    assert blended.buffer.keys.dtype == torch.bfloat16
    # bfloat16: 8 mantissa bits, summation order differs between the paths.
    assert (blended.last_logits - full.last_logits).abs().max() < 0.05
