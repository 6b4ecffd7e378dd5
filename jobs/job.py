"""The typed boundary between a job's driver and its Ray Train workers.

    driver:  config = parse_command(Job.config_cls, argv)  ->  prepared = job.prepare(config)
             -> jobs.launch.launch(job, config, prepared)   (TorchTrainer, train_loop_config={"spec": spec})
    workers: spec: WorkerSpec  ->  parts = job.build(config, inputs, ctx)  ->  jobs.trainer's loop

A job is a small object: its config class, `prepare` (driver: find the committed datasets, resolve
models, write run-folder files such as a caption-trained tokenizer) returning `Prepared[Inputs]`,
and `build` (every worker: the task, the Arrow collate, eval, export) returning `JobParts`. What a
worker receives is one typed `WorkerSpec` (Ray pickles it): the validated config object itself, the
job's own `Inputs` dataclass and the `RunContext`, so a typo is an AttributeError a type checker
sees, not a KeyError on a worker minutes into a cluster job, and nothing is rebuilt from dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from torch import nn

from jobs.config import TrainJobConfig
from pipelines.datasets import DatasetRef
from pipelines.storage import RunFolder, is_remote, join_uri

C = TypeVar("C", bound=TrainJobConfig)
I = TypeVar("I")  # noqa: E741 - the job's Inputs type


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Where a run lives and what it logs to; the same on every rank but `rank` / `world`."""

    run_name: str
    """Ray Train run name (`<job>-<corpus>` unless run.name): re-launching it resumes."""
    storage_path: str
    """Ray Train storage (`<root>/runs` unless run.storage_path)."""
    tracking_uri: str
    """The catalog's MLflow store (embedded SQLite) or the user's MLFLOW_TRACKING_URI."""
    code_version: str
    resolved_yaml: str
    """The resolved config, written into every checkpoint."""
    rank: int = 0
    world: int = 1

    @property
    def folder(self) -> RunFolder:
        """The run folder on the root's storage (`pipelines.storage.RunFolder`), one per process."""
        uri = join_uri(self.storage_path, self.run_name)
        if uri not in _FOLDERS:
            _FOLDERS[uri] = RunFolder(uri)
        return _FOLDERS[uri]

    @property
    def run_dir(self) -> Path:
        """This node's copy of the run folder: the folder itself on a local root; on an object
        store, its mirror, whose files reach the store through `folder.push`."""
        return self.folder.local

    def on_rank(self, rank: int, world: int) -> RunContext:
        return dataclasses.replace(self, rank=rank, world=world)


@dataclass(kw_only=True)
class Prepared(Generic[I]):
    """What a job's `prepare` found on the driver."""

    train_files: list[str]
    """Parquet files of the training dataset (committed catalog shards)."""
    inputs: I
    """The job's own typed inputs for its workers (paths, shapes, resolved model directories)."""
    input_datasets: list[DatasetRef] = field(default_factory=list)
    """Lineage: every dataset and model the run reads, logged with its digest."""


@dataclass
class JobParts:
    """What a job hands the training loop, built on every worker."""

    task: nn.Module
    """forward(batch) -> seed_core.tasks.TaskOutput."""
    collate: Any
    """A ray.data.collate_fn.ArrowBatchCollateFn: Arrow batch -> dict of tensors."""
    export: Callable[[nn.Module, Path], None]
    """Saves the trained model (from the unwrapped task) into a directory (rank 0)."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    """Held-out metrics; called on every rank (ZeRO-3 needs all ranks in the forward)."""
    on_step: Callable[[Any, Any, int], dict[str, float]] | None = None
    """Optional per-step hook `(engine, task output, step) -> metrics`, called on every rank after
    the optimizer step (e.g. codebook-usage accounting, dead-code re-seeding)."""
    final_artifacts: Callable[[nn.Module, Path], list[Path]] | None = None
    """Plots etc. written at the end (rank 0)."""
    stateful: dict[str, Any] = field(default_factory=dict)
    """Job state outside the model and optimizer, by name: objects with `state_dict()` (JSON-able,
    the same on every rank) and `load_state_dict()`; saved in every checkpoint, restored on resume."""


class Job(Generic[C, I]):
    """A training job: subclasses set the class attributes and implement `prepare` and `build`."""

    name: ClassVar[str]
    """Short name: default run name prefix and the MLflow `job` tag (stage1, stage2, lora)."""
    config_cls: ClassVar[type]
    export_kind: ClassVar[str]
    """How jobs.export logs the model (causal_qformer, seed_tokenizer, lora_adapter)."""

    def resolve(self, config: C) -> C:
        """Fill the defaults that depend on the catalog (e.g. which dataset); the result is what
        is saved and logged as the run's config. Identity unless a job needs it."""
        return config

    def prepare(self, config: C) -> Prepared[I]:
        raise NotImplementedError

    def build(self, config: C, inputs: I, ctx: RunContext) -> JobParts:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class WorkerSpec(Generic[C, I]):
    """Everything a worker receives: `train_loop_config={"spec": WorkerSpec}`."""

    job: Job[C, I]
    config: C
    inputs: I
    context: RunContext
    input_datasets: list[DatasetRef]


def run_location(config: TrainJobConfig, job_name: str) -> tuple[str, str]:
    """(run name, storage path): `<job>-<corpus>` under `<root>/runs` unless the config says. The
    storage is a store URI on an object-store root (Ray Train's checkpoints go there too), an
    absolute path otherwise."""
    name = config.run.name or f"{job_name}-{config.corpus}"
    storage = config.run.storage_path or join_uri(config.root, "runs")
    return name, storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def run_folder(config: TrainJobConfig, job_name: str) -> RunFolder:
    """`<storage>/<run name>`: the run folder (config, metrics.jsonl, MLflow run id, export)."""
    name, storage = run_location(config, job_name)
    return RunFolder(join_uri(storage, name))


_FOLDERS: dict[str, RunFolder] = {}
