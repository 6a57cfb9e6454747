"""vLLM's KV blocks as ragcache store entries: their namespace, their key, their value.

A vLLM block is block_size tokens of KV in every attention layer, addressed in vLLM by a chained
hash of its tokens and every block before it (and the request's cache_salt). Its store entry:

    key     the block hash in hex, under a namespace naming everything that makes the bytes
            meaningful: model, KV dtype, block size, the attention backend's per-block layout,
            tensor-parallel rank and size, vLLM's hash algorithm and seed. Replicas that agree
            on all of it share entries; any difference gives disjoint keys, never wrong KV.
    value   a KVChunk (ragcache.kv) holding the block's per-layer slab as vLLM lays it out,
            split in two halves so it has the (layers, heads, tokens, dim) shape the store's
            codecs, checksums and tiers expect. The halves are opaque bytes here: nothing reads
            them as keys and values; block_slabs() puts the slab back together bit for bit.

Nothing here imports vLLM: the connector (connector.py) hands in tensors and hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ragcache.kv import ChunkKey, KVChunk
from ragcache.storage.codec import CODECS
from ragcache.storage.cpu import CpuTier
from ragcache.storage.redis import RedisTier
from ragcache.storage.tiered import TieredStore

LOSSLESS_CODECS = tuple(name for name in CODECS if name.split("+")[0] == "raw")


class BlockMismatch(ValueError):
    """A stored entry is not a block of this namespace's shape (never placed into vLLM's cache)."""


@dataclass(frozen=True)
class BlockSpace:
    """Everything two vLLM servers must agree on for one's block bytes to be right in the other.

    row_elems: one token's K (or V) elements in one layer (KV heads x head size); a block's slab
    in one layer is 2 x block_size x row_elems elements, in whatever order the backend keeps them."""

    model: str  # the served name and the attention backend's layout
    dtype: str  # the KV cache's torch dtype, e.g. "torch.bfloat16"
    block_size: int  # tokens per block
    row_elems: int
    num_layers: int
    tp_rank: int = 0
    tp_size: int = 1
    hashing: str = "sha256:default"  # vLLM's prefix_caching_hash_algo and the seed of its first block's parent

    def __post_init__(self) -> None:
        if min(self.block_size, self.row_elems, self.num_layers) <= 0:
            raise ValueError(f"a block space needs positive sizes: {self}")
        _dtype(self.dtype)

    @property
    def name(self) -> str:
        """The store namespace: a digest of every field but the rank (Redis keys stay short), then the rank."""
        detail = repr((self.model, self.dtype, self.block_size, self.row_elems, self.num_layers, self.hashing))
        return f"vllm:{hashlib.sha256(detail.encode()).hexdigest()[:16]}:tp{self.tp_rank}of{self.tp_size}"

    @property
    def nbytes(self) -> int:
        """One block, every layer."""
        itemsize = torch.empty((), dtype=_dtype(self.dtype)).itemsize
        return self.num_layers * 2 * self.block_size * self.row_elems * itemsize


def block_key(block_hash: bytes) -> ChunkKey:
    return ChunkKey(block_hash.hex())


def block_chunk(slabs: torch.Tensor, token_ids: Sequence[int], start_pos: int, space: BlockSpace) -> KVChunk:
    """slabs: (layers, *block_shape) of one block, on any device; the entry holds a CPU copy."""
    if slabs.shape[0] != space.num_layers or slabs[0].numel() != 2 * space.block_size * space.row_elems:
        raise BlockMismatch(f"slabs {tuple(slabs.shape)} are not {space.num_layers} layers of one block of {space}")
    if str(slabs.dtype) != space.dtype:
        raise BlockMismatch(f"slabs are {slabs.dtype}, the space {space.dtype}")
    halves = slabs.detach().to("cpu").reshape(space.num_layers, 2, 1, space.block_size, space.row_elems).clone()
    return KVChunk(tuple(token_ids), halves[:, 0], halves[:, 1], space.name, start_pos)


def block_slabs(chunk: KVChunk, space: BlockSpace, block_shape: tuple[int, ...]) -> torch.Tensor:
    """The (layers, *block_shape) slab block_chunk() was given, bit for bit; BlockMismatch for any other entry."""
    want = (space.num_layers, 1, space.block_size, space.row_elems)
    if chunk.model_fingerprint != space.name or tuple(chunk.keys.shape) != want or str(chunk.dtype) != space.dtype:
        raise BlockMismatch(
            f"entry {chunk.model_fingerprint} {tuple(chunk.keys.shape)} {chunk.dtype} is not a block of "
            f"{space.name} {want} {space.dtype}"
        )
    return torch.stack([chunk.keys, chunk.values], dim=1).reshape(space.num_layers, *block_shape)


@dataclass(frozen=True)
class ConnectorSettings:
    """kv_connector_extra_config, checked. redis_url is required: the store servers share (one node or
    any node of a Redis Cluster)."""

    redis_url: str
    cpu_bytes: int = 2 << 30
    codec: str = "raw"
    ttl_s: float | None = None
    timeout_s: float = 5.0  # per Redis round trip: a batch of blocks is megabytes, not a chunk's kilobytes
    lookup_threads: int = 2

    @classmethod
    def of(cls, extra: Mapping[str, Any]) -> ConnectorSettings:
        known = {"redis_url", "cpu_bytes", "codec", "ttl_s", "timeout_s", "lookup_threads"}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {unknown}; known: {sorted(known)}")
        if "redis_url" not in extra:
            raise ValueError("kv_connector_extra_config.redis_url is required (redis://host:port)")
        settings = cls(**{k: v for k, v in extra.items() if k in known})
        if not str(settings.redis_url).startswith(("redis://", "rediss://")):
            raise ValueError(f"kv_connector_extra_config.redis_url: a redis:// URL, got {settings.redis_url!r}")
        if not isinstance(settings.cpu_bytes, int) or settings.cpu_bytes <= 0:
            raise ValueError(f"kv_connector_extra_config.cpu_bytes: a positive integer, got {settings.cpu_bytes!r}")
        if settings.codec not in LOSSLESS_CODECS:
            raise ValueError(
                f"kv_connector_extra_config.codec: one of {list(LOSSLESS_CODECS)} (vLLM's KV is kept exact), "
                f"got {settings.codec!r}"
            )
        if settings.ttl_s is not None and not settings.ttl_s > 0:
            raise ValueError(f"kv_connector_extra_config.ttl_s: positive seconds or null, got {settings.ttl_s!r}")
        if not settings.timeout_s > 0:
            raise ValueError(f"kv_connector_extra_config.timeout_s: positive seconds, got {settings.timeout_s!r}")
        if not isinstance(settings.lookup_threads, int) or settings.lookup_threads <= 0:
            raise ValueError(f"kv_connector_extra_config.lookup_threads: >= 1, got {settings.lookup_threads!r}")
        return settings


def make_block_store(settings: ConnectorSettings, space: BlockSpace) -> TieredStore:
    """The worker's store: CPU tier then Redis, written through, so a block saved here is in Redis for
    every other server at once; a write Redis refuses waits in the store's backlog (tiered.py)."""
    return TieredStore([CpuTier(settings.cpu_bytes), block_index(settings, space)], write_through=True)


def block_index(settings: ConnectorSettings, space: BlockSpace) -> RedisTier:
    """Redis alone: what the scheduler asks whether a block is stored (it runs apart from the workers
    and cannot see their CPU tiers)."""
    return RedisTier(
        settings.redis_url,
        namespace=space.name,
        codec=settings.codec,
        model_fingerprint=space.name,
        ttl_s=settings.ttl_s,
        timeout_s=settings.timeout_s,
    )


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return found
