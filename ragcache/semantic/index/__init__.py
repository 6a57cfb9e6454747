"""Vector indexes behind one contract (base.py): hnswlib by default, faiss as the alternative."""

from __future__ import annotations

from ragcache.semantic.index.base import IndexConfig, IndexUsage, Neighbor, VectorIndex


def make_index(dim: int, config: IndexConfig = IndexConfig()) -> VectorIndex:
    """The index config.kind names; its library is imported only here, when one is made."""
    if config.kind == "faiss":
        from ragcache.semantic.index.faiss_index import FaissIndex

        return FaissIndex(dim, config)
    from ragcache.semantic.index.hnsw import HnswIndex

    return HnswIndex(dim, config)


__all__ = ["IndexConfig", "IndexUsage", "Neighbor", "VectorIndex", "make_index"]
