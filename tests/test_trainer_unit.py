"""Unit tests of jobs.trainer's pure helpers (no Ray, no DeepSpeed): the lr schedule, the DeepSpeed
config of a job config, and the AdamW parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.config import DeepSpeedSettings, OptimSettings, ScalingSettings, TrainJobConfig
from jobs.trainer import deepspeed_config, lr_lambda, param_groups, training_precision

SCHEDULE = {
    "lr": 1e-3,
    "warmup_start_lr": 1e-5,
    "warmup_steps": 10,
    "max_steps": 100,
    "min_lr": 1e-4,
}


def multiplier(step: int, **changes: float) -> float:
    return lr_lambda(step, **(SCHEDULE | changes))


def job_config(**changes) -> TrainJobConfig:
    return TrainJobConfig(corpus="c", **changes)


# ---- lr_lambda --------------------------------------------------------------------------------
def test_warmup_starts_at_warmup_start_lr_and_reaches_the_base_lr():
    """The multiplier is warmup_start_lr/lr at step 0, rises linearly, and is exactly 1 at the end of warmup."""
    assert multiplier(0) == pytest.approx(1e-5 / 1e-3)
    assert multiplier(5) == pytest.approx((1e-5 + (1e-3 - 1e-5) * 0.5) / 1e-3)
    assert multiplier(10) == pytest.approx(1.0)
    warmup = [multiplier(s) for s in range(11)]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))


def test_cosine_decays_monotonically_to_min_lr_at_max_steps():
    """After warmup the multiplier never increases, is min_lr/lr at max_steps and stays there beyond it."""
    decay = [multiplier(s) for s in range(10, 131)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert multiplier(55) == pytest.approx((1e-4 + 0.5 * (1e-3 - 1e-4)) / 1e-3)  # cosine midpoint
    assert multiplier(100) == pytest.approx(1e-4 / 1e-3)
    assert multiplier(130) == pytest.approx(1e-4 / 1e-3)


def test_no_warmup_starts_at_the_base_lr():
    """With warmup_steps=0 the schedule starts at 1 (warmup_start_lr has no effect) and decays to 0 with min_lr=0."""
    assert multiplier(0, warmup_steps=0) == pytest.approx(1.0)
    assert multiplier(100, warmup_steps=0, min_lr=0.0) == pytest.approx(0.0, abs=1e-12)


# ---- deepspeed_config -------------------------------------------------------------------------
def test_deepspeed_config_takes_batch_clipping_and_zero_stage_from_the_config():
    """Micro batch = batch_size_per_worker, clipping = grad_clip, ZeRO stage = deepspeed.zero_stage, no accumulation."""
    config = job_config(optim=OptimSettings(batch_size_per_worker=7, grad_clip=0.25),
                        deepspeed=DeepSpeedSettings(zero_stage=3))  # fmt: skip
    ds = deepspeed_config(config)
    assert ds["train_micro_batch_size_per_gpu"] == 7
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.25
    assert ds["zero_optimization"] == {"stage": 3}
    assert "optimizer" not in ds and "scheduler" not in ds  # torch objects: no fused_adam JIT build


@pytest.mark.parametrize(
    ("use_gpu", "precision", "expected"),
    [(False, "auto", "fp32"), (True, "auto", "bf16"), (False, "fp16", "fp16"), (True, "fp16", "fp16"),
     (False, "bf16", "bf16"), (True, "fp32", "fp32")],
)  # fmt: skip
def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu(use_gpu, precision, expected):
    """`auto` resolves to fp32 without GPUs and bf16 with use_gpu; an explicit precision is kept; the flags follow it."""
    config = job_config(scaling=ScalingSettings(use_gpu=use_gpu),
                        deepspeed=DeepSpeedSettings(precision=precision))  # fmt: skip
    assert training_precision(config) == expected
    ds = deepspeed_config(config)
    assert ds["bf16"] == {"enabled": expected == "bf16"}
    assert ds["fp16"] == {"enabled": expected == "fp16"}


# ---- param_groups -----------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_matrices_only_and_skip_frozen():
    """Matrices get the weight decay, biases and norm weights (1-D) get none, frozen parameters are in no group."""
    model = Tiny()
    groups = param_groups(model, 0.05)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_decay) == {0.05, 0.0}
    assert by_decay[0.05] == {id(model.embed.weight), id(model.proj.weight)}
    assert by_decay[0.0] == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not frozen & (by_decay[0.05] | by_decay[0.0])


@pytest.mark.parametrize(
    ("module", "decays"),
    [(nn.LayerNorm(4), [0.0]), (nn.Linear(4, 4, bias=False), [0.1]), (nn.Sequential(), [])],
    ids=["only-1d", "only-matrices", "no-params"],
)
def test_param_groups_has_no_empty_group(module, decays):
    """A model without matrices or without 1-D parameters gets one group, never an empty one (DeepSpeed drops those)."""
    groups = param_groups(module, 0.1)
    assert [g["weight_decay"] for g in groups] == decays
    assert all(g["params"] for g in groups)
    if groups:
        torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


# ---- run.rank_rows ----------------------------------------------------------------------------
def test_rank_rows_auto_shuffles_globally_only_what_fits_the_epoch_cache(tmp_path):
    """`auto` resolves to global_shuffle when the training files' uncompressed size fits in
    run.epoch_cache_mb and to streaming_split past it (or with the cache off); an explicit choice
    is kept; global_shuffle without the cache and unknown values are refused by name."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.config import RunSettings
    from jobs.launch import parquet_bytes, rank_rows

    files = []
    for i in range(2):  # 2 x 300k float32: ~2.4 MB uncompressed, whatever the compression
        path = tmp_path / f"{i:05d}.parquet"
        pq.write_table(pa.table({"key": [f"{i}-{j}" for j in range(300_000)],
                                 "x": np.zeros(300_000, np.float32)}), path)  # fmt: skip
        files.append(str(path))
    size = parquet_bytes(files)
    assert size > 2 * 300_000 * 4
    assert (
        rank_rows(job_config(run=RunSettings(epoch_cache_mb=(size >> 20) + 1)), files)
        == "global_shuffle"
    )
    assert (
        rank_rows(job_config(run=RunSettings(epoch_cache_mb=(size >> 20) - 1)), files)
        == "streaming_split"
    )
    assert rank_rows(job_config(run=RunSettings(epoch_cache_mb=0)), files) == "streaming_split"
    explicit = job_config(run=RunSettings(epoch_cache_mb=1, rank_rows="global_shuffle"))
    assert rank_rows(explicit, files) == "global_shuffle"
    with pytest.raises(ValueError, match="needs the epoch cache"):
        RunSettings(epoch_cache_mb=0, rank_rows="global_shuffle")
    with pytest.raises(ValueError, match="run.rank_rows must be one of"):
        RunSettings(rank_rows="random")
