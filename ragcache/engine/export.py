"""A model as a safetensors folder that vLLM can serve: `ragcache export-model DIR [--model SRC]`.

vLLM loads safetensors folders, not the GGUF file the default model ships as. transformers
dequantises a GGUF to float32 when it loads one, but a model loaded that way refuses
`save_pretrained`; so the weights are copied into a fresh model built from the same config,
and that model is saved (its config without the GGUF's quantization entry), beside the tokenizer (its chat template included). The folder then
holds exactly the weights ragcache's own engine runs, so both engines answer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragcache.engine.errors import ModelLoadError
from ragcache.engine.loader import ModelSpec, load_model


@dataclass(frozen=True)
class ExportedModel:
    folder: Path
    name: str  # the source's name (the GGUF file's stem, or the source folder's)
    num_parameters: int
    num_bytes: int  # of the .safetensors files written


def export_model(folder: str | Path, source: str | None = None, dtype: str = "float32") -> ExportedModel:
    """Write source (None: the default model) to folder as config.json + *.safetensors + tokenizer files.

    folder must not exist or be empty: an export never overwrites files."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{str(out)!r} exists and is not an empty folder; give a new folder to export into")
    loaded = load_model(ModelSpec(path=source, dtype=dtype))
    model = loaded.model
    # the weights are plain tensors now: the GGUF's quantization_config would tell vLLM otherwise
    settings = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    fresh = type(model)(type(model.config).from_dict(settings))
    fresh.load_state_dict(model.state_dict())
    fresh = fresh.to(loaded.dtype).eval()  # type: ignore[arg-type]  # functools.wraps hides the bound self (loader.py)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    written = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    return ExportedModel(out, loaded.name, sum(p.numel() for p in fresh.parameters()), written)
