"""Trained seed models to MLflow: a pyfunc model in the job's run, registered, identified by digest.

- **What is logged.** An MLflow 3 pyfunc model whose one artifact is the saved model directory
  (`config.json` + `model.safetensors` from seed_core's `save_pretrained`, or a PEFT adapter
  directory). `SeedPyfuncModel` loads it with the seed_core class of its kind; the pickled
  python_model holds only the kind string, never weights, and no `mlflow.pytorch` (torch.export)
  flavour is involved (PITFALLS.md). `models:/<name>/<version>` downloads to
  `.../artifacts/<dir>/model.safetensors`, which `pipelines.models.resolve_model` finds.
- **Links.** The logged model's source run and the model version's run are the tracker's run; the
  model is a run output at the tracker's last step (MLflow then links that step's run metrics to
  it); `metrics` are logged with `model_id=` (and the evaluation dataset, when one of
  `input_datasets` has context "eval"); `input_datasets` are run inputs and version tags.
- **Identity.** Version tags `digest` (seed_core `digest`: config + weights; for a LoRA adapter a
  sha256 of its files) and `kind`. Registering a digest that `registered_name` already has
  returns that version instead of adding a duplicate, so re-running the end of a job is safe.
- **Tracking server down at the end of a job.** The export needs the server. It is retried with
  backoff (tenacity; each request bounded by `pipelines.tracking.store`) for `wait_s`; then the
  export is written to
  `<run_dir>/mlflow_pending_models.jsonl` and `ModelExportDeferred` is raised, whose message holds
  the command that registers it later: `python -m jobs.export register-pending <run_dir>`. The
  model directory must stay where it is until then (its digest is checked again).

Everything goes through the tracker's `MlflowClient`, never MLflow's process-global store:
`mlflow.pyfunc.log_model` / `Model.log` would attach the model to whatever fluent run is active and
resolve the store globally, so `_log_pyfunc` does their steps with the client (create the logged
model, link it as a run output at `step` with that step's metrics, `pyfunc.save_model` locally,
upload with `log_model_artifacts`, finalize). The model version's source is the logged model's
artifact location, with `run_id` and `model_id` given (MLflow's SQL registry would look a
`models:/<model_id>` source up through the global store); the model id is also version tag
`model_id`, since that registry does not keep it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import PythonModel
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
)

from pipelines.tracking import RunTracker, check_names, is_transient
from pipelines.tracking.fields import MAX_DIGEST, tag_key
from pipelines.tracking.store import request_timeout_s

logger = logging.getLogger(__name__)

KINDS = ("causal_qformer", "seed_tokenizer", "lora_adapter")
PENDING_FILE = "mlflow_pending_models.jsonl"
ARTIFACT_KEY = "model"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    model_uri: str
    """`models:/<name>/<version>`: what `pipelines.models.resolve_model` and the stages take."""
    model_id: str
    """The MLflow 3 logged model (`models:/<model_id>`)."""
    digest: str
    run_id: str


class ModelExportDeferred(RuntimeError):
    """The tracking server stayed unreachable: the export was recorded to be registered later."""

    def __init__(self, message: str, *, command: str, record_path: Path) -> None:
        super().__init__(message)
        self.command = command
        self.record_path = record_path


# ---- the pyfunc model
def _patch_features(model_input: Any, width: int) -> np.ndarray:
    """(B, P, Dv) float32 from an array (B, P, Dv) / (P, Dv), or from a DataFrame (or dict) column
    `patch_features` whose cells are (P, Dv) arrays or flat P*Dv lists (the features parquet)."""
    import pandas as pd

    if isinstance(model_input, (pd.DataFrame, dict)):
        columns = list(model_input.keys())
        column = "patch_features" if "patch_features" in columns else None
        if column is None and len(columns) == 1:
            column = columns[0]
        if column is None:
            raise ValueError(f"expected a 'patch_features' column, got {columns}")
        cells = model_input[column]
        x = np.stack([np.asarray(c, dtype=np.float32).reshape(-1, width) for c in cells])
    else:
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
    if x.ndim != 3 or x.shape[-1] != width:
        raise ValueError(f"patch features must be (B, P, {width}), got {x.shape}")
    return x


class SeedPyfuncModel(PythonModel):
    """Serves a seedpipe model directory (artifact "model") with the seed_core class of its kind
    (model_config["kind"]).

    - seed_tokenizer: predict(patch features) -> codes (B, Q) int64.
    - causal_qformer: predict(patch features) -> causal embeddings (B, Q, D) float32.
    - lora_adapter: an adapter is not runnable without its base LLM, which is not part of the
      model; predict ignores its input and returns the adapter's identity
      ({"kind", "digest", "adapter_config"}). Use it with
      `PeftModel.from_pretrained(base, resolve_model(uri).directory)`.
    """

    def load_context(self, context: Any) -> None:

        self.kind = context.model_config["kind"]
        directory = context.artifacts[ARTIFACT_KEY]
        self.model: Any = None
        if self.kind == "seed_tokenizer":
            from seed_core.tokenizer import SeedTokenizer

            self.model = SeedTokenizer.from_pretrained(directory).eval()
            self.width = self.model.config.qformer.encoder_hidden_size
        elif self.kind == "causal_qformer":
            from seed_core.qformer import CausalQFormer

            self.model = CausalQFormer.from_pretrained(directory).eval()
            self.width = self.model.config.encoder_hidden_size
        else:
            config = json.loads((Path(directory) / "adapter_config.json").read_text())
            self.identity = {"kind": self.kind, "digest": files_digest(directory),
                             "adapter_config": config}  # fmt: skip

    # The hint is what keeps MLflow 3 from deriving an input schema (it skips np.ndarray); a
    # DataFrame or dict with a `patch_features` column is accepted as well.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        import torch

        if self.model is None:
            return self.identity
        x = torch.from_numpy(_patch_features(model_input, self.width))
        with torch.no_grad():
            if self.kind == "seed_tokenizer":
                return self.model.encode(x).numpy()
            return self.model(x).numpy()


# "Models from code": MLflow copies this file into the model and runs it at load time, so the
# logged model holds no pickle at all (a python_model *object* would be cloudpickled).
_MODEL_CODE = """\
import mlflow

from jobs.export import SeedPyfuncModel

mlflow.models.set_model(SeedPyfuncModel())
"""


# ---- identity
def files_digest(directory: str | Path) -> str:
    """sha256 of every file under `directory` (relative path + bytes), README.md excluded (PEFT
    writes a model card there that says nothing about the weights)."""
    root = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md"):
        with open(path, "rb") as f:
            file_hash = hashlib.file_digest(f, "sha256").digest()
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + file_hash)
    return h.hexdigest()


def model_digest(kind: str, model_dir: str | Path) -> str:
    """The identity recorded with the model version (and checked again by register-pending)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model_dir = Path(model_dir)
    if kind == "lora_adapter":
        if not (model_dir / "adapter_config.json").is_file():
            raise ValueError(
                f"{model_dir} is not a PEFT adapter directory (no adapter_config.json)"
            )
        return files_digest(model_dir)
    if kind == "seed_tokenizer":
        from seed_core.tokenizer import SeedTokenizer

        return SeedTokenizer.from_pretrained(model_dir).digest
    from seed_core.qformer import CausalQFormer

    return CausalQFormer.from_pretrained(model_dir).digest


def _requirements() -> list[str]:
    # Explicit, so MLflow does not load the model in a subprocess to infer them. seedpipe itself
    # (seed_core + this module) must be installed where the pyfunc is loaded: it is not on an index.
    out = []
    for package in ("mlflow", "torch", "transformers", "safetensors", "numpy", "pandas"):
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


# ---- export
def _existing_version(client: mlflow.MlflowClient, name: str, digest: str) -> Any | None:
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.digest = '{digest}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _log_pyfunc(client: mlflow.MlflowClient, logged: LoggedModel, *, run_id: str, step: int,
                model_dir: Path, kind: str, identity: dict[str, str]) -> None:  # fmt: skip
    """`Model.log(flavor=mlflow.pyfunc, run_id=, model_id=, step=)` through `client` (see the module
    docstring): run output at `step`, that step's run metrics linked, artifacts uploaded, READY."""
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id,
               dataset_name=m.dataset_name, dataset_digest=m.dataset_digest, run_id=run_id)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
        if m.step == step and m.model_id is None
    ]  # fmt: skip
    if linked:
        client.log_batch(run_id, metrics=linked)
    with tempfile.TemporaryDirectory() as tmp:
        code, local = Path(tmp, "seed_pyfunc.py"), Path(tmp, "model")
        code.write_text(_MODEL_CODE)
        spec = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                     run_id=run_id, metadata=identity, model_id=logged.model_id)  # fmt: skip
        mlflow.pyfunc.save_model(str(local), mlflow_model=spec, python_model=str(code),
                                 model_config={"kind": kind}, artifacts={ARTIFACT_KEY: str(model_dir)},
                                 pip_requirements=_requirements(), metadata=identity)  # fmt: skip
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _export(tracker: RunTracker, model_dir: Path, *, kind: str, registered_name: str,
            digest: str, step: int, datasets: Sequence[dict], metrics: Mapping[str, float],
            ) -> ModelVersionInfo:  # fmt: skip
    client, run_id = tracker.client, tracker.run_id
    if run_id is None or not tracker.flush(timeout_s=request_timeout_s()):
        raise ConnectionError(f"{tracker.pending} tracking ops are still queued")
    existing = _existing_version(client, registered_name, digest)
    if existing is not None:
        logger.info("%s with digest %s is already version %s; not registering it again",
                    registered_name, digest[:12], existing.version)  # fmt: skip
        return ModelVersionInfo(registered_name, str(existing.version),
                                f"models:/{registered_name}/{existing.version}",
                                existing.model_id or existing.tags.get("model_id", ""), digest,
                                existing.run_id or "")  # fmt: skip
    run = client.get_run(run_id)
    identity = {"kind": kind, "digest": digest}
    logged = client.create_logged_model(
        run.info.experiment_id, name=registered_name, source_run_id=run_id,
        tags=identity, params=dict(run.data.params), model_type=kind,
    )  # fmt: skip
    _log_pyfunc(client, logged, run_id=run_id, step=step, model_dir=model_dir, kind=kind,
                identity=identity)  # fmt: skip
    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # model_id as a tag too: MLflow's SQL registry does not keep a version's model_id
    tags = identity | {"model_id": logged.model_id}
    tags |= {tag_key("input", d["name"]): d["digest"] for d in datasets}
    mv = client.create_model_version(registered_name, source=logged.artifact_location,
                                     run_id=run_id, tags=tags, model_id=logged.model_id,
                                     description=_lineage_description(tracker, run))  # fmt: skip
    if metrics:
        evals = [d for d in datasets if d.get("context") == "eval"]
        link = (
            {"dataset_name": evals[0]["name"], "dataset_digest": evals[0]["digest"][:MAX_DIGEST]}
            if len(evals) == 1
            else {}
        )
        last = {k: tracker.last_step(k) for k in metrics}
        stale = sorted(k for k, s in last.items() if s is not None and s >= step)
        if stale:  # the run's values at `step` are linked already; a second point would duplicate
            logger.warning("run %s already has %s at step %d: the model is linked to those values",
                           run_id, stale, step)  # fmt: skip
        # through the tracker so that its per-key step bookkeeping sees them
        tracker.log_metrics(metrics, step=step, model_id=logged.model_id, **link)
        tracker.flush(timeout_s=request_timeout_s())
    return ModelVersionInfo(registered_name, str(mv.version), f"models:/{registered_name}/{mv.version}",
                            logged.model_id, digest, run_id)  # fmt: skip


def _lineage_description(tracker: RunTracker, run: Any) -> str | None:
    """The version's description: its lineage in one paragraph (`jobs.lineage.describe_run`), or
    None when it cannot be worked out (a description is never worth failing an export over)."""
    try:
        from jobs.lineage import describe_run

        experiment = tracker.client.get_experiment(run.info.experiment_id).name
        return describe_run(tracker.client, tracker.tracking_uri, experiment, run.info.run_id)[
            :5000
        ]
    except Exception:  # noqa: BLE001 - see the docstring
        logger.warning(
            "no lineage description for the model of run %s", run.info.run_id, exc_info=True
        )
        return None


def _export_retrying(tracker: RunTracker, model_dir: Path, *, wait_s: float, **kwargs: Any,
                     ) -> ModelVersionInfo:  # fmt: skip
    """`_export`, retried with backoff while the failure is transient, for up to `wait_s` (a
    blocking wait is right here: the job's work is done and it is only registering the result)."""
    retrying = Retrying(
        stop=stop_before_delay(wait_s),
        wait=wait_exponential(multiplier=min(tracker.retry_interval_s, 5.0), max=30.0),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )
    return retrying(_export, tracker, model_dir, **kwargs)


def log_seed_model(tracker: RunTracker, model_dir: str | Path, *, kind: str, registered_name: str,
                   input_datasets: Sequence[dict] = (), metrics: Mapping[str, float] | None = None,
                   wait_s: float = 120.0, step: int | None = None) -> ModelVersionInfo:  # fmt: skip
    """Log `model_dir` as a pyfunc model in the tracker's run and register it as `registered_name`.

    `input_datasets`: dicts with the keys of `RunTracker.log_dataset` (`context` defaults to
    "input"; "eval" marks the dataset `metrics` were measured on). `metrics`: evaluation results,
    linked to the model. `step`: the training step the model is from (default: the tracker's last).
    Raises `ModelExportDeferred` when the server stays unreachable for `wait_s`.
    """
    model_dir = Path(model_dir).resolve()
    digest = model_digest(kind, model_dir)
    check_names(list(metrics or {}), "metric")
    datasets = [{"context": "input", **d} for d in input_datasets]
    if step is None:
        step = tracker.last_step() or 0
    for d in datasets:
        tracker.log_dataset(**d)
    export = {"kind": kind, "registered_name": registered_name, "digest": digest, "step": step,
              "datasets": datasets, "metrics": dict(metrics or {})}  # fmt: skip
    try:
        return _export_retrying(tracker, model_dir, wait_s=wait_s, **export)
    except Exception as exc:
        if not is_transient(exc):
            raise
        path = tracker.run_dir / PENDING_FILE
        with open(path, "a") as f:
            f.write(
                json.dumps({"model_dir": str(model_dir), "run_id": tracker.run_id, **export}) + "\n"
            )
        command = f"python -m jobs.export register-pending {tracker.run_dir} --tracking-uri '{tracker.tracking_uri}'"
        message = (f"MLflow at {tracker.tracking_uri} unreachable ({exc}): {registered_name} was "
                   f"not registered. {model_dir} must stay in place; register it later with:\n"
                   f"    {command}")  # fmt: skip
        logger.error(message)
        raise ModelExportDeferred(message, command=command, record_path=path) from exc


def register_pending(run_dir: str | Path, tracking_uri: str | None = None, wait_s: float = 60.0,
                     ) -> list[ModelVersionInfo]:  # fmt: skip
    """Register the exports `log_seed_model` deferred for `run_dir`; each leaves the pending file
    once registered. Raises when the server is still unreachable (the rest stays pending)."""
    run_dir = Path(run_dir)
    path = run_dir / PENDING_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done: list[ModelVersionInfo] = []
    tracker = RunTracker(run_dir=run_dir, run_name=run_dir.name, tracking_uri=tracking_uri)
    try:
        while records:
            r = dict(records[0])
            model_dir = Path(r.pop("model_dir"))
            r.pop("run_id", None)
            if model_digest(r["kind"], model_dir) != r["digest"]:
                raise ValueError(f"{model_dir} changed since the job saved it (digest differs)")
            done.append(_export_retrying(tracker, model_dir, wait_s=wait_s, **r))
            records.pop(0)
            if records:
                path.write_text("".join(json.dumps(x) + "\n" for x in records))
            else:
                path.unlink()
    finally:
        tracker.close()
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pending = sub.add_parser("register-pending", help="register the models a job could not")
    pending.add_argument("run_dir")
    pending.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    for info in register_pending(args.run_dir, args.tracking_uri):
        print(json.dumps(asdict(info)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
