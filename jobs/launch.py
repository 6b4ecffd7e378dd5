"""The driver side of every training job: resolve config and data, start the TorchTrainer, report.

    job main(argv) -> load_config -> job.prepare(config) -> launch(...) -> TorchTrainer.fit()

Re-launching with the same run name and storage resumes the run (Ray Train V2 restores from the
latest checkpoint in `<storage>/<name>`); the MLflow run id is kept in the same folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import config as cfg


@dataclass
class Prepared:
    """What a job's `prepare` found on the driver."""

    train_files: list[str]
    """Parquet files of the training dataset (committed catalog shards)."""
    input_datasets: list[dict[str, Any]] = field(default_factory=list)
    """Lineage: dicts for RunTracker.log_dataset (name, digest, uri, context, rows)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra keys merged into the worker's job dict (e.g. a text-tokenizer path)."""
    holdout_fraction: float = 0.0
    """Rows whose key hashes into this fraction are kept out of training (the eval split)."""


def is_holdout(keys: Any, fraction: float) -> Any:
    """Deterministic held-out split by key (md5, not Python's salted hash): a boolean numpy array."""
    import hashlib

    import numpy as np

    cut = int(fraction * 10_000)
    return np.array(
        [int(hashlib.md5(str(k).encode()).hexdigest()[:8], 16) % 10_000 < cut for k in keys],
        dtype=bool,
    )


def drop_holdout(batch: Any, fraction: float) -> Any:
    """Ray Data map: keep the training split of an Arrow batch."""
    import pyarrow as pa

    keep = ~is_holdout(batch.column("key").to_pylist(), fraction)
    return batch.filter(pa.array(keep))


def run_paths(config: Any, job_name: str) -> tuple[str, str, Path]:
    """(run name, storage path, run dir) with the defaults <job>-<corpus> and <root>/runs."""
    name = config.run.name or f"{job_name}-{config.corpus}"
    storage = config.run.storage_path or str(Path(config.root, "runs").resolve())
    return name, storage, Path(storage, name)


def launch(config: Any, *, job_name: str, job_module: str, export_kind: str, prepared: Prepared,
           address: str | None = None) -> Any:  # fmt: skip
    """Run the job on Ray Train; returns the ray.train.Result."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.deepspeed_ops import configure_environment
    from pipelines.catalog import Catalog
    from pipelines.cli_common import ensure_ray
    from pipelines.lineage import code_version, flatten, tracking_uri

    name, storage, run_dir = run_paths(config, job_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_config(config, run_dir / "config.yaml")
    env = configure_environment()
    ensure_ray(address)
    job = cfg.to_dict(config) | prepared.extra | {
        "_job_module": job_module, "_job_name": job_name, "_export_kind": export_kind, "_run_dir": str(run_dir),
        "_tracking_uri": tracking_uri(Catalog(config.root)), "_code_version": code_version(),
        "_params": flatten(cfg.to_dict(config)), "_resolved_yaml": cfg.to_yaml(config),
        "_input_datasets": prepared.input_datasets,
    }  # fmt: skip
    job["run"]["name"] = name
    from ray.data import ExecutionOptions

    dataset = ray.data.read_parquet(prepared.train_files)
    if prepared.holdout_fraction > 0:
        dataset = dataset.map_batches(
            drop_holdout, batch_format="pyarrow", fn_kwargs={"fraction": prepared.holdout_fraction}
        )
    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config=job,
        torch_config=TorchConfig(
            backend="nccl" if scaling.use_gpu else "gloo", timeout_s=config.run.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker}
            | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {}),
        ),  # fmt: skip
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),  # fmt: skip
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    print(f"{job_name}: run {name} in {storage} ({scaling.num_workers} workers, "
          f"{'GPU' if scaling.use_gpu else 'CPU'}), {len(prepared.train_files)} training files", flush=True)  # fmt: skip
    result = trainer.fit()
    registered = run_dir / "registered_model.json"
    if registered.exists():
        info = json.loads(registered.read_text())
        print(
            f"{job_name}: registered {info['uri']}"
            if "uri" in info
            else f"{job_name}: {info['deferred']}",
            flush=True,
        )
    return result


def _entry(job: dict[str, Any]) -> None:
    from jobs.trainer import train_loop_per_worker

    train_loop_per_worker(job)
