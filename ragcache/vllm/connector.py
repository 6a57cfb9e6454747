"""RagcacheConnector: vLLM's full KV blocks saved to and loaded from ragcache's store (CPU tier + Redis).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "RagcacheConnector",
        "kv_connector_module_path": "ragcache.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"redis_url": "redis://127.0.0.1:6379"}}'

A prefix one server computed is loaded, not recomputed, by every other server sharing the Redis,
and by itself after a restart. vLLM runs one instance in its scheduler and one in each worker:

    scheduler  get_num_new_matched_tokens   how many blocks past vLLM's own prefix-cache hit are in
                                            Redis: looked up on a thread, the answer "not yet" (None)
                                            until it is known, so Redis never stalls a schedule
               update_state_after_alloc     the blocks vLLM gave those tokens: a load job
               build_connector_meta         this step's load jobs, and the blocks this step fills
                                            (prompt and answer alike) that were not stored before
    worker     start_load_kv                load jobs go to a loader thread: read the store (CPU tier,
                                            then Redis), copy into vLLM's blocks; the request waits
                                            in vLLM's WAITING_FOR_REMOTE_KVS meanwhile, other requests
                                            keep stepping. A block missing or failing its checksum is
                                            reported (get_block_ids_with_load_errors) and recomputed
               wait_for_save                after the forward: the step's full blocks copied out of
                                            vLLM's cache (the only work on the step's thread), then
                                            written to the store by a writer thread

Blocks are keyed by vLLM's own block hashes (chained over tokens, cache_salt, LoRA and media: a
tenant's salt keeps its blocks its own) in a namespace of the model and layout (blocks.py).
This module imports vLLM, torch, redis and ragcache.storage only: `pip install --no-deps -e .`
of ragcache in vLLM's environment is all it needs (scripts/vllm-cpu-env.sh does it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ragcache.kv import ChunkKey
from ragcache.vllm.blocks import (
    BlockMismatch,
    BlockSpace,
    ConnectorSettings,
    block_chunk,
    block_index,
    block_key,
    block_slabs,
    make_block_store,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.ragcache.connector")  # under vLLM's logger: its handlers print it

_KNOWN_STORED = 200_000  # block hashes the scheduler remembers as stored (not saved again)
_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class BlockLoad:
    req_id: str
    blocks: list[tuple[ChunkKey, int]]  # (store key, vLLM block id)


@dataclass(frozen=True)
class BlockSave:
    key: ChunkKey
    block_id: int
    token_ids: tuple[int, ...]
    start_pos: int


@dataclass
class RagcacheConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)


@dataclass
class _Lookup:
    start: int  # first block looked up (vLLM's local hit, in blocks)
    future: Future[int]  # stored blocks from start on, consecutive


@dataclass
class _Counters:
    looked_up: int = 0
    hit_blocks: int = 0
    loaded_blocks: int = 0
    failed_blocks: int = 0
    saved_blocks: int = 0
    dropped_saves: int = 0
    load_s: float = 0.0
    copy_out_s: float = 0.0
    logged_s: float = field(default_factory=time.monotonic)


class RagcacheConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings.of(transfer.kv_connector_extra_config)
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning(
                'kv_load_failure_policy is %r: a block lost from Redis fails its request; set "recompute" '
                "to recompute it instead",
                transfer.kv_load_failure_policy,
            )
        self._block_size = vllm_config.cache_config.block_size
        self._space = _space_of(vllm_config, kv_cache_config)
        self._counters = _Counters()
        if role == KVConnectorRole.SCHEDULER:
            self._index = block_index(self._settings, self._space)
            self._lookups_pool = ThreadPoolExecutor(self._settings.lookup_threads, thread_name_prefix="ragcache-lookup")
            self._lookups: dict[str, _Lookup] = {}
            self._planned: dict[str, tuple[int, int]] = {}  # req id -> (first block, blocks) to load
            self._loads: list[BlockLoad] = []
            self._requests: dict[str, Request] = {}
            self._stored_upto: dict[str, int] = {}  # req id -> blocks before it that are stored
            self._known: OrderedDict[bytes, None] = OrderedDict()
        else:
            self._caches: list[torch.Tensor] = []
            self._block_dim = 0
            self._block_shape: tuple[int, ...] = ()
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="ragcache-load")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ragcache-save")
            self._pending_save_bytes = 0
            self._done_lock = threading.Lock()
            self._loaded_reqs: set[str] = set()
            self._failed_block_ids: set[int] = set()
            self._store = make_block_store(self._settings, self._space)
        log.info(
            "RagcacheConnector (%s) on %s, namespace %s", role.name.lower(), _redacted(self._settings), self._space.name
        )

    # scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        start = num_computed_tokens // self._block_size
        usable = min(len(request.block_hashes), (request.num_tokens - 1) // self._block_size)
        if start >= usable:
            return 0, False
        lookup = self._lookups.get(request.request_id)
        if lookup is None or lookup.start != start:
            keys = [block_key(h) for h in request.block_hashes[start:usable]]
            self._lookups[request.request_id] = _Lookup(start, self._lookups_pool.submit(self._stored_run, keys))
            return None, False  # ask again next schedule; the lookup runs meanwhile
        if not lookup.future.done():
            return None, False
        found = lookup.future.result()
        self._counters.looked_up += usable - start
        self._counters.hit_blocks += found
        if found == 0:
            return 0, False
        self._planned[request.request_id] = (start, found)
        return found * self._block_size, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        self._lookups.pop(req_id, None)
        planned = self._planned.pop(req_id, None)
        if num_external_tokens == 0 or planned is None:
            return
        start, _ = planned
        count = num_external_tokens // self._block_size
        block_ids = blocks.get_block_ids()[0]
        hashes = request.block_hashes[start : start + count]
        self._loads.append(BlockLoad(req_id, [(block_key(h), block_ids[start + i]) for i, h in enumerate(hashes)]))
        for block_hash in hashes:
            self._remember(block_hash)

    def on_new_request(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = RagcacheConnectorMetadata(loads=self._loads)
        self._loads = []
        manager = self._kv_cache_manager
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None or manager is None or scheduled <= 0:
                continue
            done = self._stored_upto.setdefault(req_id, request.num_computed_tokens // self._block_size)
            full = min((request.num_computed_tokens + scheduled) // self._block_size, len(request.block_hashes))
            if full <= done:
                continue
            block_ids = manager.get_block_ids(req_id)[0]
            tokens = request.all_token_ids
            for index in range(done, full):
                block_hash = request.block_hashes[index]
                if block_hash in self._known:
                    self._known.move_to_end(block_hash)
                    continue
                self._remember(block_hash)
                first = index * self._block_size
                meta.saves.append(
                    BlockSave(
                        block_key(block_hash), block_ids[index], tuple(tokens[first : first + self._block_size]), first
                    )
                )
            self._stored_upto[req_id] = full
        self._log_counters()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        for table in (self._requests, self._stored_upto, self._lookups, self._planned):
            table.pop(req_id, None)
        return False, None  # saves copy the blocks out within their step: nothing holds them after

    def _stored_run(self, keys: list[ChunkKey]) -> int:
        """Blocks stored in Redis from the first key on, up to the first that is not."""
        for found, key in enumerate(keys):
            if not self._index.contains(key):
                return found
        return len(keys)

    def _remember(self, block_hash: bytes) -> None:
        self._known[block_hash] = None
        self._known.move_to_end(block_hash)
        while len(self._known) > _KNOWN_STORED:
            self._known.popitem(last=False)

    # worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        caches = list(kv_caches.values())
        num_blocks = self._kv_cache_config.num_blocks
        dims = [d for d, size in enumerate(caches[0].shape) if size == num_blocks]
        if not dims:
            raise ValueError(f"RagcacheConnector: no dimension of {num_blocks} blocks in {tuple(caches[0].shape)}")
        self._block_dim = dims[0]
        per_block = caches[0].numel() // num_blocks
        want = 2 * self._space.block_size * self._space.row_elems
        if len(caches) != self._space.num_layers or per_block != want:
            raise ValueError(
                f"RagcacheConnector: {len(caches)} layers of {per_block} elements per block, expected "
                f"{self._space.num_layers} of {want} (attention backend not supported)"
            )
        self._caches = caches
        self._block_shape = tuple(s for d, s in enumerate(caches[0].shape) if d != self._block_dim)
        log.info(
            "RagcacheConnector: %d layers, blocks on dim %d of %s", len(caches), self._block_dim, tuple(caches[0].shape)
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RagcacheConnectorMetadata)
        for load in meta.loads:
            self._loader.submit(self._load, load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before vLLM schedules their request (async: WAITING_FOR_REMOTE_KVS)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # whole blocks are copied out once per step, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RagcacheConnectorMetadata)
        if not meta.saves or not self._caches:
            return
        nbytes = len(meta.saves) * self._space.nbytes
        if self._pending_save_bytes + nbytes > self._settings.cpu_bytes // 4:
            self._counters.dropped_saves += len(meta.saves)  # the writer is behind: a future miss, not a stall
            return
        started = time.perf_counter()
        ids = torch.tensor([save.block_id for save in meta.saves], device=self._caches[0].device)
        # (layers, blocks, *block_shape), on the host: vLLM may reuse these blocks once the step ends
        slabs = torch.stack(
            [cache.index_select(self._block_dim, ids).movedim(self._block_dim, 0) for cache in self._caches]
        )
        slabs = slabs.to("cpu") if slabs.device.type != "cpu" else slabs
        self._counters.copy_out_s += time.perf_counter() - started
        self._pending_save_bytes += nbytes
        self._writer.submit(self._save, meta.saves, slabs, nbytes)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._done_lock:
            loaded, self._loaded_reqs = self._loaded_reqs, set()
        return None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._done_lock:
            failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self._loader.shutdown(wait=True)
            self._writer.shutdown(wait=True)
            self._store.close()
        else:
            self._lookups_pool.shutdown(wait=False, cancel_futures=True)
            self._index.close()

    def _load(self, load: BlockLoad) -> None:
        started = time.perf_counter()
        failed: list[int] = []
        try:
            chunks = self._store.get_many([key for key, _ in load.blocks])
            good: list[tuple[int, torch.Tensor]] = []
            for (_, block_id), chunk in zip(load.blocks, chunks):
                try:
                    if chunk is None:
                        raise BlockMismatch("not in the store (evicted, expired or corrupt)")
                    good.append((block_id, block_slabs(chunk, self._space, self._block_shape)))
                except BlockMismatch as exc:
                    log.warning("block %d not loaded: %s", block_id, exc)
                    failed.append(block_id)
            if good:
                ids = torch.tensor([block_id for block_id, _ in good], device=self._caches[0].device)
                data = torch.stack([slabs for _, slabs in good], dim=1)  # (layers, blocks, *block_shape)
                for layer, cache in enumerate(self._caches):
                    cache.index_copy_(self._block_dim, ids, data[layer].to(cache.device).movedim(0, self._block_dim))
        except Exception:
            log.exception("loading %d blocks for %s failed; they will be recomputed", len(load.blocks), load.req_id)
            failed = [block_id for _, block_id in load.blocks]
        counters = self._counters
        counters.loaded_blocks += len(load.blocks) - len(failed)
        counters.failed_blocks += len(failed)
        counters.load_s += time.perf_counter() - started
        with self._done_lock:
            self._failed_block_ids.update(failed)
            self._loaded_reqs.add(load.req_id)
        self._log_counters()

    def _save(self, saves: list[BlockSave], slabs: torch.Tensor, nbytes: int) -> None:
        try:
            items = [
                (save.key, block_chunk(slabs[:, i], save.token_ids, save.start_pos, self._space))
                for i, save in enumerate(saves)
            ]
            self._store.put_many(items)
            self._counters.saved_blocks += len(items)
        except Exception:
            log.exception("saving %d blocks failed", len(saves))
        finally:
            self._pending_save_bytes -= nbytes

    def _log_counters(self) -> None:
        counters = self._counters
        now = time.monotonic()
        if now - counters.logged_s < _LOG_EVERY_S:
            return
        counters.logged_s = now
        if self.role == KVConnectorRole.SCHEDULER:
            log.info("ragcache blocks: %d looked up, %d found stored", counters.looked_up, counters.hit_blocks)
        else:
            log.info(
                "ragcache blocks: %d loaded (%.2f s), %d failed, %d saved, %d saves dropped (copy-out %.2f s)",
                counters.loaded_blocks,
                counters.load_s,
                counters.failed_blocks,
                counters.saved_blocks,
                counters.dropped_saves,
                counters.copy_out_s,
            )


def _space_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> BlockSpace:
    """The namespace both roles derive alike from the config (the scheduler never sees the tensors)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
    from vllm.platforms import current_platform

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"RagcacheConnector supports models with one KV cache group, this one has {len(groups)}")
    spec: Any = groups[0].kv_cache_spec
    parallel = vllm_config.parallel_config
    try:
        rank = get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError):  # the scheduler's process has no parallel groups
        rank = 0
    cache = vllm_config.cache_config
    layout = getattr(cache, "kv_cache_layout", None) or "default"  # resolved by vLLM before connectors start
    return BlockSpace(
        model=f"{_served_name(vllm_config)}@{current_platform.device_type}:{layout}",
        dtype=str(spec.dtype),
        block_size=cache.block_size,
        row_elems=spec.num_kv_heads * spec.head_size,
        num_layers=len(groups[0].layer_names),
        tp_rank=rank,
        tp_size=parallel.tensor_parallel_size,
        # vLLM seeds its first block's parent with PYTHONHASHSEED, else a fixed seed (sha256) or a random one
        hashing=f"{cache.prefix_caching_hash_algo}:{os.environ.get('PYTHONHASHSEED', 'default')}",
    )


def _served_name(vllm_config: VllmConfig) -> str:
    """The model's name as served (--served-model-name, else the path given): replicas must agree on it."""
    served = vllm_config.model_config.served_model_name
    return served if isinstance(served, str) else served[0] if served else vllm_config.model_config.model


def _redacted(settings: ConnectorSettings) -> str:
    url = settings.redis_url
    if "@" in url:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return f"{url} (cpu tier {settings.cpu_bytes >> 20} MiB, codec {settings.codec})"
