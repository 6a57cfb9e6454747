"""The vLLM pieces that need no vLLM server: block entries, connector settings, upstream choice, request bodies."""

from __future__ import annotations

import json

import pytest
import torch

from ragcache.config import Settings, SettingsError
from ragcache.engine.chat import OutputConstraint, ToolSpec
from ragcache.engine.errors import InvalidRequestError
from ragcache.engine.request import RagRequest
from ragcache.storage.cpu import CpuTier
from ragcache.storage.redis import RedisTier
from ragcache.storage.tiered import TieredStore
from ragcache.vllm.blocks import BlockMismatch, BlockSpace, ConnectorSettings, block_chunk, block_key, block_slabs
from ragcache.vllm.upstreams import NoUpstreamError, Upstreams

SPACE = BlockSpace("m@cpu:LBHNC", "torch.bfloat16", block_size=16, row_elems=3 * 64, num_layers=4)
CPU_SHAPE = (3, 16, 2 * 64)  # vLLM's CPU layout of one block in one layer: heads, tokens, K and V side by side
CUDA_SHAPE = (2, 16, 3, 64)  # FlashAttention's: K / V, tokens, heads, head size


@pytest.mark.parametrize("shape", [CPU_SHAPE, CUDA_SHAPE])
def test_a_block_comes_back_bit_for_bit(shape):
    slabs = torch.randn(SPACE.num_layers, *shape).to(torch.bfloat16)
    chunk = block_chunk(slabs, range(100, 116), 32, SPACE)
    assert chunk.num_tokens == 16 and chunk.start_pos == 32 and chunk.model_fingerprint == SPACE.name
    assert chunk.nbytes == SPACE.nbytes
    assert torch.equal(block_slabs(chunk, SPACE, shape).view(torch.int16), slabs.view(torch.int16))


def test_a_block_round_trips_through_redis_with_its_checksum(redis_url, redis_namespace):
    slabs = torch.randn(SPACE.num_layers, *CPU_SHAPE).to(torch.bfloat16)
    tier = RedisTier(redis_url, namespace=f"{redis_namespace}:{SPACE.name}", model_fingerprint=SPACE.name)
    key = block_key(bytes(range(32)))
    try:
        assert tier.put(key, block_chunk(slabs, range(16), 0, SPACE))
        back = tier.get(key)
        assert back is not None
        assert torch.equal(block_slabs(back, SPACE, CPU_SHAPE), slabs)
    finally:
        tier.delete(key)
        tier.close()


def test_an_entry_of_another_space_is_refused():
    other = BlockSpace("m@cpu:LBHNC", "torch.bfloat16", block_size=16, row_elems=3 * 64, num_layers=4, tp_rank=1,
                       tp_size=2)
    assert other.name != SPACE.name
    chunk = block_chunk(torch.zeros(4, *CPU_SHAPE, dtype=torch.bfloat16), range(16), 0, other)
    with pytest.raises(BlockMismatch):
        block_slabs(chunk, SPACE, CPU_SHAPE)
    with pytest.raises(BlockMismatch):
        block_chunk(torch.zeros(4, *CPU_SHAPE, dtype=torch.float32), range(16), 0, SPACE)
    with pytest.raises(BlockMismatch):
        block_chunk(torch.zeros(3, *CPU_SHAPE, dtype=torch.bfloat16), range(16), 0, SPACE)


def test_spaces_differ_by_everything_that_changes_the_bytes():
    base = dict(model="m@cpu:LBHNC", dtype="torch.bfloat16", block_size=16, row_elems=192, num_layers=4)
    names = {BlockSpace(**base).name}
    for change in (dict(model="n@cpu:LBHNC"), dict(dtype="torch.float16"), dict(block_size=32), dict(row_elems=128),
                   dict(num_layers=5), dict(hashing="sha256:42")):
        names.add(BlockSpace(**{**base, **change}).name)
    assert len(names) == 7


@pytest.mark.parametrize(
    ("extra", "field"),
    [({}, "redis_url"), ({"redis_url": "http://x"}, "redis_url"), ({"redis_url": "redis://x", "codec": "int8"}, "codec"),
     ({"redis_url": "redis://x", "cpu_bytes": 0}, "cpu_bytes"), ({"redis_url": "redis://x", "ttl": 5}, "unknown"),
     ({"redis_url": "redis://x", "ttl_s": -1}, "ttl_s")],
)
def test_connector_settings_name_the_bad_key(extra, field):
    with pytest.raises(ValueError, match=field):
        ConnectorSettings.of(extra)


def test_connector_settings_defaults_are_lossless():
    settings = ConnectorSettings.of({"redis_url": "redis://127.0.0.1:6379", "codec": "raw+zlib"})
    assert settings.codec == "raw+zlib" and settings.timeout_s >= 1.0


def placed_on(upstreams: Upstreams, key: str) -> str:
    server = upstreams.choose(key)
    upstreams.release(server)
    return server.url


def test_rendezvous_keeps_a_key_on_its_server_and_moves_only_a_lost_servers_keys():
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    three = Upstreams(urls)
    placed = {f"key-{i}": placed_on(three, f"key-{i}") for i in range(300)}
    assert set(placed.values()) == set(urls)  # every server gets a share
    assert all(placed_on(three, k) == url for k, url in placed.items())  # and the same keys every time
    two = Upstreams(urls)
    two.servers[2].up = False
    moved = [k for k, url in placed.items() if placed_on(two, k) != url]
    assert moved and all(placed[k] == "http://c:1" for k in moved)


def test_a_programs_turns_follow_its_server_and_a_down_server_is_skipped():
    upstreams = Upstreams(["http://a:1", "http://b:1"])
    first = upstreams.choose("k1", ("t", "p1"))
    upstreams.release(first)
    assert all(upstreams.choose(f"other-{i}", ("t", "p1")) is first for i in range(5))
    upstreams.release(first, "ConnectError: refused")
    assert not first.up and first.failures == 1
    assert upstreams.choose("k1", ("t", "p1")) is not first
    for server in upstreams.servers:
        server.up = False
    with pytest.raises(NoUpstreamError):
        upstreams.choose("k1")


def test_a_full_server_passes_its_request_on():
    upstreams = Upstreams(["http://a:1", "http://b:1"], max_in_flight=1)
    first = upstreams.choose("same")
    assert upstreams.choose("same") is not first


@pytest.mark.parametrize("urls", ["", "ftp://x", "http://a:1, b:2"])
def test_engine_vllm_settings_need_http_urls(urls):
    with pytest.raises(SettingsError, match="vllm_urls"):
        Settings(engine="vllm", vllm_urls=urls)


@pytest.fixture(scope="module")
def engine(tokenizer):
    from transformers import LlamaConfig

    from ragcache.vllm.engine import VLLMEngine

    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=1, hidden_size=128, num_attention_heads=2,
                         max_position_embeddings=2048)
    vllm = VLLMEngine(["http://127.0.0.1:9"], tokenizer, config, TieredStore([CpuTier(1 << 20)]), served_model="m")
    yield vllm
    vllm.close()


def test_a_request_becomes_token_ids_under_its_tenants_salt(engine):
    request = RagRequest("Where?", ("Doc one.", "Doc two."), namespace="acme")
    body = engine._body(request, engine._prompt_ids(request))
    assert body["cache_salt"] == "ragcache:acme" and body["stream"] is True
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
    text = engine.tokenizer.decode(body["prompt"])
    assert text.index("Doc one.") < text.index("Doc two.") < text.index("Where?")  # system, documents, question


def test_a_tool_constraint_goes_to_vllm_as_a_grammar(engine):
    tool = ToolSpec("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})
    request = RagRequest("Weather?", tools=(tool,), constraint=OutputConstraint("tool_calls", (tool,), True))
    body = engine._body(request, engine._prompt_ids(request))
    grammar = body["structured_outputs"]["grammar"]
    assert "root ::=" in grammar and "get_weather" in grammar
    json.dumps(body)


@pytest.mark.parametrize("field", ["blend_ratio", "blend_deviation", "blend_sink_tokens"])
def test_blending_is_refused_by_name(engine, field):
    value = {"blend_ratio": 0.2, "blend_deviation": "key", "blend_sink_tokens": 2}[field]
    with pytest.raises(InvalidRequestError, match=field):
        engine.submit(RagRequest("Q?", **{field: value}), sink=None)  # type: ignore[arg-type]


def test_a_prompt_past_the_context_is_refused(engine):
    from ragcache.engine.generate import SamplingParams

    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(RagRequest("Q? " * 1500, sampling=SamplingParams(max_tokens=1000)), sink=None)  # type: ignore[arg-type]


def test_no_server_up_is_an_engine_unavailable_error(engine):
    from ragcache.engine.errors import EngineUnavailableError

    with pytest.raises(EngineUnavailableError):
        engine.submit(RagRequest("Q?"), sink=None)  # type: ignore[arg-type]
