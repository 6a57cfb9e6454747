"""Content keys and the KV object."""

import pytest
import torch

from ragcache.kv import KVChunk, chunk_key


def test_chunk_key_is_stable_and_names_every_part_of_identity():
    base = chunk_key("fp", [1, 2, 3], context="ctx", namespace="t1")
    assert base == chunk_key("fp", (1, 2, 3), context="ctx", namespace="t1")
    others = {
        chunk_key("fp2", [1, 2, 3], "ctx", "t1"),
        chunk_key("fp", [1, 2, 4], "ctx", "t1"),
        chunk_key("fp", [1, 2, 3], "ctx2", "t1"),
        chunk_key("fp", [1, 2, 3], "ctx", "t2"),
    }
    assert base not in others and len(others) == 4


def test_kv_chunk_checks_shapes():
    keys = torch.zeros(2, 1, 3, 4)
    chunk = KVChunk((1, 2, 3), keys, torch.zeros(2, 1, 3, 4), "fp")
    assert chunk.num_tokens == 3 and chunk.nbytes == 2 * 2 * 3 * 4 * 4
    with pytest.raises(ValueError, match="differ"):
        KVChunk((1, 2, 3), keys, torch.zeros(2, 1, 2, 4), "fp")
    with pytest.raises(ValueError, match="expected keys of shape"):
        KVChunk((1, 2), keys, keys, "fp")
