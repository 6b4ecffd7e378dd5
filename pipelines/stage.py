"""The shard-stage runner shared by features, qembeds and tokens.

    plan (catalog) -> print plan -> [dry run stops] -> Ray Data: one task row per shard ->
    map_batches(<Stage>ShardWorker, concurrency=N, num_gpus=G) -> summaries -> table + MLflow

Why the unit of Ray Data parallelism is the *shard* (not the image row): each derived shard must
be written whole, renamed into place and committed with its completion record, by the worker
that made it. Row-level streaming would scatter a shard's rows over many blocks and workers and
need a shuffle (or a driver-side writer) to regroup them. With one task per shard, the worker
actor loads its models once (`__init__`), streams the shard through them in mini-batches with
decoding on a thread pool, writes parquet from the worker (no driver bottleneck), and commits;
a killed run loses only the shards in flight, and Ray Data's actor pool, retries and
backpressure come for free. The worker classes are plain callables, testable without Ray.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.catalog import (
    Catalog,
    DoneRecord,
    Plan,
    dataset_digest,
    derived_shard_digest,
    plan_shards,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Resources:
    """Ray resources of a stage (never part of its config digest: they do not change outputs)."""

    num_workers: int = 1
    """Actors in the pool (concurrency)."""
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    batch_size: int = 32
    """Images (rows) per model forward."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_gpus_per_worker < 0 or self.num_cpus_per_worker <= 0:
            raise ValueError("num_gpus_per_worker must be >= 0 and num_cpus_per_worker > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class ShardTask:
    """One shard to build: everything a worker needs, as plain JSON-able values."""

    shard: str
    input_dir: str
    input_files: list[str]
    input_digest: str
    input_rows: int
    output_dir: str
    config_digest: str
    model_digest: str


@dataclass
class StageResult:
    stage: str
    plan: Plan
    output_dir: str
    rows_in: int = 0
    rows_out: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failed_shards: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dataset_digest: str = ""

    def __post_init__(self) -> None:
        # An input shard the plan could not trust (catalog.scan) is a shard this run failed to build.
        blocked = {sid: f"input not usable: {why}" for sid, why in self.plan.blocked.items()}
        self.failed_shards = blocked | self.failed_shards

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    def table(self) -> str:
        rate = self.rows_out / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.stage} summary",
            f"  shards built     {len(self.plan.to_build) - len(self.failed_shards.keys() - self.plan.blocked.keys())} / {len(self.plan.to_build)}",
            f"  rows in / out    {self.rows_in} / {self.rows_out}",
            f"  images/s         {rate:.1f}",
            f"  wall time        {self.seconds:.1f} s",
        ]
        lines += [f"  skipped: {cause:<14s} {n}" for cause, n in sorted(self.failures.items())]
        lines += [f"  FAILED shard {sid}: {why}" for sid, why in sorted(self.failed_shards.items())]
        return "\n".join(lines)


def plan_stage(catalog: Catalog, *, input_dir: str, output_dir: str, config_digest: str, model_digest: str,
               input_shards: Mapping[str, DoneRecord] | None = None) -> tuple[Plan, list[ShardTask]]:  # fmt: skip
    """Plan a derived stage from its input dataset's committed shards."""
    scanned = catalog.scan(input_dir) if input_shards is None else None
    inputs = dict(input_shards) if scanned is None else scanned.records
    wanted = {
        sid: derived_shard_digest(r.digest, config_digest, model_digest)
        for sid, r in inputs.items()
    }
    # Damaged outputs are rebuilt; damaged inputs are reported and fail their shard (StageResult).
    outputs = catalog.scan(output_dir)
    plan = plan_shards(wanted, outputs.records, damaged=outputs.problems,
                       blocked=scanned.problems if scanned else None)  # fmt: skip
    tasks = [
        ShardTask(
            shard=sid,
            input_dir=input_dir,
            input_files=inputs[sid].files,
            input_digest=inputs[sid].digest,
            input_rows=inputs[sid].rows,
            output_dir=output_dir,
            config_digest=config_digest,
            model_digest=model_digest,
        )  # fmt: skip
        for sid in plan.to_build
    ]
    return plan, tasks


def execute(catalog: Catalog, *, stage: str, plan: Plan, tasks: list[ShardTask], worker_cls: type,
            worker_kwargs: dict[str, Any], resources: Resources, output_dir: str,
            progress: Callable[[dict[str, Any]], None] | None = None) -> StageResult:  # fmt: skip
    """Build the planned shards on Ray Data and collect the workers' summaries."""
    import ray
    from tqdm import tqdm

    result = StageResult(stage=stage, plan=plan, output_dir=output_dir)
    start = time.monotonic()
    for sid in plan.stale:
        catalog.uncommit(output_dir, sid)  # stale output is wrong output: never serve it
    catalog.sweep_uncommitted(output_dir, shards=plan.to_build)
    if tasks:
        items = [{"task": json.dumps(asdict(t))} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker_cls,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(resources.num_workers, len(items))),
            num_gpus=resources.num_gpus_per_worker or None,
            num_cpus=resources.num_cpus_per_worker,
        )
        total = sum(t.input_rows for t in tasks)
        with tqdm(total=total, unit="img", desc=stage, file=sys.stderr, dynamic_ncols=True) as bar:
            for summary in ds.iter_rows():
                summary = json.loads(summary["summary"])
                _merge(result, summary)
                bar.update(summary["rows_in"])
                if progress:
                    progress(summary)
    result.seconds = time.monotonic() - start
    result.dataset_digest = dataset_digest(
        {sid: r.digest for sid, r in catalog.committed(output_dir).items()}
    )
    return result


def _merge(result: StageResult, summary: dict[str, Any]) -> None:
    result.rows_in += summary["rows_in"]
    result.rows_out += summary["rows_out"]
    for cause, n in summary["failures"].items():
        result.failures[cause] = result.failures.get(cause, 0) + n
    if summary.get("error"):
        result.failed_shards[summary["shard"]] = summary["error"]


class ShardWorker:
    """Base of the stage workers: Ray Data calls it with one task per batch; subclasses `build`.

    `build(task) -> (rows_out, failures)` writes and commits the shard. Any exception fails only
    that shard: it is reported (driver exit status non-zero) and the other shards go on.
    """

    def __init__(self, *, root: str, num_threads: int | None = None) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.catalog = Catalog(root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for raw in batch["task"]:
            task = ShardTask(**json.loads(raw))
            start = time.monotonic()
            summary: dict[str, Any] = {
                "shard": task.shard,
                "rows_in": task.input_rows,
                "rows_out": 0,
                "failures": {},
            }
            try:
                summary["rows_out"], summary["failures"] = self.build(task)
            except Exception as err:  # a broken shard must not take the other shards down
                logger.exception("shard %s failed", task.shard)
                summary["error"] = f"{type(err).__name__}: {err}"[:500]
            summary["seconds"] = time.monotonic() - start
            summaries.append(json.dumps(summary))
        return {"summary": np.array(summaries, dtype=object)}

    def build(self, task: ShardTask) -> tuple[int, dict[str, int]]:
        raise NotImplementedError

    def commit(self, task: ShardTask, files: list[str], rows: int, failures: dict[str, int],
               extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.catalog.commit(
            task.output_dir,
            DoneRecord(
                shard=task.shard,
                stage=task.output_dir.rsplit("/", 2)[-2],
                digest=derived_shard_digest(
                    task.input_digest, task.config_digest, task.model_digest
                ),
                files=files,
                rows=rows,
                input_digest=task.input_digest,
                config_digest=task.config_digest,
                model_digest=task.model_digest,
                failures=failures,
                extra=extra or {},
            ),  # fmt: skip
        )

    def write_parquet(self, task: ShardTask, schema: Any, batches: Any) -> tuple[str, int]:
        """Stream record batches into `<output_dir>/<shard>.parquet` (temp name, then rename)."""
        import pyarrow.parquet as pq

        from pipelines.schemas import check_table

        fs = self.catalog.fs
        fs.create_dir(task.output_dir, recursive=True)
        name = f"{task.shard}.parquet"
        final = f"{task.output_dir}/{name}"
        tmp = self.catalog.temp_path(final)
        rows = 0
        try:
            with fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, schema) as writer:
                for table in batches:
                    check_table(table, schema)
                    writer.write_table(table.cast(schema))  # adds nullability + the schema metadata
                    rows += table.num_rows
        except BaseException:
            fs.delete_file(tmp)  # a failed shard leaves nothing behind
            raise
        fs.move(tmp, final)
        return name, rows

    def read_parquet(
        self, task: ShardTask, *, columns: list[str] | None = None, batch_size: int = 256
    ) -> Any:
        """Iterate record batches of the task's committed input files."""
        import pyarrow.parquet as pq

        for name in task.input_files:
            with self.catalog.fs.open_input_file(f"{task.input_dir}/{name}") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)
