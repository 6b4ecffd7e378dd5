"""What every derived stage's entry point shares: flags, Ray start-up, plan -> run -> report -> MLflow."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pipelines.catalog import Catalog, Plan
from pipelines.stage import Resources, ShardTask, StageResult, execute

# Passed to every Ray worker: offline hub, no wandb, the venv-private DeepSpeed/torch JIT cache.
WORKER_ENV_KEYS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "WANDB_MODE",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
)


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", default="./seed-data", help="catalog root: local path or filesystem URI"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and stop; write nothing"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="actors in the pool")
    parser.add_argument("--num-gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--num-cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per model forward")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )


def resources(args: argparse.Namespace) -> Resources:
    return Resources(num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
                     num_cpus_per_worker=args.num_cpus_per_worker, batch_size=args.batch_size)  # fmt: skip


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray; a no-op if already connected."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray gets at least 4 logical CPUs: on a 2-core machine, 2 training workers would
    # otherwise take every CPU slot and leave Ray Data's read tasks unschedulable (a silent hang).
    local = {} if address else {"num_cpus": max(4, os.cpu_count() or 1)}
    ray.init(
        address=address,
        runtime_env={"env_vars": env},
        include_dashboard=False,
        log_to_driver=True,
        **local,
    )
    ray.data.DataContext.get_current().enable_progress_bars = (
        False  # our bar counts images, not shards
    )


def run_stage(catalog: Catalog, *, stage: str, corpus: str, plan: Plan, tasks: list[ShardTask], dry_run: bool,
              address: str | None, config: dict[str, Any], resources: Resources, input_dir: str, output_dir: str,
              worker_cls: type, worker_kwargs: dict[str, Any]) -> StageResult:  # fmt: skip
    """Print the plan; unless dry, build on Ray inside an MLflow run, print and log the summary."""
    print(f"{stage} plan for {corpus} -> {output_dir}: {plan.summary()}", flush=True)
    if dry_run or not plan.to_build:
        if not dry_run:
            print(f"{stage}: nothing to do", flush=True)
        return StageResult(stage=stage, plan=plan, output_dir=output_dir)
    from pipelines.catalog import dataset_digest
    from pipelines.lineage import stage_run

    ensure_ray(address)
    inputs = catalog.committed(input_dir)
    with stage_run(
        catalog, stage=stage, corpus=corpus, config=config | {"resources": vars(resources)}
    ) as run:
        run.log_dataset(name=_name(catalog, input_dir), digest=dataset_digest({s: r.digest for s, r in inputs.items()}),
                        uri=catalog.uri(input_dir), context="input", rows=sum(r.rows for r in inputs.values()))  # fmt: skip
        result = execute(catalog, stage=stage, plan=plan, tasks=tasks, worker_cls=worker_cls,
                         worker_kwargs=worker_kwargs, resources=resources, output_dir=output_dir)  # fmt: skip
        outputs = catalog.committed(output_dir)
        run.log_dataset(name=_name(catalog, output_dir), digest=result.dataset_digest, uri=catalog.uri(output_dir),
                        context="output", rows=sum(r.rows for r in outputs.values()))  # fmt: skip
        rate = result.rows_out / result.seconds if result.seconds else 0.0
        run.log_metrics({"rows_in": result.rows_in, "rows_out": result.rows_out, "images_per_s": rate,
                         "shards_built": len(plan.to_build) - len(result.failed_shards),
                         "shards_failed": len(result.failed_shards)}
                        | {f"skipped_{cause}": n for cause, n in result.failures.items()})  # fmt: skip
        run.log_dict({"plan": vars(plan), "failed_shards": result.failed_shards}, "summary.json")
    print(result.table(), flush=True)
    return result


def _name(catalog: Catalog, directory: str) -> str:
    """corpus/stage/name of a dataset folder (corpus/raw for raw)."""
    rel = directory[len(catalog.base) + len("/corpora/") :]
    return rel
