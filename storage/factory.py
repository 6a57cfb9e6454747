"""Build the TieredStore a deployment asks for: device -> cpu -> redis."""

from __future__ import annotations

from dataclasses import dataclass

from ragcache.storage.base import KVTier
from ragcache.storage.cpu import CpuTier
from ragcache.storage.eviction import make_policy
from ragcache.storage.gpu import GpuTier
from ragcache.storage.tiered import DEFAULT_WRITE_BACKLOG_BYTES, TieredStore

GiB = 1 << 30


@dataclass(frozen=True)
class StoreConfig:
    """device_max_bytes: the model device's tier ("gpu" on CUDA, "device" on a CPU-only machine).
    redis_url None means no Redis tier (one node or any node of a Redis Cluster). eviction: lru,
    lfu or cost_aware (see eviction.py). write_backlog_bytes bounds the chunks kept to retry
    writes that Redis refused (tiered.py); 0 keeps none."""

    device_max_bytes: int = 1 * GiB
    cpu_max_bytes: int = 8 * GiB
    redis_url: str | None = None
    redis_codec: str = "raw"
    redis_ttl_s: float | None = None
    eviction: str = "cost_aware"
    write_through: bool = True
    write_backlog_bytes: int = DEFAULT_WRITE_BACKLOG_BYTES

    def __post_init__(self) -> None:
        if self.device_max_bytes <= 0 or self.cpu_max_bytes <= 0:
            raise ValueError("device and cpu tier budgets must be positive")
        if self.write_backlog_bytes < 0:
            raise ValueError(f"write_backlog_bytes must be >= 0, got {self.write_backlog_bytes}")
        make_policy(self.eviction)  # raises on an unknown name


def make_store(config: StoreConfig, device: str, model_fingerprint: str) -> TieredStore:
    """Tiers for one model: Redis keys live under the model's fingerprint, so models never mix."""
    tiers: list[KVTier] = [
        GpuTier(config.device_max_bytes, device, make_policy(config.eviction)),
        CpuTier(config.cpu_max_bytes, make_policy(config.eviction)),
    ]
    if config.redis_url:
        from ragcache.storage.redis import RedisTier

        tiers.append(
            RedisTier(
                config.redis_url,
                namespace=model_fingerprint,
                codec=config.redis_codec,
                model_fingerprint=model_fingerprint,
                ttl_s=config.redis_ttl_s,
            )
        )
    return TieredStore(tiers, write_through=config.write_through, write_backlog_bytes=config.write_backlog_bytes)
