"""Resolve a model reference (local directory or MLflow `models:/` URI) to a local directory + identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelRef:
    directory: str
    """Local directory holding config.json + model.safetensors."""
    name: str
    """Dataset-folder-safe id: `<registered name>-v<version>` or `<dir name>`; suffixed with the digest."""
    uri: str
    """What the user gave (kept for lineage)."""


def resolve_model(ref: str) -> ModelRef:
    """A directory as is; `models:/name/version` (or an alias) downloaded from the MLflow registry."""
    if ref.startswith("models:/"):
        import mlflow

        directory = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        # a pyfunc model keeps the saved directory under artifacts/<name>: a LoRA export (adapter
        # config) wins over the tiny base model it may carry; else the seed_core model directory
        root = Path(directory)
        found = sorted(p.parent for p in root.rglob("adapter_config.json")) or sorted(
            p.parent for p in root.rglob("model.safetensors")
        )
        if not found:
            raise ValueError(
                f"{ref} holds neither a LoRA adapter nor a model.safetensors (not a seedpipe model)"
            )
        found = [min(found, key=lambda p: len(p.parts))]
        parts = ref[len("models:/") :].strip("/").split("/")
        name = "-v".join(parts) if len(parts) == 2 else parts[0]
        return ModelRef(directory=str(found[0]), name=name.replace("@", "-"), uri=ref)
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{ref}: not a model directory (no config.json) and not a models:/ URI")
    return ModelRef(directory=str(path.resolve()), name=path.resolve().name, uri=ref)
