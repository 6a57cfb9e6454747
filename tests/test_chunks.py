"""Prepacked chunk KV equals one-by-one KV; packing is first-fit decreasing."""

import torch

from ragcache.engine.chunks import compute_chunks, pack_first_fit


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_pack_first_fit_decreasing_groups_exactly():
    assert pack_first_fit([5, 7, 3, 2], max_pack_tokens=10) == [[1, 2], [0, 3]]
    assert pack_first_fit([12, 4], max_pack_tokens=10) == [[0], [1]]  # an oversized chunk goes alone


def test_prepacked_chunks_equal_chunk_by_chunk(stack):
    prefix = compute_chunks(stack, [random_ids(9, 0)], None, "fp")[0]
    chunk_ids = [random_ids(n, seed) for seed, n in enumerate([13, 7, 21], start=1)]
    packed = compute_chunks(stack, chunk_ids, prefix, "fp", max_pack_tokens=4096)
    one_by_one = [compute_chunks(stack, [ids], prefix, "fp")[0] for ids in chunk_ids]
    for a, b in zip(packed, one_by_one):
        assert a.token_ids == b.token_ids and a.start_pos == b.start_pos == 9
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.allclose(a.values, b.values, atol=1e-5)


def test_chunk_after_prefix_equals_the_same_tokens_in_one_sequence(stack):
    prefix_ids, chunk = random_ids(9, 0), random_ids(15, 1)
    prefix = compute_chunks(stack, [prefix_ids], None, "fp")[0]
    chunk_kv = compute_chunks(stack, [chunk], prefix, "fp")[0]
    whole = compute_chunks(stack, [prefix_ids + chunk], None, "fp")[0]
    assert torch.allclose(chunk_kv.keys, whole.keys[:, :, 9:], atol=1e-5)
    assert torch.allclose(chunk_kv.values, whole.values[:, :, 9:], atol=1e-5)
