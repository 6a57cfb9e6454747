"""The KV store the engine reads and writes chunk caches through (installed as ragcache.storage).

One tier per file behind the contract in base.py. Knows nothing of models or HTTP.
"""

from ragcache.storage.base import KVTier, TierUsage
from ragcache.storage.cpu import CpuTier

__all__ = ["KVTier", "TierUsage", "CpuTier"]
