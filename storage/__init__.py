"""The KV store the engine reads and writes chunk caches through (installed as ragcache.storage).

One tier per file behind the contract in base.py. Knows nothing of models or HTTP.
"""

from ragcache.storage.base import KVStore, KVTier, PinHandle, TierUsage
from ragcache.storage.cpu import CpuTier
from ragcache.storage.gpu import GpuTier
from ragcache.storage.memory import MemoryTier
from ragcache.storage.tiered import TieredStore

__all__ = ["KVStore", "KVTier", "TierUsage", "CpuTier", "GpuTier", "MemoryTier", "PinHandle", "TieredStore"]
