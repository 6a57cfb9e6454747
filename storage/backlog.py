"""The write backlog: remote writes (write-through, demotion) that failed while Redis was down,
kept, bounded, to be retried when it is back, so other replicas need not recompute them."""

from __future__ import annotations

from collections import OrderedDict

from ragcache.kv import ChunkKey, KVChunk


class WriteBacklog:
    """Remote writes that failed, oldest first, per (remote tier, key); the store's lock guards it.

    The value is the chunk, or None while a local tier still holds it (the retry reads it there,
    so the backlog does not keep device memory alive). held_bytes counts the chunks held; past
    max_bytes the oldest held ones are dropped, and max_bytes 0 keeps none.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"write backlog bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.dropped = 0
        self._entries: OrderedDict[tuple[str, ChunkKey], KVChunk | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, tier: str, key: ChunkKey, chunk: KVChunk | None) -> None:
        """Keep (or update) a failed write; a key already waiting keeps its place in line."""
        old = self._entries.get((tier, key))
        self.held_bytes += (chunk.nbytes if chunk is not None else 0) - (old.nbytes if old is not None else 0)
        self._entries[(tier, key)] = chunk
        while self.held_bytes > self.max_bytes:
            oldest_held, dropped = next((entry, held) for entry, held in self._entries.items() if held is not None)
            del self._entries[oldest_held]
            self.held_bytes -= dropped.nbytes
            self.dropped += 1

    def forget(self, tier: str | None = None, key: ChunkKey | None = None) -> None:
        """Drop waiting writes: of one tier, of one key, or both given; every one when neither is."""
        if tier is not None and key is not None:
            entries = [(tier, key)]
        else:
            entries = [e for e in self._entries if tier in (None, e[0]) and key in (None, e[1])]
        for entry in entries:
            chunk = self._entries.pop(entry, None)
            self.held_bytes -= chunk.nbytes if chunk is not None else 0

    def oldest(self, tier: str) -> list[tuple[ChunkKey, KVChunk | None]]:
        """The tier's waiting writes, oldest first."""
        return [(key, chunk) for (name, key), chunk in self._entries.items() if name == tier]
