"""The wire format: every codec round-trips the engine's real KV, sizes are what the format says,
and every kind of damage is refused with its reason."""

import math
import struct
import zlib

import pytest
import torch

from conftest import tiny_model
from ragcache.engine.chunks import compute_chunks
from ragcache.engine.stack import DecoderStack
from ragcache.kv import KVChunk
from ragcache.storage.codec import CODECS, HEADER, CorruptEntryError, decode_chunk, encode_chunk

FINGERPRINT = "tiny-llama-fp"


def real_chunk(dtype=torch.float32, hidden_size: int = 64, tokens: int = 45) -> KVChunk:
    """A chunk as the engine computes it, after a 9-token prefix; hidden_size 256 gives head_dim 64 as real models."""
    stack = DecoderStack(tiny_model(dtype=dtype, hidden_size=hidden_size))
    ids = torch.randint(0, 49152, (9 + tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    prefix = compute_chunks(stack, [ids[:9]], None, FINGERPRINT)[0]
    return compute_chunks(stack, [ids[9:]], prefix, FINGERPRINT)[0]


@pytest.fixture(scope="module")
def chunk() -> KVChunk:
    return real_chunk()


@pytest.fixture(scope="module")
def wide_chunk() -> KVChunk:
    return real_chunk(hidden_size=256, tokens=128)


def reseal(data: bytes) -> bytes:
    """data with its checksum recomputed, as a writer of that content would have made it."""
    crc_at = HEADER.size - 4
    crc = zlib.crc32(data[HEADER.size :], zlib.crc32(data[:crc_at]))
    return data[:crc_at] + struct.pack("<I", crc) + data[HEADER.size :]


def groups(x: torch.Tensor, group: int) -> list[torch.Tensor]:
    """x (..., n) split along its last axis into the codec's groups."""
    return list(torch.split(x, min(group, x.shape[-1]), dim=-1))


def max_excess_error(original: torch.Tensor, decoded: torch.Tensor, bits: int, group: int) -> float:
    """Largest error beyond the bound, over all groups (<= 0 when the bound holds).

    Bound per group: half a quantisation step, (max - min) / (2^bits - 1) / 2, plus what storing
    the zero point and scale as float16 adds (relative 2^-11 each, both rounded outward so the
    range stays covered): at most 2^-10 of the group's largest magnitude.
    """
    levels = (1 << bits) - 1
    worst = -math.inf
    for x, y in zip(groups(original.float(), group), groups(decoded.float(), group)):
        step = (x.amax(-1) - x.amin(-1)) / levels
        bound = step / 2 + 2.0**-10 * x.abs().amax(-1) + 2.0**-24
        worst = max(worst, ((x - y).abs().amax(-1) - bound).max().item())
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec", ["raw", "raw+zlib"])
def test_raw_round_trips_exactly(codec, dtype):
    chunk = real_chunk(dtype)
    decoded = decode_chunk(encode_chunk(chunk, codec), expected_fingerprint=FINGERPRINT)
    assert decoded.dtype == dtype and decoded.token_ids == chunk.token_ids
    assert decoded.start_pos == chunk.start_pos == 9 and decoded.model_fingerprint == FINGERPRINT
    assert torch.equal(decoded.keys, chunk.keys) and torch.equal(decoded.values, chunk.values)


@pytest.mark.parametrize("codec, bits, key_group, value_group", [
    ("int8", 8, 10**9, 10**9), ("int8+zlib", 8, 10**9, 10**9), ("int4", 4, 32, 32), ("int4+zlib", 4, 32, 32),
    ("int4-g64", 4, 64, 64), ("int4-g64+zlib", 4, 64, 64),
])
def test_quantised_error_is_within_half_a_step_per_group(chunk, wide_chunk, codec, bits, key_group, value_group):
    """int8: keys per channel over all tokens, values per token over all channels; int4: groups of 32
    (chunk: 45 tokens and head_dim 16, so its last key group and its value groups are short)."""
    for original in (chunk, wide_chunk):
        decoded = decode_chunk(encode_chunk(original, codec), expected_fingerprint=FINGERPRINT)
        assert decoded.dtype == torch.float32 and decoded.token_ids == original.token_ids
        keys_by_channel = (original.keys.transpose(2, 3), decoded.keys.transpose(2, 3))
        assert max_excess_error(*keys_by_channel, bits, key_group) <= 0
        assert max_excess_error(original.values, decoded.values, bits, value_group) <= 0


def test_int8_keeps_bfloat16_as_bfloat16():
    chunk = real_chunk(torch.bfloat16)
    decoded = decode_chunk(encode_chunk(chunk, "int8"))
    assert decoded.dtype == torch.bfloat16
    assert max_excess_error(chunk.values, decoded.values, 8, 10**9) <= 2.0**-8 * chunk.values.abs().max().item()


def test_encoded_sizes_are_what_the_format_says(wide_chunk):
    layers, heads, tokens, head_dim = wide_chunk.keys.shape  # (4, 2, 128, 64)
    fixed = HEADER.size + len(FINGERPRINT) + 4 * tokens  # header, fingerprint, int32 token ids
    planes = layers * heads
    raw = fixed + 2 * planes * tokens * head_dim * 4
    # codes, then a float16 scale and zero point per group
    int8 = fixed + planes * (head_dim * tokens + 4 * head_dim) + planes * (tokens * head_dim + 4 * tokens)
    key_groups, value_groups = math.ceil(tokens / 32), math.ceil(head_dim / 32)
    int4 = (fixed + planes * head_dim * key_groups * (16 + 4) + planes * tokens * value_groups * (16 + 4))
    key_groups, value_groups = math.ceil(tokens / 64), math.ceil(head_dim / 64)
    int4_g64 = (fixed + planes * head_dim * key_groups * (32 + 4) + planes * tokens * value_groups * (32 + 4))
    sizes = {codec: len(encode_chunk(wide_chunk, codec)) for codec in ("raw", "int8", "int4", "int4-g64")}
    assert sizes == {"raw": raw, "int8": int8, "int4": int4, "int4-g64": int4_g64}
    assert 3.8 < sizes["raw"] / sizes["int8"] < 4 and 6.3 < sizes["raw"] / sizes["int4"] < 6.4
    assert 7.0 < sizes["raw"] / sizes["int4-g64"] < 7.2  # 3.5x-3.6x smaller than float16


def test_codec_names_and_unknown_codec(chunk):
    assert CODECS == ("raw", "int8", "int4", "int4-g64", "raw+zlib", "int8+zlib", "int4+zlib", "int4-g64+zlib")
    with pytest.raises(ValueError, match="unknown codec"):
        encode_chunk(chunk, "fp8")


def test_quantising_non_finite_kv_is_refused(chunk):
    broken = KVChunk(chunk.token_ids, chunk.keys.clone().fill_(math.inf), chunk.values, FINGERPRINT)
    with pytest.raises(ValueError, match="int8 cannot hold"):
        encode_chunk(broken, "int8")
    assert torch.equal(decode_chunk(encode_chunk(broken, "raw")).keys, broken.keys)


def flip_payload_byte(data: bytes) -> bytes:
    at = len(data) - 7
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def set_header_byte(offset: int, value: int):
    return lambda data: data[:offset] + bytes([value]) + data[offset + 1 :]


def garbage_zlib_payload(data: bytes) -> bytes:
    payload_at = HEADER.size + len(FINGERPRINT)
    return reseal(data[:payload_at] + b"\x00" * (len(data) - payload_at))


@pytest.mark.parametrize("codec, damage, reason", [
    ("raw", lambda data: b"XXXX" + data[4:], "bad magic"),
    ("raw", set_header_byte(4, 2), "unsupported version"),
    ("raw", set_header_byte(5, 9), "unknown codec"),
    ("raw", set_header_byte(6, 7), "unknown dtype"),
    ("raw", lambda data: data[:-1], "truncated"),
    ("raw", lambda data: data[:20], "truncated"),
    ("raw", flip_payload_byte, "checksum mismatch"),
    ("int8", flip_payload_byte, "checksum mismatch"),
    ("raw", set_header_byte(8, 5), "checksum mismatch"),  # layers 4 -> 5: the header is checksummed too
    ("int8+zlib", garbage_zlib_payload, "bad payload"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_damage_is_refused_with_its_reason(chunk, codec, damage, reason):
    with pytest.raises(CorruptEntryError) as error:
        decode_chunk(damage(encode_chunk(chunk, codec)))
    assert error.value.reason == reason


def test_consistent_but_wrong_shape_is_a_bad_payload(chunk):
    data = bytearray(encode_chunk(chunk, "raw"))
    struct.pack_into("<I", data, 20, 32)  # head_dim 16 -> 32: the payload is now half what the shapes need
    with pytest.raises(CorruptEntryError) as error:
        decode_chunk(reseal(bytes(data)))
    assert error.value.reason == "bad payload"


def test_entry_of_another_model_is_refused(chunk):
    data = encode_chunk(chunk, "int4")
    assert decode_chunk(data, expected_fingerprint=FINGERPRINT).model_fingerprint == FINGERPRINT
    with pytest.raises(CorruptEntryError) as error:
        decode_chunk(data, expected_fingerprint="another-model")
    assert error.value.reason == "fingerprint mismatch"
