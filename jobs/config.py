"""Settings shared by the training jobs, and the base of every job config.

The merge mechanism (defaults < YAML < flags < overrides) and the command grammar are
`pipelines.config`, the same for stages and jobs. Each job's own config subclasses
`TrainJobConfig` beside the job's code (`jobs/stage1.py`, `jobs/stage2.py`, `jobs/lora.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import CommonSettings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RANK_ROWS = ("auto", "global_shuffle", "streaming_split")


@dataclass(kw_only=True)
class ScalingSettings:
    """Ray Train ScalingConfig: 2 CPU workers with gloo here; 64 GPU workers on the cluster."""

    num_workers: Any = 2
    """Ray Train workers: an int, or `[min, max]` for an elastic run (Ray Train restarts the group at
    any size in the range after a node is lost; the global batch stays `batch_size_per_worker` x
    max, `jobs.elastic`). Typed Any: OmegaConf has no int-or-list union; validated below."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """Used only with use_gpu."""
    placement_strategy: str = "PACK"
    """How Ray places the workers' bundles: PACK (Ray Train's default: on as few nodes as
    possible), SPREAD (over as many nodes as possible, best effort) or STRICT_SPREAD (each on its
    own node, or not at all)."""
    schedule_timeout_s: float = 600.0
    """How long each start of a fixed-size worker group (the first and every restart) may wait
    for its resources before the run fails with one line saying what it asked for and what the
    cluster has (`jobs.scheduling.bounded_start`); 0 waits for ever, as Ray Train does. An
    elastic group waits as Ray Train's elastic policy does (it logs the shortfall)."""
    preflight: bool = True
    """Before launching, fail at once if the cluster's nodes, as they are, cannot hold the
    workers (`jobs.scheduling.preflight`). Turn off on an autoscaling cluster, whose nodes join
    on demand (schedule_timeout_s still bounds the wait)."""

    def __post_init__(self) -> None:
        from jobs.elastic import worker_bounds
        from jobs.scheduling import PLACEMENT_STRATEGIES

        low, high = worker_bounds(self.num_workers)
        self.num_workers = low if low == high else [low, high]
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"scaling.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")  # fmt: skip
        if self.schedule_timeout_s < 0:
            raise ValueError(
                f"scaling.schedule_timeout_s must be >= 0, got {self.schedule_timeout_s}"
            )


@dataclass(kw_only=True)
class RunSettings:
    """Where and how a run lives: Ray Train RunConfig + FailureConfig + checkpoint cadence."""

    name: str = ""
    """Run name (default: <job>-<corpus>). Re-launching with the same name resumes the run."""
    storage_path: str = ""
    """Default: <root>/runs."""
    max_failures: int = 1
    """Worker failures survived by restarting from the last checkpoint."""
    checkpoint_every: int = 50
    """Steps between DeepSpeed checkpoints."""
    keep_checkpoints: int = 2
    log_every: int = 10
    """Steps between metric logs to MLflow."""
    collective_timeout_s: int = 300
    """torch.distributed timeout: a lost node fails the step in minutes, not 30."""
    seed: int = 0
    epoch_cache_mb: int = 1024
    """A rank whose training shard fits in this many MiB keeps it in memory after the first epoch
    and serves later epochs from there, without re-running the Ray Data read (`jobs.epoch_cache`);
    0 streams every epoch."""
    rank_rows: str = "auto"
    """Which rows each rank trains on. `global_shuffle`: every rank reads the whole training set
    into its epoch cache and each epoch takes its slice of one seeded permutation of all rows
    (PyTorch's DistributedSampler rule), so the same config on the same data trains the same
    model. `streaming_split`: Ray Data's streaming_split hands blocks to the ranks as they ask,
    reading each row once whatever the corpus size, but which rows a rank gets varies between
    runs. `auto`: `global_shuffle` when the training parquet fits in epoch_cache_mb, else
    `streaming_split` (`jobs.launch.rank_rows`)."""

    def __post_init__(self) -> None:
        if self.rank_rows not in RANK_ROWS:
            raise ValueError(
                f"run.rank_rows must be one of {', '.join(RANK_ROWS)}, got {self.rank_rows!r}"
            )
        if self.epoch_cache_mb < 0:
            raise ValueError(f"run.epoch_cache_mb must be >= 0, got {self.epoch_cache_mb}")
        if self.rank_rows == "global_shuffle" and self.epoch_cache_mb == 0:
            raise ValueError(
                "run.rank_rows=global_shuffle needs the epoch cache (run.epoch_cache_mb > 0)"
            )
        if self.max_failures < -1:
            raise ValueError(f"run.max_failures must be >= -1, got {self.max_failures}")
        if self.checkpoint_every < 1:
            raise ValueError(f"run.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.collective_timeout_s < 10:
            raise ValueError(
                f"run.collective_timeout_s must be >= 10, got {self.collective_timeout_s}"
            )


@dataclass(kw_only=True)
class OptimSettings:
    """AdamW with linear warmup and cosine decay, gradient clipping."""

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_start_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    batch_size_per_worker: int = 64
    max_steps: int = 1000
    """Total optimizer steps (the cosine horizon); epochs repeat the data as needed."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        if self.warmup_steps < 0 or self.max_steps < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.max_steps >= 1")
        if self.batch_size_per_worker < 1:
            raise ValueError(
                f"optim.batch_size_per_worker must be >= 1, got {self.batch_size_per_worker}"
            )
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have 2 values, got {self.betas}")


@dataclass(kw_only=True)
class DeepSpeedSettings:
    zero_stage: int = 2
    precision: str = "auto"
    """auto = bf16 on GPU, fp32 on CPU (DeepSpeed refuses fp16 on CPU); or fp32, bf16, fp16."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(
                f"deepspeed.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"
            )


@dataclass(kw_only=True)
class FaultSettings:
    """Fault injection for tests: SIGKILL rank `rank`'s process once, at step `kill_at_step`."""

    kill_at_step: int = -1
    """-1 = off (the default)."""
    rank: int = 0


@dataclass(kw_only=True)
class TrainJobConfig(CommonSettings):
    """What every training job has: the catalog, Ray Train, DeepSpeed, the optimizer, eval, export."""

    holdout: float = 0.05
    """Fraction of rows (by key hash) held out of training, for evaluation."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: none)."""
    eval_rows: int = 256
    """Held-out rows evaluated in the job."""
    register_as: str = ""
    """MLflow registered-model name of the export."""
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    fault: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")
        if self.eval_every < 0 or self.eval_rows < 0:
            raise ValueError("eval_every and eval_rows must be >= 0")
