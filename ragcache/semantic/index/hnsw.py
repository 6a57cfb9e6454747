"""hnswlib: an in-memory HNSW graph (the default index).

Deletion marks the element; `allow_replace_deleted` lets the next insert take a marked
slot, so an index with churn stays at its high-water mark instead of growing. When every
slot is live the capacity doubles (resize_index copies the graph once; amortised O(1)).
"""

from __future__ import annotations

import numpy as np

from ragcache.semantic.index.base import IndexConfig, IndexUsage, Neighbor, VectorIndex


class HnswIndex(VectorIndex):
    def __init__(self, dim: int, config: IndexConfig = IndexConfig()) -> None:
        import hnswlib

        self.dim = dim
        self._config = config
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(
            max_elements=config.initial_capacity,
            ef_construction=config.ef_construction,
            M=config.m,
            allow_replace_deleted=True,
        )
        self._index.set_ef(config.ef_search)
        self._live: set[int] = set()
        self._deleted = 0  # marked slots not yet taken by an add

    def add(self, label: int, vector: np.ndarray) -> None:
        if label in self._live:
            self.remove(label)
        if self._deleted == 0 and self._index.get_current_count() >= self._index.get_max_elements():
            self._index.resize_index(2 * self._index.get_max_elements())
        data = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        self._index.add_items(data, np.array([label]), replace_deleted=self._deleted > 0)
        if self._deleted > 0:
            self._deleted -= 1
        self._live.add(label)

    def remove(self, label: int) -> bool:
        if label not in self._live:
            return False
        self._index.mark_deleted(label)
        self._live.discard(label)
        self._deleted += 1
        return True

    def search(self, vector: np.ndarray, k: int) -> list[Neighbor]:
        k = min(k, len(self._live))
        if k <= 0:
            return []
        self._index.set_ef(max(self._config.ef_search, k))
        query = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        while True:
            try:
                labels, distances = self._index.knn_query(query, k=k)
                break
            except RuntimeError:  # fewer than k reachable past deleted nodes: ask for fewer
                if k == 1:
                    return []
                k = max(1, k // 2)
        return [Neighbor(int(label), 1.0 - float(distance)) for label, distance in zip(labels[0], distances[0])]

    def usage(self) -> IndexUsage:
        return IndexUsage("hnsw", len(self._live), self._index.get_max_elements(), self._deleted)
