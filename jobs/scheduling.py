"""Where a training job's workers and data tasks run, and how long a job may wait for them.

A job must never wait for resources silently. Three ways it did or could:

- **Data tasks starved by the workers.** The Ray Data tasks behind `ray.train.get_dataset_shard`
  run outside the workers' placement group (Ray Train does not capture child tasks). With
  `read_parquet` they asked for a CPU each (its `ListFiles` step always does), so on a cluster
  whose CPUs the workers held (a head without CPUs and two 1-CPU nodes, each holding one worker)
  they stayed `PENDING_NODE_ASSIGNMENT` for ever. `training_rows` reads the rows with tasks that
  ask for no CPU, so they run beside the workers on whatever node has room (see its docstring).
- **A job bigger than the cluster.** Ray Train waits for its placement group, times out after a
  minute and tries again, for ever. `preflight` compares the workers' bundles and placement
  strategy with the nodes that exist and fails at once, naming both.
- **Resources that exist but are not free** (another job holds them, a node is gone). The
  `bounded_start` watchdog gives Ray Train `scaling.schedule_timeout_s` per start of a fixed-size
  worker group and makes the first time-out fatal, again with one line naming both. An elastic
  group (`[min, max]`) is left to Ray Train's elastic policy: it starts only at a size whose
  resources it sees free (a start that times out is its cue to retry at another size, so it must
  stay retryable), and while fewer than min fit it says so in the log every few minutes.

No module-level ray import: `jobs.config` imports the strategy names from here.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.config import ScalingSettings, TrainJobConfig

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
"""Ray placement-group strategies a job may ask for (`scaling.placement_strategy`)."""
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train V2's bound on one wait for the worker group's placement group (default 60 s, then
it retries for ever); the trainer propagates it from the driver to its controller."""
READS_PER_TASK_POOL = 2
"""Read tasks at a time per Ray Data execution (they ask for no CPU: see `training_rows`)."""
READ_BATCH_ROWS = 64
"""Rows per parquet read; blocks are cut from these at Ray Data's target size."""


class SchedulingError(ValueError):
    """The job's workers cannot be placed (ValueError: the CLI prints it as one `error:` line)."""


def worker_bundle(scaling: ScalingSettings) -> dict[str, float]:
    """The resources of one Ray Train worker: its placement-group bundle."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
    return bundle


def min_workers(scaling: ScalingSettings) -> int:
    """The fewest workers the job can start with (an elastic `[min, max]` starts at any size)."""
    from jobs.elastic import worker_bounds

    return worker_bounds(scaling.num_workers)[0]


def fits_per_node(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many bundles fit in a node's total resources."""
    # Ray keeps resources in units of 1e-4: a tolerance keeps 0.3 x 3 within 0.9
    counts = [math.floor(node.get(k, 0.0) / v + 1e-6) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def unschedulable(
    bundle: Mapping[str, float], workers: int, strategy: str, nodes: Sequence[Mapping[str, float]]
) -> str | None:
    """Why `workers` bundles of `bundle` under `strategy` can never be placed on `nodes` (each
    node's total resources), as one line; None when they can. Exact for identical bundles: under
    PACK and SPREAD (best effort) a node holds as many as fit, under STRICT_SPREAD one at most."""
    per_node = [fits_per_node(bundle, node) for node in nodes]
    room = sum(min(n, 1) for n in per_node) if strategy == "STRICT_SPREAD" else sum(per_node)
    if room >= workers:
        return None
    ask = f"{workers} worker{'s' if workers != 1 else ''} x {_fmt(bundle)} ({strategy})"
    why = "one per node" if strategy == "STRICT_SPREAD" else "in all"
    return (f"scaling: the job asks for {ask}, the cluster can hold {room} ({why}); "
            f"{cluster_summary(bundle, nodes)}")  # fmt: skip


def cluster_summary(bundle: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> str:
    """The nodes' amounts of the resources a bundle asks for, alike nodes counted together:
    `3 nodes: 1 x {CPU: 0}, 2 x {CPU: 1}`."""
    shapes = Counter(_fmt({k: node.get(k, 0.0) for k in bundle}) for node in nodes)
    kinds = ", ".join(f"{count} x {shape}" for shape, count in sorted(shapes.items()))
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {kinds or 'none alive'}"


def _fmt(resources: Mapping[str, float]) -> str:
    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "{" + ", ".join(f"{k}: {num(v)}" for k, v in resources.items()) + "}"


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def preflight(config: TrainJobConfig) -> None:
    """Connect to the job's Ray (`ensure_ray`) and fail now, with one line, if the cluster as it
    is cannot hold the job's smallest worker group; skipped with `scaling.preflight=false` (an
    autoscaling cluster adds nodes on demand)."""
    from pipelines.cli_common import ensure_ray

    scaling = config.scaling
    if not scaling.preflight:
        return
    ensure_ray(config.address)
    reason = unschedulable(
        worker_bundle(scaling), min_workers(scaling), scaling.placement_strategy, alive_nodes()
    )
    if reason:
        raise SchedulingError(reason)


def bounded(scaling: ScalingSettings) -> bool:
    """Whether the watchdog bounds this job's worker group starts: a fixed size and a bound."""
    from jobs.elastic import worker_bounds

    low, high = worker_bounds(scaling.num_workers)
    return scaling.schedule_timeout_s > 0 and low == high


def controller_failure_limit(scaling: ScalingSettings) -> int:
    """`FailureConfig.controller_failure_limit`: under the watchdog the first worker group start
    that times out ends the run; else Ray Train's default, -1, retries for ever."""
    return 0 if bounded(scaling) else -1


@contextlib.contextmanager
def bounded_start(scaling: ScalingSettings) -> Iterator[None]:
    """Around `trainer.fit()`: each start of a fixed-size worker group (the first and every
    restart) waits at most `scaling.schedule_timeout_s` for its placement group, and a time-out
    becomes one SchedulingError line naming what the job asked for and what the cluster has,
    free and in all. Needs `controller_failure_limit(scaling)` in the run's FailureConfig."""
    from ray.train import ControllerError

    # Internal to Ray Train 2.60, checked against its source: the controller's error for a
    # worker group whose placement group was not ready in time (there is no public type).
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    before = os.environ.get(START_TIMEOUT_ENV)
    if bounded(scaling):
        os.environ[START_TIMEOUT_ENV] = f"{scaling.schedule_timeout_s:g}"
    try:
        yield
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        raise SchedulingError(waited_too_long(scaling)) from err
    finally:
        # restored: an in-process caller (the tests) runs more jobs with other bounds
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before


def waited_too_long(scaling: ScalingSettings) -> str:
    """The watchdog's line: the job's ask, the cluster in all and what is free now."""
    import ray

    from jobs.elastic import worker_bounds

    bundle = worker_bundle(scaling)
    free = {k: ray.available_resources().get(k, 0.0) for k in bundle}
    low, high = worker_bounds(scaling.num_workers)
    count = f"{low}" if low == high else f"{low}-{high}"
    return (f"scaling: {count} workers x {_fmt(bundle)} ({scaling.placement_strategy}) "
            f"were not placed within scaling.schedule_timeout_s={scaling.schedule_timeout_s:g} s; "
            f"cluster {cluster_summary(bundle, alive_nodes())}; free now {_fmt(free)}")  # fmt: skip


def training_rows(config: TrainJobConfig, files: Sequence[str]) -> Any:
    """The training rows of `files` (the held-out ones dropped) as a Ray Dataset whose every
    task asks for no CPU.

    Why no CPU, rather than a CPU kept free for them: the tasks run outside the workers'
    placement group, and no amount of free CPUs is guaranteed there (another job, a head
    without CPUs, nodes the size of one worker), while a task that asks for nothing is always
    placed; it is I/O and parquet decoding that the training workers wait for anyway. Why not
    `read_parquet(num_cpus=0)`: its `ListFiles` step has no resource option and asks for one
    CPU. So the files (already listed by the job) are the input rows, and a zero-CPU task
    reads each with pyarrow, in blocks of Ray Data's target size (`read_parquet_files`). Ray Data cannot bound tasks
    that take no CPU by the CPUs they use, so the pool is bounded: `READS_PER_TASK_POOL` per
    execution under `global_shuffle` (each rank reads the whole set), that per worker under
    `streaming_split` (one execution feeds every rank)."""
    import ray.data

    from jobs.elastic import worker_bounds

    most = worker_bounds(config.scaling.num_workers)[1]
    size = READS_PER_TASK_POOL * (most if config.run.rank_rows == "streaming_split" else 1)
    items = [{"path": path} for path in files]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_parquet_files, batch_size=1, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=size),
        fn_kwargs={"holdout": config.holdout,
                   "block_bytes": ray.data.DataContext.get_current().target_max_block_size},
    )  # fmt: skip


def read_parquet_files(
    batch: Any, holdout: float = 0.0, block_bytes: int | None = None
) -> Iterator[Any]:
    """Ray Data generator over a batch of `path` rows: each file's rows (local path or URI) in
    tables of about `block_bytes` in memory (at most `READ_BATCH_ROWS` rows over), without the
    held-out ones when `holdout` > 0. Sized in memory, not by the parquet footer: encoded sizes
    say little about decoded ones (a dictionary-encoded column is a fraction of its arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.datasets import drop_holdout
    from pipelines.storage import filesystem

    def block(batches: list[pa.RecordBatch]) -> pa.Table:
        table = pa.Table.from_batches(batches)
        return drop_holdout(table, holdout) if holdout > 0 else table

    for path in batch.column("path").to_pylist():
        fs, inside = filesystem(path)  # a local path or a store URI, as every catalog read
        with pq.ParquetFile(inside, filesystem=fs) as parquet:
            pending: list[pa.RecordBatch] = []
            size = 0
            for record_batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
                pending.append(record_batch)
                size += record_batch.nbytes
                if block_bytes and size >= block_bytes:
                    yield block(pending)
                    pending, size = [], 0
            if pending:
                yield block(pending)
