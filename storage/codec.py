"""Wire format of a chunk cache off the device: a versioned, checksummed header, then the payload.

Every tier that keeps bytes (Redis, disk) stores what encode_chunk returns and hands what it
reads to decode_chunk, which rejects anything it cannot vouch for with CorruptEntryError: a
corrupt or foreign entry becomes a miss, never garbage KV.

Header, little-endian, 48 bytes (struct "<4sBBBxIIIIqH2xQI"):

| offset | bytes | field                                                         |
|--------|-------|---------------------------------------------------------------|
| 0      | 4     | magic b"RCKV"                                                 |
| 4      | 1     | format version (1)                                            |
| 5      | 1     | codec id: low 4 bits raw=1, int8=2, int4=3; 0x10 = zlib'd     |
| 6      | 1     | dtype id of the tensors: float32=1, float16=2, bfloat16=3     |
| 7      | 1     | reserved, 0                                                   |
| 8      | 16    | layers, kv_heads, tokens, head_dim (uint32 each)              |
| 24     | 8     | start_pos (int64)                                             |
| 32     | 2     | F = length of the model fingerprint in bytes (uint16)         |
| 34     | 2     | reserved, 0                                                   |
| 36     | 8     | P = payload length in bytes, as stored (uint64)               |
| 44     | 4     | CRC-32 of bytes [0, 44), the fingerprint and the payload      |

Then the fingerprint (F bytes, UTF-8) and the payload (P bytes): token ids as int32, then
the keys' section, then the values' section, both in the codec's encoding; the whole
payload zlib-compressed (level 1) when the codec name ends in "+zlib".

The checksum is CRC-32 rather than a cryptographic hash: it guards against accidents
(truncated writes, evicted or flipped bytes), it runs at memory speed in zlib, and its
2^-32 chance of missing random damage is far below any other failure rate here. It is not
a defence against someone who can write to the store; tenancy is enforced by keys.

Codecs, per (layers, kv_heads) plane of shape (tokens, head_dim):
- raw: the tensors' own bytes (float32, float16 or bfloat16): lossless.
- int8: KIVI-style asymmetric quantisation. Keys vary mostly by channel (a few outlier
  channels), so each channel is quantised over all tokens; values vary by token, so each
  token is quantised over its channels. A group stores a float16 scale and zero point.
- int4: the same, in groups of 32 (tokens for keys, channels for values; smaller when the
  axis is), two codes packed per byte, low nibble first.
- int4-g64: int4 in groups of 64, halving the scales and zero points that cap int4 at 3.2x
  smaller than float16 (20 bytes per 32 values, against 64): 3.56x, for somewhat larger
  rounding error (measured in the README).
Quantised section layout: codes (uint8), then scales (float16), then zero points (float16),
each in (layers, kv_heads, rows, groups[, group_len]) order, where keys' rows are channels
and values' rows are tokens.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ragcache.kv import KVChunk

MAGIC = b"RCKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBxIIIIqH2xQI")
_CRC_OFFSET = HEADER.size - 4
_ZLIB_FLAG = 0x10

_DTYPE_IDS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPES = {dtype_id: dtype for dtype, dtype_id in _DTYPE_IDS.items()}
# numpy has no bfloat16: tensors travel as the integer type of the same width
_INT_VIEWS = {4: (torch.int32, "<i4"), 2: (torch.int16, "<i2"), 1: (torch.uint8, "u1")}


class CorruptEntryError(ValueError):
    """Raised by decode_chunk; reason is one of: bad magic, unsupported version, unknown codec,
    unknown dtype, truncated, fingerprint mismatch, checksum mismatch, bad payload."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Shape(NamedTuple):
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int


class _Codec(NamedTuple):
    """encode(keys, values) -> bytes; decode(view, shape, dtype) -> (keys, values)."""

    codec_id: int
    encode: Callable[[torch.Tensor, torch.Tensor], bytes]
    decode: Callable[[memoryview, Shape, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def encode_chunk(chunk: KVChunk, codec: str = "raw") -> bytes:
    """The chunk in the wire format; ValueError for an unknown codec or a dtype the format lacks,
    or for KV a quantised codec cannot hold (values beyond float16's range, NaN)."""
    base_name, compressed = _parse_codec_name(codec)
    if chunk.dtype not in _DTYPE_IDS:
        raise ValueError(f"dtype {chunk.dtype} has no wire format; use float32, float16 or bfloat16")
    base = _CODECS[base_name]
    tokens = np.asarray(chunk.token_ids, dtype="<i4").tobytes()
    payload = tokens + base.encode(chunk.keys.detach(), chunk.values.detach())
    if compressed:
        payload = zlib.compress(payload, 1)
    fingerprint = chunk.model_fingerprint.encode()
    header = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        base.codec_id | (_ZLIB_FLAG if compressed else 0),
        _DTYPE_IDS[chunk.dtype],
        *chunk.keys.shape,
        chunk.start_pos,
        len(fingerprint),
        len(payload),
        0,
    )
    crc = zlib.crc32(payload, zlib.crc32(fingerprint, zlib.crc32(header[:_CRC_OFFSET])))
    return b"".join((header[:_CRC_OFFSET], struct.pack("<I", crc), fingerprint, payload))


def decode_chunk(data: bytes | bytearray | memoryview, expected_fingerprint: str | None = None) -> KVChunk:
    """The chunk data encodes, on the CPU; CorruptEntryError for anything that does not check out.

    Checks run cheapest first: header fields, lengths, fingerprint, then the checksum over
    everything, then the payload's size against the shapes.
    """
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        raise CorruptEntryError("truncated", f"{len(view)} bytes, header needs {HEADER.size}")
    magic, version, codec_id, dtype_id, *dims, start_pos, fp_len, payload_len, crc = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError("bad magic", repr(magic))
    if version != FORMAT_VERSION:
        raise CorruptEntryError("unsupported version", str(version))
    base = _CODECS_BY_ID.get(codec_id & ~_ZLIB_FLAG)
    if base is None or codec_id & ~(_ZLIB_FLAG | 0x0F):
        raise CorruptEntryError("unknown codec", f"id {codec_id:#x}")
    if dtype_id not in _DTYPES:
        raise CorruptEntryError("unknown dtype", f"id {dtype_id}")
    end = HEADER.size + fp_len + payload_len
    if len(view) < end:
        raise CorruptEntryError("truncated", f"{len(view)} bytes, header says {end}")
    if len(view) > end:
        raise CorruptEntryError("bad payload", f"{len(view) - end} bytes past the end")
    fingerprint = bytes(view[HEADER.size : HEADER.size + fp_len]).decode(errors="replace")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise CorruptEntryError("fingerprint mismatch", f"{fingerprint!r} != {expected_fingerprint!r}")
    if zlib.crc32(view[HEADER.size :], zlib.crc32(view[:_CRC_OFFSET])) != crc:
        raise CorruptEntryError("checksum mismatch")
    payload = view[HEADER.size + fp_len :]
    if codec_id & _ZLIB_FLAG:
        payload = memoryview(_inflate(payload))
    shape = Shape(*dims)
    if len(payload) < 4 * shape.tokens:
        raise CorruptEntryError("bad payload", "shorter than its token ids")
    token_ids = tuple(np.frombuffer(payload, dtype="<i4", count=shape.tokens).tolist())
    keys, values = base.decode(payload[4 * shape.tokens :], shape, _DTYPES[dtype_id])
    return KVChunk(token_ids, keys, values, fingerprint, start_pos)


def _parse_codec_name(codec: str) -> tuple[str, bool]:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    base, _, suffix = codec.partition("+")
    return base, suffix == "zlib"


def _inflate(payload: memoryview) -> bytes:
    try:
        return zlib.decompress(payload)
    except zlib.error as error:
        raise CorruptEntryError("bad payload", f"zlib: {error}") from None


def _take(view: memoryview, nbytes: int, what: str) -> tuple[memoryview, memoryview]:
    if len(view) < nbytes:
        raise CorruptEntryError("bad payload", f"{what} needs {nbytes} bytes, {len(view)} left")
    return view[:nbytes], view[nbytes:]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    int_dtype, np_dtype = _INT_VIEWS[tensor.element_size()]
    return tensor.contiguous().cpu().view(int_dtype).numpy().astype(np_dtype, copy=False).tobytes()


def _tensor_from(view: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    int_dtype, np_dtype = _INT_VIEWS[torch.empty((), dtype=dtype).element_size()]
    array = np.frombuffer(view, dtype=np_dtype).copy()
    return torch.from_numpy(array).view(int_dtype).view(dtype).reshape(shape)


def _encode_raw(keys: torch.Tensor, values: torch.Tensor) -> bytes:
    return _tensor_bytes(keys) + _tensor_bytes(values)


def _decode_raw(view: memoryview, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    keys, view = _take(view, nbytes, "keys")
    values, view = _take(view, nbytes, "values")
    if len(view):
        raise CorruptEntryError("bad payload", f"{len(view)} trailing bytes")
    return _tensor_from(keys, shape, dtype), _tensor_from(values, shape, dtype)


def _group_len(axis_len: int, bits: int, group: int | None) -> int:
    """int8 groups span the whole axis (group None); int4 groups hold `group` values, fewer on a
    shorter axis (always even, so codes pair up in bytes)."""
    if group is None:
        return max(axis_len, 1)
    return min(group, axis_len + axis_len % 2) or 2


def _half_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x rounded to float16 toward -inf or +inf, so the stored range still covers the data."""
    half = x.half()
    off = half.float() < x if direction > 0 else half.float() > x
    return torch.where(off, torch.nextafter(half, torch.full_like(half, direction)), half)


def _quantise(x: torch.Tensor, bits: int, group_len: int | None) -> bytes:
    """Codes, scales and zero points of x (..., n), grouped along its last axis."""
    levels = (1 << bits) - 1
    n = x.shape[-1]
    group = _group_len(n, bits, group_len)
    num_groups = -(-n // group)
    pad = num_groups * group - n
    if pad:  # repeating the last element leaves every group's range unchanged
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    x = x.float().reshape(*x.shape[:-1], num_groups, group)
    zero = _half_toward(x.amin(-1, keepdim=True), float("-inf"))
    scale = _half_toward((x.amax(-1, keepdim=True) - zero.float()) / levels, float("inf"))
    scale = scale.clamp_min(2.0**-24)  # a constant group: any positive scale decodes it exactly
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError(f"int{bits} cannot hold this KV: values beyond float16's range or not finite")
    codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return _tensor_bytes(codes) + _tensor_bytes(scale) + _tensor_bytes(zero)


def _dequantise(
    view: memoryview, lead: tuple[int, ...], n: int, bits: int, group_len: int | None
) -> tuple[torch.Tensor, memoryview]:
    """Inverse of _quantise for a tensor of shape (*lead, n), as float32; and the bytes after it."""
    group = _group_len(n, bits, group_len)
    num_groups = -(-n // group)
    rows = math.prod(lead) * num_groups
    codes, view = _take(view, rows * group * bits // 8, "codes")
    scale, view = _take(view, rows * 2, "scales")
    zero, view = _take(view, rows * 2, "zero points")
    q = _tensor_from(codes, (len(codes),), torch.uint8)
    if bits == 4:
        q = torch.stack([q & 0x0F, q >> 4], dim=-1)
    q = q.reshape(*lead, num_groups, group).float()
    scale_t = _tensor_from(scale, (*lead, num_groups, 1), torch.float16).float()
    zero_t = _tensor_from(zero, (*lead, num_groups, 1), torch.float16).float()
    x = (q * scale_t + zero_t).reshape(*lead, num_groups * group)[..., :n]
    return x, view


def _quantised_codec(codec_id: int, bits: int, group_len: int | None = None) -> _Codec:
    """group_len None: one group per row (the whole axis)."""

    def encode(keys: torch.Tensor, values: torch.Tensor) -> bytes:
        # keys per channel, values per token
        return _quantise(keys.transpose(2, 3), bits, group_len) + _quantise(values, bits, group_len)

    def decode(view: memoryview, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        layers, heads, tokens, head_dim = shape
        keys_t, view = _dequantise(
            view, (layers, heads, head_dim), tokens, bits, group_len
        )  # (layers, kv_heads, head_dim, tokens)
        values, view = _dequantise(view, (layers, heads, tokens), head_dim, bits, group_len)
        if len(view):
            raise CorruptEntryError("bad payload", f"{len(view)} trailing bytes")
        return keys_t.transpose(2, 3).contiguous().to(dtype), values.to(dtype)

    return _Codec(codec_id, encode, decode)


_CODECS = {
    "raw": _Codec(1, _encode_raw, _decode_raw),
    "int8": _quantised_codec(2, 8),
    "int4": _quantised_codec(3, 4, 32),
    "int4-g64": _quantised_codec(4, 4, 64),
}
_CODECS_BY_ID = {codec.codec_id: codec for codec in _CODECS.values()}
CODECS = tuple(_CODECS) + tuple(f"{name}+zlib" for name in _CODECS)
