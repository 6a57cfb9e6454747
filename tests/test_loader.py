"""Model loading: clear errors for missing or unsupported models."""

import pytest
from transformers import GPT2Config, LlamaConfig

from ragcache.engine.errors import ModelLoadError, UnsupportedModelError
from ragcache.engine.loader import ModelSpec, check_supported, load_model


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(str(tmp_path / "nope")))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(str(tmp_path)))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(ModelSpec(str(path)))


def test_unsupported_architecture_is_refused():
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        check_supported(GPT2Config())


def test_unsupported_rope_type_is_refused():
    config = LlamaConfig(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64})
    with pytest.raises(UnsupportedModelError, match="rope type 'longrope'"):
        check_supported(config)


def test_bad_spec_values():
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="int8")
    with pytest.raises(ValueError, match="device"):
        ModelSpec(device="tpu")
