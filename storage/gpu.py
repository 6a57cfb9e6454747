"""Device tier: chunk caches on the model's device, the engine's working set.

On a CUDA machine this is GPU memory and the tier is named "gpu". On a CPU-only machine
the model's device is the CPU, so the tier holds the working set in host memory and is
named "device" (it stays separate from the "cpu" tier, with its own budget, so the
configuration means the same thing on both kinds of machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ragcache.storage.base import KVTier
from ragcache.storage.eviction import EvictionPolicy
from ragcache.storage.memory import MemoryTier


class GpuTier(MemoryTier):
    def __init__(
        self, max_bytes: int, device: str | torch.device = "cuda", policy: EvictionPolicy | None = None
    ) -> None:
        device = torch.device(device)
        super().__init__("gpu" if device.type == "cuda" else "device", max_bytes, device, policy)


if TYPE_CHECKING:  # the type checker holds GpuTier to the KVTier contract
    _tier: type[KVTier] = GpuTier
