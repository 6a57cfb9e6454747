"""faiss: HNSW on the CPU, exact inner-product search on a GPU when faiss sees one.

faiss's HNSW cannot delete, and its GPU indexes are flat, so removal is a tombstone: the
label leaves the id map at once, searches skip it (a selector on the CPU, over-fetching on
the GPU), and once tombstones pass a quarter of the slots the index is rebuilt from the
live vectors, which is when their slots are reused. Growth needs nothing: faiss indexes
grow as they are added to.
"""

from __future__ import annotations

import numpy as np

from ragcache.semantic.index.base import IndexConfig, IndexUsage, Neighbor, VectorIndex

_MAX_GPU_K = 2048  # faiss's GPU search limit


class FaissIndex(VectorIndex):
    def __init__(self, dim: int, config: IndexConfig = IndexConfig(), use_gpu: bool | None = None) -> None:
        import faiss

        self._faiss = faiss
        self.dim = dim
        self._config = config
        self._gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._resources = faiss.StandardGpuResources() if self._gpu else None
        self._slot_labels: list[int] = []  # faiss id (insertion order) -> label; -1 for a tombstone
        self._slot_of: dict[int, int] = {}  # live label -> faiss id
        self._selector = None  # CPU search filter, rebuilt after deletions
        self._index = self._new_index()

    @property
    def kind(self) -> str:
        return "faiss-gpu" if self._gpu else "faiss"

    def _new_index(self):
        if self._gpu:
            return self._faiss.GpuIndexFlatIP(self._resources, self.dim)
        index = self._faiss.IndexHNSWFlat(self.dim, self._config.m, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self._config.ef_construction
        index.hnsw.efSearch = self._config.ef_search
        return index

    def add(self, label: int, vector: np.ndarray) -> None:
        self.remove(label)
        self._index.add(np.asarray(vector, dtype=np.float32).reshape(1, self.dim))
        self._slot_of[label] = len(self._slot_labels)
        self._slot_labels.append(label)

    def remove(self, label: int) -> bool:
        slot = self._slot_of.pop(label, None)
        if slot is None:
            return False
        self._slot_labels[slot] = -1
        self._selector = None
        if self._tombstones() * 4 > len(self._slot_labels):
            self._compact()
        return True

    def search(self, vector: np.ndarray, k: int) -> list[Neighbor]:
        k = min(k, len(self._slot_of))
        if k <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        if self._gpu:
            fetch = min(k + self._tombstones(), len(self._slot_labels), _MAX_GPU_K)
            similarities, slots = self._index.search(query, fetch)
        else:
            params = self._faiss.SearchParametersHNSW(  # type: ignore[attr-defined]  # faiss-cpu's stub lacks it; swigfaiss has it
                sel=self._live_selector(), efSearch=max(self._config.ef_search, k)
            )
            similarities, slots = self._index.search(query, k, params=params)
        found = [
            Neighbor(self._slot_labels[slot], float(similarity))
            for slot, similarity in zip(slots[0], similarities[0])
            if slot >= 0 and self._slot_labels[slot] >= 0
        ]
        return found[:k]

    def usage(self) -> IndexUsage:
        return IndexUsage(self.kind, len(self._slot_of), len(self._slot_labels), self._tombstones())

    def _tombstones(self) -> int:
        return len(self._slot_labels) - len(self._slot_of)

    def _live_selector(self):
        if self._selector is None:
            dead = np.array([slot for slot, label in enumerate(self._slot_labels) if label < 0], dtype=np.int64)
            self._selector = self._faiss.IDSelectorNot(self._faiss.IDSelectorBatch(dead))
            self._selector_ids = dead  # the selector reads this array: keep it alive with it
        return self._selector

    def _compact(self) -> None:
        """Rebuild from the live vectors: tombstoned slots are freed for reuse."""
        live = [(label, slot) for slot, label in enumerate(self._slot_labels) if label >= 0]
        vectors = np.vstack([self._index.reconstruct(slot) for _, slot in live]) if live else None
        self._index, self._slot_labels, self._slot_of, self._selector = self._new_index(), [], {}, None
        for (label, _), vector in zip(live, vectors if vectors is not None else []):
            self.add(label, vector)
