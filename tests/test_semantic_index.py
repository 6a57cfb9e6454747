"""The vector indexes behind the semantic cache: exact labels in, exact labels out."""

from __future__ import annotations

import numpy as np
import pytest

from ragcache.semantic.index import IndexConfig, make_index

DIM = 16

def vectors(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make(kind: str, capacity: int = 4):
    if kind == "faiss":
        pytest.importorskip("faiss")
    return make_index(DIM, IndexConfig(kind=kind, initial_capacity=capacity))


@pytest.mark.parametrize("kind", ["hnsw", "faiss"])
def test_each_vector_finds_itself_first(kind):
    index, rows = make(kind), vectors(10)
    for label, row in enumerate(rows):
        index.add(100 + label, row)
    for label, row in enumerate(rows):
        nearest = index.search(row, 3)
        assert nearest[0].label == 100 + label and nearest[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert [n.similarity for n in nearest] == sorted((n.similarity for n in nearest), reverse=True)
    assert len(index) == 10


@pytest.mark.parametrize("kind", ["hnsw", "faiss"])
def test_removed_labels_are_never_returned(kind):
    index, rows = make(kind), vectors(8)
    for label, row in enumerate(rows):
        index.add(label, row)
    assert index.remove(3) and not index.remove(3)
    found = {n.label for n in index.search(rows[3], 8)}
    assert found == {0, 1, 2, 4, 5, 6, 7}
    assert index.usage().entries == 7


@pytest.mark.parametrize("kind", ["hnsw", "faiss"])
def test_search_on_an_empty_index_is_empty(kind):
    index = make(kind)
    assert index.search(vectors(1)[0], 5) == []
    index.add(1, vectors(1)[0])
    index.remove(1)
    assert index.search(vectors(1)[0], 5) == []


def test_hnsw_reuses_deleted_slots_instead_of_growing():
    index, rows = make("hnsw", capacity=4), vectors(8)
    for label in range(4):
        index.add(label, rows[label])
    for label in range(4):
        index.remove(label)
    assert index.usage().deleted == 4
    for label in range(4, 8):
        index.add(label, rows[label])
    usage = index.usage()
    assert (usage.entries, usage.capacity, usage.deleted) == (4, 4, 0)
    assert [index.search(rows[label], 1)[0].label for label in range(4, 8)] == [4, 5, 6, 7]


def test_hnsw_doubles_when_full():
    index, rows = make("hnsw", capacity=4), vectors(9)
    for label, row in enumerate(rows):
        index.add(label, row)
    assert index.usage().capacity == 16
    assert index.search(rows[8], 1)[0].label == 8


def test_faiss_compacts_tombstones_into_free_slots():
    index, rows = make("faiss"), vectors(8)
    for label, row in enumerate(rows):
        index.add(label, row)
    index.remove(0)
    assert index.usage().deleted == 1  # a quarter not yet passed: a tombstone
    index.remove(1)
    index.remove(2)  # 3 of 8 > a quarter: rebuilt from the live vectors
    usage = index.usage()
    assert (usage.entries, usage.capacity, usage.deleted) == (5, 5, 0)
    assert index.search(rows[7], 1)[0].label == 7


@pytest.mark.parametrize("kind", ["hnsw", "faiss"])
def test_adding_a_label_again_replaces_its_vector(kind):
    index, rows = make(kind), vectors(3)
    index.add(1, rows[0])
    index.add(1, rows[1])
    assert len(index) == 1
    assert index.search(rows[1], 1)[0].similarity == pytest.approx(1.0, abs=1e-5)
