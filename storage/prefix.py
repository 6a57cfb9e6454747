"""The prefix cache: every request's KV kept as a path of blocks, one radix tree per tenant.

SGLang's RadixAttention over token ids, with HiCache's tiers underneath: a finished
request's KV (prompt and the answer tokens that went through the model) is cut into blocks
of block_tokens tokens and each block is stored once in the tiered store (device → cpu →
redis, the store's codecs and checksums) under a chained content key,

    key(block j) = chunk_key(fingerprint, tokens of block j, context = key(block j-1) | variant, tenant)

so a block's key names the whole token prefix up to its end: two paths that share a prefix
share its blocks, and a replica that never saw a path finds its blocks in Redis by
recomputing the keys from the prompt (lookups never depend on this process's tree).

    match      the longest run of a prompt's whole blocks that the store holds, read in one
               batched get_many, deepest block first: a path is touched leaf to root, so under
               the store's LRU a path's last block is the least recently used of it and
               eviction takes leaves first (a block whose parent is gone is never reached again
               and ages out in turn); then the known block after the run that shares the most
               leading tokens with the prompt's next ones gives those too (token-granular reuse
               of what this process stored: a path's part block at its end, or a block where
               the earlier path went on differently)
    insert     the new blocks of a finished request (the caller skips the ones known() says
               are stored), the part block at its end included, written deepest first
    paths      CachedPath: a path's block keys, tokens and bytes; agents pin it while a tool
               runs (pin_path: every block promoted to the top tier, then pinned there) and
               prefetch it before the tool returns (promote)
    labels     a program id names its latest path; the implicit conversation rule (a turn
               continues the longest earlier prompt it wholly extends) is PromptLabels
    variant    what produced the KV. Full prefill's KV is "exact"; blended KV depends on the
               ratio and selection that made it, so each blend setting is its own tree: an
               exact request never reuses approximate KV, a blend request reuses KV blended
               the way it would blend. A prefix that ends inside blended documents is reused as
               the first request blended it (which tokens were recomputed was chosen over that
               request's whole prompt).

The tree here (the blocks this process stored or found, with their parents) is for counting,
labels and pins; a block the store dropped is pruned from it when a lookup finds it gone.
Running sequences hold their own copy of the KV they reuse (placed into their working buffer
at admission), so evicting a block never takes KV from a running sequence.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ragcache.kv import ChunkKey, KVChunk, chunk_key
from ragcache.storage.base import KVStore, PinHandle, PrefixCache, TierRoom
from ragcache.storage.labels import PromptLabels, indexed_prompt

DEFAULT_BLOCK_TOKENS = 16
EXACT = "exact"


@dataclass(frozen=True)
class CachedPath:
    """A stored path: the keys of its blocks (root first), the tokens they cover and their bytes."""

    namespace: str
    keys: tuple[ChunkKey, ...]
    num_tokens: int
    nbytes: int


@dataclass(frozen=True)
class PrefixHit:
    """What match() found: the first num_tokens tokens' KV, block by block (keys rotated to their positions)."""

    num_tokens: int
    blocks: tuple[KVChunk, ...] = ()
    keys: tuple[ChunkKey, ...] = ()


@dataclass(frozen=True)
class PathPin:
    """One pin on a whole path: the store's handle per block. tier and expires_s as a PinHandle's."""

    path: CachedPath
    handles: tuple[PinHandle, ...]
    tier: str
    expires_s: float


@dataclass
class PrefixCounters:
    lookups: int = 0
    lookup_tokens: int = 0  # tokens of the prompts looked up
    hit_tokens: int = 0  # of them, found
    inserted_blocks: int = 0
    evictions: int = 0  # blocks pruned from the tree: the store no longer held them
    promoted_tokens: int = 0  # tokens promote() brought up to the top tier (prefetches)
    path_pins: int = 0


@dataclass
class _Node:
    parent: ChunkKey | None
    namespace: str
    variant: str
    tokens: tuple[int, ...]  # the block's (a part block at a path's end has fewer than block_tokens)
    nbytes: int
    children: set[ChunkKey] = field(default_factory=set)


class RadixPrefixCache:
    """The PrefixCache contract (storage/base.py) over a KVStore (a TieredStore). Thread-safe; its lock never
    covers a store call."""

    def __init__(
        self,
        store: KVStore,
        fingerprint: str,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_conversations: int = 10_000,
        max_nodes: int = 1_000_000,
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.store = store
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.max_nodes = max_nodes
        self.counters = PrefixCounters()
        self.labels = PromptLabels(max_conversations)
        self._nodes: OrderedDict[ChunkKey, _Node] = OrderedDict()  # least recently used first
        self._roots: dict[tuple[str, str], set[ChunkKey]] = {}  # (tenant, variant) -> first blocks
        self._programs: OrderedDict[tuple[str, str], CachedPath] = OrderedDict()  # least recently labelled first
        self.max_programs = max_conversations
        self._pinned: dict[ChunkKey, int] = {}  # block -> path pins holding it
        self._lock = threading.Lock()
        self.reclaimer: Callable[[int, str], int] | None = None  # agents: frees pinned room a live request needs
        self._local = bool(store.local_room())  # a store with memory tiers (else Redis alone)

    @property
    def clock(self) -> Callable[[], float]:
        return self.store.clock

    # keys

    def block_keys(self, namespace: str, variant: str, ids: Sequence[int], tail: bool = False) -> list[ChunkKey]:
        """The chained keys of ids' whole blocks, and with tail of the part block after them (if any)."""
        b = self.block_tokens
        n = -(-len(ids) // b) if tail else len(ids) // b
        keys, context = [], f"prefix:{variant}"
        for j in range(n):
            key = chunk_key(self.fingerprint, ids[j * b : (j + 1) * b], context, namespace)
            keys.append(key)
            context = key
        return keys

    # reads

    def match(self, namespace: str, variant: str, ids: Sequence[int]) -> PrefixHit:
        """The longest prefix of ids whose KV the store holds (store I/O: not on the step loop).

        The run of ids' whole blocks found by key (any replica's), then, from this process's tree, the
        stored block after the run that starts with the most of ids' next tokens: a path that went
        on differently (an answer where the new prompt has a re-rendered turn), or its part block at
        the end, still gives the tokens the two share. So an identical prompt, or an agent's next
        turn, reuses every token it shares with an earlier path, not only whole blocks. Less than one
        block's worth is no hit: every prompt shares the chat template's first tokens with every other."""
        keys = self.block_keys(namespace, variant, ids)
        found = self.store.get_many(keys[::-1])[::-1] if keys else []
        run = 0
        while run < len(found) and found[run] is not None:
            run += 1
        rest = tuple(ids[run * self.block_tokens : (run + 1) * self.block_tokens])
        with self._lock:
            for key in keys[run:]:  # gone from the store (or never here): nothing below it is reachable
                if key in self._nodes:
                    self._prune(key)
            self._touch(namespace, variant, keys[:run], found[:run])
            partial_key, shared = self._best_child(keys[run - 1] if run else (namespace, variant), rest)
        blocks = [chunk for chunk in found[:run] if chunk is not None]
        hit_keys = list(keys[:run])
        if partial_key is not None:
            chunk = self.store.get(partial_key)
            if chunk is not None and tuple(chunk.token_ids[:shared]) == rest[:shared]:
                blocks.append(chunk)
                hit_keys.append(partial_key)
            else:
                shared = 0
        tokens = run * self.block_tokens + shared
        if tokens < self.block_tokens:  # every prompt shares the chat template's first tokens: no hit
            tokens, blocks, hit_keys = 0, [], []
        with self._lock:
            self.counters.lookups += 1
            self.counters.lookup_tokens += len(ids)
            self.counters.hit_tokens += tokens
        return PrefixHit(tokens, tuple(blocks), tuple(hit_keys))

    def known(self, keys: Sequence[ChunkKey]) -> int:
        """How many of a path's leading blocks (its block_keys with tail) are stored: known to this process's
        tree and, with local tiers, still held by one (no remote call). A finished request stores only the
        blocks after them.

        Why ask the local tiers: the tree hears of an eviction only when a lookup misses, and a request
        that ran long may have had its hit's blocks evicted meanwhile. Counting them as stored would leave a
        hole in the path, and every later lookup of it would stop there, though this request just used it
        and holds its KV. A block evicted locally but kept in Redis is written again (write-through). The
        blocks counted are touched (used now), so the store keeps them until insert() writes the rest."""
        with self._lock:
            run = 0
            while run < len(keys) and keys[run] in self._nodes:
                run += 1
        if run and self._local:
            run = next((i for i, held in enumerate(self.store.held_locally(keys[:run])) if not held), run)
            self.store.touch(keys[:run][::-1])  # used now: they must outlive the write of the blocks after them
        return run

    # writes

    def insert(
        self,
        namespace: str,
        variant: str,
        keys: Sequence[ChunkKey],
        num_tokens: int,
        start_block: int,
        blocks: Sequence[KVChunk],
    ) -> CachedPath:
        """Store blocks, the KV of a path's blocks from start_block on (keys: its block_keys with tail, for
        num_tokens tokens), and return the path.

        The whole path counts as used now, leaf first and root last (new blocks, then the stored ones), so
        the store's LRU evicts it from its end: the blocks of a hit age from the request's lookup, and
        without this a request that waited or ran long would leave its root side the oldest, the first
        evicted, and an eviction there cuts every block after it off the path."""
        new = list(zip(keys[start_block:], blocks))
        needed = sum(chunk.nbytes for _, chunk in new)
        if needed and self.reclaimer is not None:
            room = self.room()[0]
            if room.max_bytes - room.pinned_bytes < needed:  # pins hold the room this request's KV needs
                self.reclaimer(needed, room.name)
        stored = self.store.put_many(new[::-1])[::-1] if new else []
        self.store.touch(keys[:start_block][::-1])
        with self._lock:
            self.counters.inserted_blocks += sum(stored)
            parent = keys[start_block - 1] if start_block > 0 else None
            for (key, chunk), ok in zip(new, stored):
                if not ok:
                    break
                self._add(key, parent, namespace, variant, chunk)
                parent = key
            nbytes = sum(self._nodes[key].nbytes for key in keys if key in self._nodes)
        return CachedPath(namespace, tuple(keys), num_tokens, nbytes)

    def tenant_blocks(self, namespace: str) -> list[ChunkKey]:
        """The tenant's blocks this process knows of (what a tenant's flush drops besides its documents)."""
        with self._lock:
            return [key for key, node in self._nodes.items() if node.namespace == namespace]

    # programs and conversations

    def label(self, namespace: str, program_id: str, path: CachedPath) -> None:
        """path is program_id's latest (past max_programs labels, the least recently labelled is dropped)."""
        with self._lock:
            self._programs[(namespace, program_id)] = path
            self._programs.move_to_end((namespace, program_id))
            while len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)

    def label_prompt(self, namespace: str, program_id: str, prompt_ids: Sequence[int]) -> list[tuple[str, str]]:
        """An implicit program's latest prompt (labels.indexed_prompt of it); returns the (tenant, program)
        pairs forgotten to stay within max_conversations (forget() them)."""
        return self.labels.index(namespace, program_id, indexed_prompt(prompt_ids))

    def continued(self, namespace: str, ids: Sequence[int]) -> str | None:
        """The implicit program whose labelled prompt ids wholly extends (the longest), if any."""
        found = self.labels.match(namespace, ids)
        return found[0] if found is not None else None

    def program_path(self, namespace: str, program_id: str) -> CachedPath | None:
        with self._lock:
            return self._programs.get((namespace, program_id))

    def forget(self, namespace: str, program_id: str) -> bool:
        """The program ended: its label and its conversation go (its blocks age out like any others)."""
        self.labels.forget(namespace, program_id)
        with self._lock:
            return self._programs.pop((namespace, program_id), None) is not None

    def programs(self) -> list[tuple[str, str, int]]:
        """(tenant, program id, tokens of its latest path)."""
        with self._lock:
            return [(ns, pid, path.num_tokens) for (ns, pid), path in self._programs.items()]

    # pins and prefetch (agents)

    def pin_path(self, path: CachedPath, ttl_s: float, tier: str | None = None) -> PathPin | None:
        """Bring every block of path to the tier (the top one by default) and pin it there for ttl_s; None
        (nothing held) when a block is in no local tier, or the tier cannot take it."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        rooms = self.room()
        if not rooms:
            return None
        tier = tier or rooms[0].name
        if tier == rooms[0].name:
            self.store.get_many(path.keys[::-1])  # promotes what lower tiers hold
        handles: list[PinHandle] = []
        for key in path.keys:
            handle = self.store.pin(key, ttl_s, tier)
            if handle is None:
                for held in handles:
                    self.store.unpin(held)
                return None
            handles.append(handle)
        with self._lock:
            self.counters.path_pins += 1
            for key in path.keys:
                self._pinned[key] = self._pinned.get(key, 0) + 1
        expires = min((handle.expires_s for handle in handles), default=self.clock() + ttl_s)
        return PathPin(path, tuple(handles), tier, expires)

    def unpin_path(self, pin: PathPin) -> bool:
        """Release a path pin; True if it still held (no block's pin had expired or been dropped)."""
        held = [self.store.unpin(handle) for handle in pin.handles]
        with self._lock:
            for key in pin.path.keys:
                count = self._pinned.get(key, 0) - 1
                if count > 0:
                    self._pinned[key] = count
                else:
                    self._pinned.pop(key, None)
        return all(held)

    def extend_pin(self, pin: PathPin, ttl_s: float) -> PathPin | None:
        """The same path pinned for ttl_s from now (the old pin released); None if it no longer can be."""
        fresh = self.pin_path(pin.path, ttl_s, pin.tier)
        if fresh is not None:
            self.unpin_path(pin)
        return fresh

    def promote(self, path: CachedPath) -> int:
        """Prefetch: bring the path's blocks up to the top tier; the tokens that had to move (KVFlow)."""
        below = self.store.below_top(path.keys)
        found = self.store.get_many(below[::-1]) if below else []
        moved = sum(chunk.num_tokens for chunk in found if chunk is not None)
        with self._lock:
            self.counters.promoted_tokens += moved
        return moved

    def release_expired(self) -> int:
        return self.store.release_expired()

    def room(self) -> list[TierRoom]:
        """Each local tier, fastest first: its bytes and what pins hold of them."""
        return self.store.local_room()

    # accounting

    def stats(self) -> dict:
        """The tree for /admin/stats and /metrics: nodes (blocks), cached tokens and bytes, hits, evictions, pins."""
        with self._lock:
            c = self.counters
            return {
                "block_tokens": self.block_tokens,
                "nodes": len(self._nodes),
                "cached_tokens": sum(len(node.tokens) for node in self._nodes.values()),
                "cached_bytes": sum(node.nbytes for node in self._nodes.values()),
                "lookups": c.lookups,
                "lookup_tokens": c.lookup_tokens,
                "hit_tokens": c.hit_tokens,
                "hit_rate": c.hit_tokens / c.lookup_tokens if c.lookup_tokens else None,
                "inserted_blocks": c.inserted_blocks,
                "evictions": c.evictions,
                "pinned_blocks": len(self._pinned),
                "path_pins": c.path_pins,
                "promoted_tokens": c.promoted_tokens,
                "programs": len(self._programs),
                "conversations": len(self.labels),
            }

    # the tree (under the lock)

    def _add(self, key: ChunkKey, parent: ChunkKey | None, namespace: str, variant: str, chunk: KVChunk) -> None:
        if key in self._nodes:
            self._nodes.move_to_end(key)
            return
        self._nodes[key] = _Node(parent, namespace, variant, tuple(chunk.token_ids), chunk.nbytes)
        self._siblings(parent, namespace, variant).add(key)
        while len(self._nodes) > self.max_nodes:  # forget the least recently used (the store keeps its KV)
            self._forget(next(iter(self._nodes)))

    def _siblings(self, parent: ChunkKey | None, namespace: str, variant: str) -> set[ChunkKey]:
        """The set a node is listed in: its parent's children, or its tree's first blocks."""
        if parent is None:
            return self._roots.setdefault((namespace, variant), set())
        node = self._nodes.get(parent)
        return node.children if node is not None else set()

    def _best_child(self, parent: ChunkKey | tuple[str, str], rest: tuple[int, ...]) -> tuple[ChunkKey | None, int]:
        """The known block after parent (a key, or a tree's root) sharing the most leading tokens with rest."""
        if isinstance(parent, tuple):
            children = self._roots.get(parent, set())
        else:
            node = self._nodes.get(parent)
            children = node.children if node is not None else set()
        best, shared = None, 0
        for key in children:
            child = self._nodes.get(key)
            if child is not None:
                n = _common_prefix(child.tokens, rest)
                if n > shared:
                    best, shared = key, n
        return best, shared

    def _touch(self, namespace: str, variant: str, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk | None]) -> None:
        """Blocks found: known now (another replica may have stored them), most recent last, root last."""
        parent = None
        for key, chunk in zip(keys, chunks):
            if chunk is not None:
                self._add(key, parent, namespace, variant, chunk)
            parent = key
        for key in reversed(keys):
            if key in self._nodes:
                self._nodes.move_to_end(key)

    def _prune(self, key: ChunkKey) -> None:
        """Drop key's node and everything below it from the tree (the store lost them: evictions)."""
        stack = [key]
        while stack:
            gone = stack.pop()
            if gone in self._nodes:
                stack.extend(self._nodes[gone].children)
                self._forget(gone)
                self.counters.evictions += 1

    def _forget(self, key: ChunkKey) -> None:
        node = self._nodes.pop(key)
        self._siblings(node.parent, node.namespace, node.variant).discard(key)
        if node.parent is None and not self._roots.get((node.namespace, node.variant)):
            self._roots.pop((node.namespace, node.variant), None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


if TYPE_CHECKING:  # the type checker holds RadixPrefixCache to the PrefixCache contract
    _cache: type[PrefixCache] = RadixPrefixCache
