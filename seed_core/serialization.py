"""Config (de)serialisation, safetensors save/load and content digests for seed_core modules.

Configs are nested keyword-only dataclasses; they travel as plain JSON. `config_from_dict`
rebuilds them recursively and rejects unknown keys by name. This is written here (30 lines)
rather than taken from a config library because seed_core stays importable with torch,
transformers and peft alone; the jobs layer uses OmegaConf for YAML + CLI merging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict[str, Any], *, path: str = "") -> T:
    """Rebuild dataclass `cls` from `data`; unknown keys raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(
            f"config {path or cls.__name__}: expected a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value, path=path)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value, path=path)  # type: ignore[arg-type]
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def save_pretrained_module(
    module: nn.Module, config: Any, directory: str | Path, *, kind: str
) -> Path:
    """Write `config.json` (with `kind`) and `model.safetensors` into `directory`; no pickles."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"kind": kind, "config": config_to_dict(config)}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
    # Contiguous copies: under DeepSpeed ZeRO the parameters are views into flat buffers, which
    # safetensors refuses to save as they are. (seed_core modules tie no weights.)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def read_pretrained_config(directory: str | Path, *, kind: str) -> dict[str, Any]:
    """The config dict saved by `save_pretrained_module`, checking that it is of `kind`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a saved seed_core model directory")
    payload = json.loads(path.read_text())
    if payload.get("kind") != kind:
        raise ValueError(f"{directory} holds a {payload.get('kind')!r}, expected a {kind!r}")
    return payload["config"]


def load_pretrained_weights(module: nn.Module, directory: str | Path) -> nn.Module:
    """Load `model.safetensors` into `module` strictly (every key must match)."""
    missing, unexpected = module.load_state_dict(
        load_file(str(Path(directory) / WEIGHTS_FILE)), strict=False
    )
    if missing or unexpected:
        raise ValueError(
            f"weights in {directory} do not match the architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return module


def module_digest(module: nn.Module, config: Any) -> str:
    """sha256 of the canonical config JSON and every tensor of the state dict (name, dtype, shape, bytes).

    Identifies a model version everywhere else (token datasets, MLflow); independent of where or
    when it was saved.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config_to_dict(config), sort_keys=True).encode())
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()
