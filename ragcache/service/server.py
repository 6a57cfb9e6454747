"""`ragcache serve`: build the runtime from settings and run the app under uvicorn."""

from __future__ import annotations

import logging

from ragcache.config import Settings
from ragcache.engine.blend import BlendConfig
from ragcache.engine.loader import ModelSpec, load_model
from ragcache.engine.prompt import PromptLimits
from ragcache.engine.runner import BlendEngine, EngineConfig
from ragcache.service.runtime import Runtime
from ragcache.storage.factory import GiB, StoreConfig, make_store

log = logging.getLogger("ragcache.service")


def build_runtime(settings: Settings) -> Runtime:
    """Load the model (once per process) and wire engine, store and runtime as settings say."""
    loaded = load_model(ModelSpec(settings.model, settings.device, settings.dtype))
    store = make_store(
        StoreConfig(
            device_max_bytes=int(settings.device_cache_gb * GiB),
            cpu_max_bytes=int(settings.cpu_cache_gb * GiB),
            redis_url=settings.redis_url,
            redis_codec=settings.codec,
            eviction=settings.eviction,
        ),
        settings.device,
        loaded.fingerprint,
    )
    store.start_sweeper()
    config = EngineConfig(
        blend=BlendConfig(settings.check_layer, settings.deviation),
        default_ratio=settings.blend_ratio,
        limits=PromptLimits(settings.max_documents, settings.max_document_tokens,
                            loaded.model.config.max_position_embeddings),
    )
    return Runtime(BlendEngine(loaded, store, config), settings.max_queue, loaded.name)


def serve(settings: Settings) -> None:
    import uvicorn

    from ragcache.service.app import create_app

    runtime = build_runtime(settings)
    log.info("serving %s on http://%s:%d", runtime.model_name, settings.host, settings.port)
    uvicorn.run(create_app(settings, runtime), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=30)
