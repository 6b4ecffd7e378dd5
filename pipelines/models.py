"""Model references: a local export directory or an MLflow `models:/` URI, resolved against the catalog.

- A `models:/name/version` (or `models:/name@alias`) reference resolves against the catalog's
  tracking store (`pipelines.tracking.tracking_uri`: the user's MLFLOW_TRACKING_URI, else the
  embedded `<root>/mlflow.db`), passed explicitly to MLflow: never against whatever store MLflow's
  process-global URI happens to name (its default is a `./mlflow.db` in the working folder, which
  once made a model registered in the catalog "not found" and left a stray database behind).
- Artifacts a server has to send are downloaded under `<root>/.cache/models/`; an embedded
  store's artifacts are already local and are read where they are. Nothing is written outside
  the root.
- Every seedpipe export carries `lineage.json` (`write_lineage`): the corpus and feature set it
  was trained on. It is the default feature set of the stages that apply the model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.catalog import Catalog
from pipelines.storage import is_remote, scratch_dir, uri_key

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class ModelRef:
    directory: str
    """Local directory holding config.json + model.safetensors (or a LoRA adapter)."""
    name: str
    """Dataset-folder-safe id: `<registered name>-v<version>` or `<dir name>`."""
    uri: str
    """What the user gave (kept for lineage)."""

    @property
    def lineage(self) -> dict[str, Any]:
        """The export's lineage record (corpus, features, ...); {} for a directory without one."""
        path = Path(self.directory, LINEAGE_FILE)
        return json.loads(path.read_text()) if path.is_file() else {}


def resolve_model(ref: str, catalog: Catalog) -> ModelRef:
    """A directory as is; a `models:/` URI from the catalog's MLflow registry."""
    if not ref:
        raise ValueError(
            "a model reference is required: an export directory or models:/<name>/<version>"
        )
    if ref.startswith("models:/"):
        return _from_registry(ref, catalog)
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(f"{ref}: not a model directory (no config.json) and not a models:/ URI")
    return ModelRef(directory=str(path.resolve()), name=path.resolve().name, uri=ref)


def _from_registry(ref: str, catalog: Catalog) -> ModelRef:
    """`models:/name/<version|latest>` or `models:/name@alias` through an MlflowClient bound to the
    catalog's store. Why not `download_artifacts("models:/...")` directly: in MLflow 3.17 its
    version lookup (`ModelsArtifactRepository._get_model_uri_infos`) ignores the tracking and
    registry URIs passed to it and asks the process-global store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import tracking_uri

    uri = tracking_uri(catalog)
    body = ref[len("models:/") :].strip("/")
    model, _, alias = body.partition("@")
    model, _, version = model.partition("/")
    if not model or (alias and version) or (not alias and not version) or "/" in version:
        raise ValueError(
            f"{ref}: expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
        )
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(model, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{model}'")
            if not versions:
                raise ValueError(f"{ref}: registered model {model!r} has no versions in {uri}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(model, version)
        location = client.get_model_version_download_uri(mv.name, mv.version)
    except MlflowException as err:
        from pipelines.tracking.store import auth_status, credentials_refused

        if auth_status(err) is not None:
            raise credentials_refused(uri, err, f"resolving {ref}") from None
        raise ValueError(f"{ref}: not found in the tracking store {uri} ({err.message})") from None
    name = f"{model}-v{mv.version}" if not alias else f"{model}-{alias}"
    dst = None
    if not location.startswith("file:"):
        # beside a local root; on an object-store root in this node's scratch (a cache), never
        # in a temp dir MLflow would leave behind
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        dst = (
            scratch_dir("models") / uri_key(uri) / safe
            if is_remote(catalog.root_uri)
            else Path(catalog.base, ".cache", "models", safe)
        )
        shutil.rmtree(dst, ignore_errors=True)  # a fresh copy: the alias may point elsewhere now
    directory = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri,
                                                    dst_path=str(dst) if dst else None)  # fmt: skip
    # A pyfunc model keeps the saved directory under artifacts/<name>: a LoRA export (adapter
    # config) wins over the tiny base model it may carry; else the seed_core model directory.
    root = Path(directory)
    found = sorted(p.parent for p in root.rglob("adapter_config.json")) or sorted(
        p.parent for p in root.rglob("model.safetensors")
    )
    if not found:
        raise ValueError(
            f"{ref} holds neither a LoRA adapter nor a model.safetensors (not a seedpipe model)"
        )
    return ModelRef(directory=str(min(found, key=lambda p: len(p.parts))), name=name, uri=ref)


def write_lineage(directory: str | Path, **record: Any) -> Path:
    """Write an export's `lineage.json` (what it was trained on)."""
    path = Path(directory, LINEAGE_FILE)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def default_feature_set(ref: ModelRef, catalog: Catalog, corpus: str) -> str:
    """The feature set `ref` was trained on (its lineage), else the corpus's only one; an error
    listing the candidates when neither decides."""
    from pipelines.datasets import list_datasets, only_dataset

    trained_on = ref.lineage.get("features", "")
    if trained_on:
        available = list_datasets(catalog, corpus, "features")
        if trained_on not in available:
            raise ValueError(
                f"{ref.uri} was trained on feature set {trained_on!r}, which corpus {corpus!r} does not "
                f"have (available feature sets: {', '.join(available) or 'none'}); make it with "
                f"`seedpipe features --corpus {corpus}` or pass --features"
            )
        return trained_on
    return only_dataset(catalog, corpus, "features", "features")
