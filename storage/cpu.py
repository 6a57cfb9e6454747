"""Host-memory tier: chunk caches in process memory, page-locked where CUDA is present
(so copies to the GPU run asynchronously), within a byte budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ragcache.storage.base import KVTier
from ragcache.storage.eviction import EvictionPolicy
from ragcache.storage.memory import MemoryTier


class CpuTier(MemoryTier):
    def __init__(self, max_bytes: int, policy: EvictionPolicy | None = None, name: str = "cpu") -> None:
        super().__init__(name, max_bytes, "cpu", policy, pin_memory=torch.cuda.is_available())


if TYPE_CHECKING:  # the type checker holds CpuTier to the KVTier contract
    _tier: type[KVTier] = CpuTier
