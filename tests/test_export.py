"""`ragcache export-model`: the default model as a safetensors folder (what vLLM serves), the same weights."""

from __future__ import annotations

import pytest
import torch

from ragcache.cli import main
from ragcache.engine.loader import ModelSpec, load_model

pytestmark = pytest.mark.real_model


def test_the_exported_folder_loads_as_the_same_model(real_model, tmp_path, capsys):
    folder = tmp_path / "smollm2"
    assert main(["export-model", str(folder)]) == 0
    assert "134.5 M parameters" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    exported = load_model(ModelSpec(path=str(folder)))
    ids = real_model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    assert exported.tokenizer(real_model.tokenizer.decode(ids[0]), add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(exported.model(ids).logits, real_model.model(ids).logits)


def test_export_never_overwrites(tmp_path, capsys):
    (tmp_path / "taken.txt").write_text("keep me")
    assert main(["export-model", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken.txt").read_text() == "keep me"
