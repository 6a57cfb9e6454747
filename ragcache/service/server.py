"""`ragcache serve`: build the runtime from settings and run the app under uvicorn."""

from __future__ import annotations

import logging
import threading

from ragcache.agents.coordinator import AgentConfig, ProgramCoordinator
from ragcache.agents.pins import PinConfig
from ragcache.checks.blend_budget import BlendBudget, BlendBudgetConfig
from ragcache.checks.shadow import ShadowChecks, ShadowConfig
from ragcache.config import Settings, SettingsError
from ragcache.engine.blend import BlendConfig
from ragcache.engine.loader import ModelSpec, load_model
from ragcache.engine.prompt import PromptLimits
from ragcache.engine.runner import BlendEngine, EngineConfig
from ragcache.engine.scheduler import SchedulerConfig
from ragcache.registry import make_registry
from ragcache.registry.documents import DocumentRegistry
from ragcache.service.runtime import Runtime
from ragcache.storage.factory import GiB, StoreConfig, make_store

log = logging.getLogger("ragcache.service")


def build_runtime(settings: Settings) -> Runtime:
    """Load the model (once per process) and wire engine, store and runtime as settings say."""
    if settings.engine == "vllm":
        return _vllm_runtime(settings)
    loaded = load_model(ModelSpec(settings.model, settings.device, settings.dtype))
    store = make_store(_store_config(settings), settings.device, loaded.fingerprint)
    store.start_sweeper()
    config = EngineConfig(
        blend=BlendConfig(settings.check_layer, settings.deviation, settings.sink_tokens),
        default_ratio=settings.blend_ratio,
        limits=PromptLimits(
            settings.max_documents, settings.max_document_tokens, loaded.model.config.max_position_embeddings
        ),
        scheduler=SchedulerConfig(
            int(settings.working_kv_gb * GiB), settings.step_tokens, settings.kv_block_tokens, settings.max_running
        ),
    )
    registry = make_registry(settings.registry_kind, settings.redis_url, settings.data_path)
    engine = BlendEngine(loaded, store, config)
    pins = _pin_config(settings)
    coordinator = ProgramCoordinator.measured(engine.prefix, engine.stack, AgentConfig(pins=pins))
    engine.use_admission_order(coordinator.scheduler)
    semantic = _semantic_cache(settings)
    return Runtime(
        engine,
        settings.max_queue,
        semantic,
        coordinator,
        *answer_checks(settings, engine, semantic),
        conversations=settings.conversation_kv,
        documents=DocumentRegistry(registry),
    )


def _vllm_runtime(settings: Settings) -> Runtime:
    """ragcache in front of vLLM servers: the same semantic cache, registries, tenants, tools, programs and
    admin; vLLM prefills and decodes (its prefix cache, and ragcache's connector in it, keep the KV).
    No blending, so no blend error budget and no blend shadow checks; semantic shadow checks stay."""
    from dataclasses import replace

    from ragcache.agents.profile import measure_prefill_profile
    from ragcache.storage.prefix import RadixPrefixCache
    from ragcache.vllm.engine import make_vllm_engine

    store = make_store(_store_config(settings), "cpu", "vllm")  # program records and pins; the prompt KV is vLLM's
    store.start_sweeper()
    engine = make_vllm_engine(
        settings.vllm_url_list, settings.model, store, settings.max_documents, settings.max_document_tokens
    )
    engine.start()
    registry = make_registry(settings.registry_kind, settings.redis_url, settings.data_path)
    coordinator = None
    try:  # a program's reload cost on these servers: their prefill time, measured now (a few seconds)
        profile = measure_prefill_profile(engine.prefill_seconds, (64, 256, 1024), repeats=1)
        pins = _pin_config(settings)
        coordinator = ProgramCoordinator(RadixPrefixCache(store, "vllm"), profile, AgentConfig(pins=pins))
        engine.use_admission_order(coordinator.scheduler)
    except Exception as exc:  # no server up yet: programs are served, without pins or program-level order
        log.warning("vLLM prefill not measured (%s): agent programs run without pins", exc)
    semantic = _semantic_cache(settings)
    budget, shadow = answer_checks(replace(settings, shadow_fraction=0.0), engine, semantic)
    del budget  # nothing is blended
    return Runtime(
        engine,
        settings.max_queue,
        semantic,
        coordinator,
        None,
        shadow,
        conversations=False,  # vLLM's prefix cache continues a conversation by itself
        documents=DocumentRegistry(registry),
    )


def _store_config(settings: Settings) -> StoreConfig:
    return StoreConfig(
        device_max_bytes=int(settings.device_cache_gb * GiB),
        cpu_max_bytes=int(settings.cpu_cache_gb * GiB),
        redis_url=settings.redis_url,
        redis_codec=settings.codec,
        redis_ttl_s=settings.redis_ttl_s,
        eviction=settings.eviction,
        write_backlog_bytes=int(settings.write_backlog_mb * (1 << 20)),
    )


def answer_checks(settings: Settings, engine, semantic) -> tuple[BlendBudget, ShadowChecks]:
    """The blend error budget and the shadow checks that feed it and the semantic cache's thresholds."""
    budget = BlendBudget(BlendBudgetConfig(settings.blend_epsilon, ladder=settings.ladder))
    shadow = ShadowChecks(
        engine,
        budget,
        ShadowConfig(settings.shadow_fraction, settings.semantic_shadow_fraction, settings.shadow_max_pending),
        semantic,
        _agreement(semantic),
    )
    return budget, shadow


def _agreement(semantic):
    """How a semantic shadow check compares the cached answer with the fresh one (None: no semantic cache)."""
    if semantic is None:
        return None
    from ragcache.semantic.agreement import answers_agree

    return lambda cached, fresh: answers_agree(cached, fresh, semantic.embedder).agree


def _pin_config(settings: Settings) -> PinConfig:
    return PinConfig(
        policy=settings.pin_policy,
        fixed_ttl_s=settings.pin_fixed_ttl_s,
        budget_share=settings.pin_budget_share,
        lower_budget_share=settings.pin_lower_budget_share,
        memory_weight=settings.pin_memory_weight,
    )


def _semantic_cache(settings: Settings):
    """The semantic cache: MiniLM embeddings, HNSW in memory, answers where the registry's kind says
    (Redis, shared and followed: other replicas' new entries are indexed as they are stored; SQLite
    under the data directory; or memory), the index rebuilt from them at start-up."""
    if not settings.semantic_cache:
        return None
    from ragcache.semantic import SemanticCache
    from ragcache.semantic.answers import make_answer_store
    from ragcache.semantic.answers.events import follow_replicas
    from ragcache.semantic.embedder import SentenceTransformerEmbedder

    kind = settings.registry_kind
    answers = make_answer_store(
        settings.redis_url if kind == "redis" else None,
        sqlite_path=settings.data_path / "semantic.sqlite3" if kind == "sqlite" else None,
    )
    cache = SemanticCache(SentenceTransformerEmbedder(), answers)
    if follow_replicas(cache) is False:
        log.warning("semantic cache: not yet subscribed to other replicas' entries (Redis unreachable?)")
    log.info("semantic cache ready: %d entries rebuilt (%s answers)", cache.rebuilt, answers.stats().kind)
    return cache


def serve(settings: Settings) -> None:
    """HTTP on a thread, the engine's step loop on this (main) thread: the one that loaded the model.

    Small torch ops run 1.5x slower on any other thread (see BlendEngine.run_loop). SIGTERM
    and SIGINT ask uvicorn to shut down gracefully; its lifespan closes the runtime, which
    lets running requests finish and then ends the loop here."""
    import signal

    import uvicorn

    from ragcache.service.app import create_app

    runtime = build_runtime(settings)
    runtime.engine.claim_loop()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, runtime),
            host=settings.host,
            port=settings.port,
            log_level="info",
            timeout_graceful_shutdown=30,
        )
    )
    http = threading.Thread(target=server.run, name="ragcache-http")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    log.info("serving %s on http://%s:%d", runtime.model_name, settings.host, settings.port)
    http.start()
    runtime.engine.run_loop(alive=http.is_alive)
    http.join()
    runtime.close()  # a no-op after the lifespan's; closes the store if the server died without one
    if not server.started:
        raise SettingsError(f"could not serve on {settings.host}:{settings.port} (the log above says why)")
