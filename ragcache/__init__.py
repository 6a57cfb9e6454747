"""ragcache: KV-cache middleware that makes long RAG and agent prompts cheap.

The request path, one package each:
    semantic cache -> chunk lookup (ragcache.storage) -> blend (ragcache.engine) -> generate -> store.
Importing the package is light: torch and transformers load only with the engine.
"""

__version__ = "0.1.0"
