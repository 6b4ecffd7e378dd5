"""What every derived stage's entry point shares: its config base and flags, Ray start-up, and
plan -> run -> report -> MLflow."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines.catalog import Catalog, Plan
from pipelines.config import CommonSettings, parse_command
from pipelines.datasets import dataset_ref
from pipelines.stage import Resources, ShardTask, StageResult, execute

T = TypeVar("T")

# Passed to every Ray worker: offline hub, no wandb, the venv-private DeepSpeed/torch JIT cache.
WORKER_ENV_KEYS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "WANDB_MODE",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
)


@dataclass(kw_only=True)
class StageConfig(CommonSettings):
    """What every derived stage's config has (features, qembeds, tokens)."""

    resources: Resources = field(default_factory=Resources)


STAGE_ALIASES = {
    "--num-workers": "resources.num_workers",
    "--num-gpus-per-worker": "resources.num_gpus_per_worker",
    "--num-cpus-per-worker": "resources.num_cpus_per_worker",
    "--batch-size": "resources.batch_size",
}
"""Flags for the resource settings every stage takes (shorthands for the dotted keys)."""


def parse_stage(cls: type[T], argv: Sequence[str] | None, *, prog: str, doc: str | None) -> T:
    """A stage's command line: the one grammar (pipelines.config) plus the resource flags."""
    return parse_command(
        cls, argv, prog=prog, description=(doc or "").split("\n\n")[0], aliases=STAGE_ALIASES
    )


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


def run_stage(catalog: Catalog, *, stage: str, config: StageConfig, plan: Plan, tasks: list[ShardTask],
              resolved: dict[str, Any], input_dir: str, output_dir: str, worker_cls: type,
              worker_kwargs: dict[str, Any]) -> StageResult:  # fmt: skip
    """Print the plan; unless dry, build on Ray inside an MLflow run, print and log the summary.

    `resolved`: what the stage resolved from its config (defaults, model URIs and digests); logged
    as params over the config's own values, so a param says what the stage really used."""
    corpus, dry_run, resources = config.corpus, config.dry_run, config.resources
    print(f"{stage} plan for {corpus} -> {catalog.location(output_dir)}: {plan.summary()}",
          flush=True)  # fmt: skip
    print("".join(f"{line}\n" for line in plan.problems()), end="", flush=True)
    if dry_run or not plan.to_build:
        if not dry_run:
            print(f"{stage}: nothing to do", flush=True)
            from pipelines.tracking import sync_pending  # stage runs an MLflow outage left queued

            sync_pending(catalog)
        return StageResult(stage=stage, plan=plan, output_dir=output_dir)
    from pipelines.tracking import stage_run
    from pipelines.tracking.run_tags import stage_run_name, stage_run_tags

    ensure_ray(config.address)
    source = dataset_ref(catalog, input_dir, "input")
    name = stage_run_name(stage, corpus, output_dir.rsplit("/", 1)[-1], source.digest)
    with stage_run(
        catalog,
        stage=stage,
        corpus=corpus,
        config=dataclasses.asdict(config) | resolved,
        run_name=name,
    ) as run:
        run.log_dataset(**source.as_kwargs())
        result = execute(catalog, stage=stage, plan=plan, tasks=tasks, worker_cls=worker_cls,
                         worker_kwargs=worker_kwargs, resources=resources, output_dir=output_dir)  # fmt: skip
        made = dataset_ref(catalog, output_dir, "output")
        run.log_dataset(**made.as_kwargs())
        run.tracker.set_tags(
            stage_run_tags(stage, resolved, input_digest=source.digest, output_digest=made.digest)
        )
        rate = result.rows_out / result.seconds if result.seconds else 0.0
        run.log_metrics({"rows_in": result.rows_in, "rows_out": result.rows_out, "images_per_s": rate,
                         "shards_built": len(plan.to_build) - len(result.failed_shards),
                         "shards_failed": len(result.failed_shards)}
                        | {f"skipped_{cause}": n for cause, n in result.failures.items()})  # fmt: skip
        run.log_dict({"plan": vars(plan), "failed_shards": result.failed_shards}, "summary.json")
    print(result.table(), flush=True)
    return result
