"""Model names resolve without a network; bad names and bad files say what is wrong."""

from __future__ import annotations

import pytest
import torch

from sluice.loaders.gguf import GGUFError
from sluice.loaders.model_path import ModelNotFoundError, resolve_model
from sluice.models.registry import load_model


def test_default_alias_is_the_packaged_gguf(default_gguf):
    assert resolve_model() == default_gguf == resolve_model("SmolLM2-135M-Instruct")
    assert default_gguf.suffix == ".gguf" and default_gguf.stat().st_size > 50_000_000


def test_unknown_model_name_is_named_in_the_error():
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_model("no-such-model")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00" + b"\xff" * 64]
)
def test_corrupt_gguf_names_the_file(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=r"broken\.gguf"):
        load_model(resolve_model(path), torch.device("cpu"), torch.float32)


def test_truncated_gguf_names_the_file(tmp_path, default_gguf):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(default_gguf.read_bytes()[:5_000_000])
    with pytest.raises(GGUFError, match=r"truncated\.gguf"):
        load_model(path, torch.device("cpu"), torch.float32)
