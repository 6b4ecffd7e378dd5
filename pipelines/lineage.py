"""MLflow glue: one run per stage execution, its config as params, its datasets with digests.

- Tracking store: `MLFLOW_TRACKING_URI` if set, else the embedded `sqlite:///<root>/mlflow.db`
  with artifacts in `<root>/mlartifacts` (nothing to start). `seedpipe ui` opens it.
- A dataset (raw corpus, features, qembeds, tokens) is logged with `mlflow.log_input` as a
  `MetaDataset(source=<its URI>, name=<corpus/stage/name>, digest=<dataset digest>)`, with
  context `input` or `output`; the output digests are also run tags so that
  `seedpipe lineage` can walk from a dataset digest to the run that made it.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from pipelines.catalog import Catalog

EXPERIMENT = "seedpipe"


# MLflow 3 exports MLFLOW_TRACKING_URI itself on set_tracking_uri, so the variable alone cannot tell
# a user's server from the embedded store we selected earlier in this process (another root).
_EMBEDDED_URIS: set[str] = set()


def tracking_uri(catalog: Catalog) -> str:
    """MLFLOW_TRACKING_URI set by the user, or the embedded SQLite store beside the catalog (local roots)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _EMBEDDED_URIS:
        return uri
    if "://" in catalog.root_uri:
        raise ValueError(
            f"root {catalog.root_uri} is not a local path: set MLFLOW_TRACKING_URI to a tracking server"
        )
    Path(catalog.base).mkdir(parents=True, exist_ok=True)
    embedded = f"sqlite:///{catalog.base}/mlflow.db"
    _EMBEDDED_URIS.add(embedded)
    return embedded


def configure(catalog: Catalog, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the catalog's store and select (creating if needed) the experiment."""
    uri = tracking_uri(catalog)
    embedded = uri in _EMBEDDED_URIS
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = Path(catalog.base, "mlartifacts").as_uri() if embedded else None
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return uri


def code_version() -> str:
    """git commit of the checkout (with +dirty), else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return version("seedpipe")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class StageRun:
    """The active MLflow run of one stage execution."""

    def __init__(self, run: mlflow.ActiveRun) -> None:
        self.run = run
        self.run_id = run.info.run_id

    def log_dataset(
        self, *, name: str, digest: str, uri: str, context: str, rows: int | None = None
    ) -> None:
        """A dataset this run read (`input`) or wrote (`output`), identified by its content digest."""
        with warnings.catch_warnings():  # file:// matches two equivalent local source classes
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])
        tags = {"digest": digest} | ({"rows": str(rows)} if rows is not None else {})
        mlflow.log_input(dataset, context=context, tags=tags)
        mlflow.set_tag(f"{context}.{re.sub(r'[^A-Za-z0-9_./: -]', '_', name)}", digest)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        mlflow.log_dict(data, artifact_file)


@contextmanager
def stage_run(catalog: Catalog, *, stage: str, corpus: str, config: Mapping[str, Any],
              run_name: str | None = None) -> Iterator[StageRun]:  # fmt: skip
    """Start an MLflow run tagged with stage, corpus and code version, config logged as params."""
    configure(catalog)
    tags = {
        "stage": stage,
        "corpus": corpus,
        "code_version": code_version(),
        "root": catalog.root_uri,
    }
    with mlflow.start_run(run_name=run_name or f"{stage}:{corpus}", tags=tags) as run:
        mlflow.log_params(flatten(config))
        mlflow.log_dict(dict(config), "config.json")
        yield StageRun(run)
