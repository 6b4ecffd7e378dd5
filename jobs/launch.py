"""The driver side of every training job: config -> prepare -> TorchTrainer.fit() -> report.

    main(argv) -> parse_command(job.config_cls) -> job.prepare(config) -> launch(job, config, prepared)

Re-launching with the same run name and storage resumes the run (Ray Train V2 restores from the
latest checkpoint in `<storage>/<name>`); the MLflow run id is kept in the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from jobs.config import CONFIG_DIR, TrainJobConfig
from jobs.job import Job, Prepared, RunContext, WorkerSpec, run_location
from pipelines import config as cfg


def job_main(job: Job[Any, Any], argv: Sequence[str] | None, *, prog: str, description: str) -> int:
    """The whole CLI of a training job: parse, prepare, print the plan, (unless --dry-run) launch."""
    config = job.resolve(
        cfg.parse_command(
            job.config_cls, argv, prog=prog, description=description, config_dirs=[CONFIG_DIR]
        )
    )
    name, storage = run_location(config, job.name)
    if config.dry_run:
        # prepare writes run-folder files (a caption-trained tokenizer, a tiny base LLM): a dry run
        # prepares into a scratch folder, so it checks every input and leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="seedpipe-dry-run-") as scratch:
            scratch_run = dataclasses.replace(config.run, storage_path=scratch)
            _print_plan(
                job, name, storage, job.prepare(dataclasses.replace(config, run=scratch_run))
            )
        print(cfg.to_yaml(config), end="", flush=True)
        print(f"{job.name}: dry run, nothing launched", flush=True)
        return 0
    from jobs import scheduling

    scheduling.preflight(config)  # before prepare's work: a job the cluster cannot hold fails now
    prepared = job.prepare(config)
    _print_plan(job, name, storage, prepared)
    import ray.train

    try:
        result = launch(job, config, prepared)
    except ray.train.TrainingFailedError as err:
        # Out of run.max_failures: the last checkpoint stays, and the same command resumes from it
        # (on another scaling.num_workers too). One summary line after Ray's own error report.
        print(f"{job.name}: training failed ({type(err).__name__}); relaunch the same command "
              f"(run {name}) to resume from its last checkpoint", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    return 0 if result.error is None else 1


def _print_plan(job: Job[Any, Any], name: str, storage: str, prepared: Prepared[Any]) -> None:
    rows = sum(d.rows or 0 for d in prepared.input_datasets if d.context == "training")
    print(f"{job.name}: run {name} in {storage}; {len(prepared.train_files)} training files, "
          f"{rows} rows; inputs: " + ", ".join(f"{d.name}@{d.digest[:12]}" for d in prepared.input_datasets),
          flush=True)  # fmt: skip


def launch(job: Job[Any, Any], config: TrainJobConfig, prepared: Prepared[Any]) -> Any:
    """Run the job on Ray Train; returns the ray.train.Result."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs import scheduling
    from jobs.deepspeed_ops import configure_environment
    from jobs.trainer import global_batch
    from pipelines.catalog import Catalog
    from pipelines.cli_common import ensure_ray
    from pipelines.tracking import code_version, sync_pending, tracking_uri

    name, storage = run_location(config, job.name)
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, rank_rows=rank_rows(config, prepared.train_files)))  # fmt: skip
    context = RunContext(run_name=name, storage_path=storage, tracking_uri=tracking_uri(Catalog(config.root)),
                         code_version=code_version(), resolved_yaml=cfg.to_yaml(config))  # fmt: skip
    sync_pending(config.root)  # stage runs an MLflow outage left queued (bounded, never raises)
    context.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_config(config, context.run_dir / "config.yaml")
    context.folder.push("config.yaml")
    env = configure_environment()
    ensure_ray(config.address)
    spec = WorkerSpec(job=job, config=config, inputs=prepared.inputs, context=context,
                      input_datasets=prepared.input_datasets)  # fmt: skip
    # zero-CPU read tasks: the workers may hold every CPU (jobs.scheduling.training_rows)
    dataset = scheduling.training_rows(config, prepared.train_files)
    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(
            backend="nccl" if scaling.use_gpu else "gloo", timeout_s=config.run.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            # [min, max]: an elastic group; a restart at any size resumes (jobs.elastic)
            num_workers=tuple(scaling.num_workers)
            if isinstance(scaling.num_workers, list)
            else scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scheduling.worker_bundle(scaling),
            placement_strategy=scaling.placement_strategy,
        ),  # fmt: skip
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=config.run.max_failures,
                controller_failure_limit=scheduling.controller_failure_limit(scaling),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),  # fmt: skip
        datasets={"train": dataset},
        # global_shuffle: every rank gets the whole training set and takes its slice of each
        # epoch's permutation itself (jobs.trainer._epoch_batches)
        dataset_config=DataConfig(
            datasets_to_split=[] if config.run.rank_rows == "global_shuffle" else "all",
            execution_options=ExecutionOptions(preserve_order=True),
        ),
    )
    print(
        f"{job.name}: {_workers(scaling.num_workers)} workers ({'GPU' if scaling.use_gpu else 'CPU'}), "
        f"global batch {global_batch(config)}, rows per rank: {config.run.rank_rows}",
        flush=True,
    )
    with scheduling.bounded_start(scaling):  # no silent wait for the workers' resources
        result = trainer.fit()
    from jobs.trainer import REGISTERED_FILE

    if registered := context.folder.read_text(REGISTERED_FILE):
        info = json.loads(registered)
        print(f"{job.name}: registered {info['uri']}" if "uri" in info else f"{job.name}: {info['deferred']}",
              flush=True)  # fmt: skip
    return result


def rank_rows(config: TrainJobConfig, train_files: Sequence[str]) -> str:
    """`run.rank_rows` resolved: `auto` is `global_shuffle` when the training files' uncompressed
    size (what each rank's epoch cache would hold, before the held-out rows are dropped) fits in
    `run.epoch_cache_mb`, else `streaming_split`.

    Why the size decides: under `global_shuffle` every rank reads and keeps the whole training set
    (world x the reads of a split), which buys a model that depends only on the config and the
    data; past the cache's bound it would not fit, and a split reads each row once."""
    if config.run.rank_rows != "auto":
        return config.run.rank_rows
    bound = config.run.epoch_cache_mb << 20
    size = parquet_bytes(train_files, stop_above=bound)
    return "global_shuffle" if 0 < size <= bound else "streaming_split"


def parquet_bytes(files: Sequence[str], *, stop_above: int | None = None) -> int:
    """Uncompressed size of parquet files from their footers (no data read); local paths or URIs.
    `stop_above`: return as soon as the sum passes it (a CC3M-sized corpus has thousands of
    footers on object storage, and past the bound the exact size does not matter)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        fs, local = pafs.FileSystem.from_uri(path) if "://" in path else (None, path)
        meta = pq.read_metadata(local, filesystem=fs)
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if stop_above is not None and total > stop_above:
            break
    return total


def _workers(num_workers: int | list[int]) -> str:
    return (
        f"{num_workers[0]}-{num_workers[1]}" if isinstance(num_workers, list) else str(num_workers)
    )


def _entry(loop_config: dict[str, WorkerSpec[Any, Any]]) -> None:
    from jobs.trainer import train_loop_per_worker

    train_loop_per_worker(loop_config["spec"])
