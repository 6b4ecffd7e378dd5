"""One Ray Train + DeepSpeed training loop for every job (stage 1, stage 2, LoRA).

A job supplies a `JobParts` builder (model/task, collate, eval, export); this module does the
rest: DeepSpeed ZeRO from the config, AdamW + warmup/cosine, gradient clipping, the Ray Dataset
shard, checkpoints with complete state (model/optimizer/scheduler via DeepSpeed, plus step, data
position and RNG), resume from `ray.train.get_checkpoint()`, rank-0 MLflow logging through a
`RunTracker` (stable run id, outage-proof), the end-of-run export.

Data position: which rows a rank trains on is `run.rank_rows` (`jobs.launch.rank_rows`): a slice
of one seeded permutation of the whole training set per epoch (`global_shuffle`, when it fits the
epoch cache: the same config on the same data trains the same model), or Ray Data's
`streaming_split` shard (any size; its membership varies between runs). Either way a rank's epoch
order is a seeded permutation of its rows sorted by key (`jobs.epoch_cache`) when they fit, else a
seeded local shuffle of the stream, and the rank records the keys it consumed in the epoch; a
resumed run drops those rows before collating (skipping costs the read, not the tokenization or
tensor building), so on the same number of ranks it sees the same next batches, and on another
number (`jobs.elastic`: universal checkpoint, same global batch) it sees each remaining row of the
epoch once.

Everything a worker gets is the typed `jobs.job.WorkerSpec`: the job object, its validated config,
its `Inputs` dataclass and the `RunContext`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from jobs.config import TrainJobConfig
from jobs.elastic import (
    KEY_COLUMN,
    UNIVERSAL_DIR,
    BatchLayout,
    batch_layout,
    checkpoint_info,
    load_consumed_keys,
    record_resize,
    save_consumed_keys,
    to_universal,
    unconsumed_batches,
    worker_bounds,
)
from jobs.epoch_cache import EpochCache
from jobs.job import JobParts, RunContext, WorkerSpec
from pipelines.storage import RunFolder

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
JOB_STATE_FILE = "job_state.json"
CONFIG_FILE = "config.yaml"
METRICS_LOG = "metrics.jsonl"
REGISTERED_FILE = "registered_model.json"
"""In the run folder: the registered model's URI and digest, or why registration was deferred."""


def lr_lambda(
    step: int,
    *,
    lr: float,
    warmup_start_lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float,
) -> float:
    """Multiplier of the base lr: linear warmup from warmup_start_lr, then cosine down to min_lr."""
    if warmup_steps and step < warmup_steps:
        return (warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps) / lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms and 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [
        g for g in groups if g["params"]
    ]  # DeepSpeed drops empty groups, desyncing the scheduler


def training_precision(config: TrainJobConfig) -> str:
    """fp32, bf16 or fp16: `auto` is bf16 on GPU and fp32 on CPU (DeepSpeed refuses fp16 on CPU)."""
    precision = config.deepspeed.precision
    if precision == "auto":
        return "bf16" if config.scaling.use_gpu else "fp32"
    return precision


def global_batch(config: TrainJobConfig) -> int:
    """Samples per optimizer step: `batch_size_per_worker` x the configured (largest) worker count.
    It stays the same when a run resumes on another number of workers (`jobs.elastic`)."""
    return config.optim.batch_size_per_worker * worker_bounds(config.scaling.num_workers)[1]


def deepspeed_config(
    config: TrainJobConfig, layout: BatchLayout | None = None, *, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict of a job config (the optimizer and scheduler are passed as torch
    objects: a DeepSpeed-config optimizer would JIT-build fused_adam on CPU, PITFALLS.md).
    `layout`: the micro batch and accumulation on this run's ranks (default: the configured
    per-worker batch, no accumulation); `load_universal`: the checkpoint to load is a universal one."""
    precision = training_precision(config)
    micro = layout.micro_batch if layout else config.optim.batch_size_per_worker
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": layout.accumulation if layout else 1,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))


def train_loop_per_worker(spec: WorkerSpec[Any, Any]) -> None:
    """Ray Train entry point: build, prepare, iterate the dataset shard, step, report."""
    import ray.train
    import ray.train.torch

    from jobs.deepspeed_ops import configure_environment, ensure_ops

    train_ctx = ray.train.get_context()
    ctx = spec.context.on_rank(train_ctx.get_world_rank(), train_ctx.get_world_size())
    config, rank, world = spec.config, ctx.rank, ctx.world
    configure_environment()
    ensure_ops()  # the comm op is prebuilt: load it under our lock before DeepSpeed looks for it
    seed = config.run.seed
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    parts = spec.job.build(config, spec.inputs, ctx)
    with contextlib.ExitStack() as stack:
        engine, state, consumed_before, layout = _start(spec, parts, ctx, stack)
    tracker = _open_tracker(spec, ctx) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    max_steps, micro = config.optim.max_steps, layout.micro_batch
    metrics_log = ctx.run_dir / METRICS_LOG
    if rank == 0:
        ctx.folder.pull(METRICS_LOG)  # a rank 0 restarted on another node appends to the same log
    step = state0 = state["step"]
    # This rank's keys of the current epoch; rank 0 also carries those consumed before a resume,
    # so that every checkpoint holds the epoch's whole consumed set (`jobs.elastic`).
    consumed: list[str] = consumed_before.to_pylist() if rank == 0 else []
    start: float | None = None  # set at the first batch: throughput excludes Ray Data's start-up
    cache = EpochCache(max_bytes=config.run.epoch_cache_mb << 20, key_column=KEY_COLUMN)
    global_shuffle = config.run.rank_rows == "global_shuffle"  # resolved by jobs.launch.rank_rows
    while step < max_steps:
        batches = _epoch_batches(shard, cache, micro=micro, seed=seed, epoch=state["epoch"],
                                 rank=rank, world=world if global_shuffle else None)  # fmt: skip
        seen = 0
        for arrow_batch in unconsumed_batches(batches, consumed_before, micro):
            consumed.extend(arrow_batch.column(KEY_COLUMN).to_pylist())
            batch = {k: v.to(device) for k, v in parts.collate(arrow_batch).items()}
            if start is None:
                start = time.monotonic()
            if config.fault.kill_at_step == step and config.fault.rank == rank:
                _kill_once(ctx.folder, step, config.run.checkpoint_every)
            engine.train()
            out = engine(batch)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            seen += 1
            if not boundary:
                continue  # accumulating: the optimizer steps on the last micro batch
            step += 1
            state.update(step=step, world=world)
            # with accumulation (a resumed run on fewer ranks), the step's metrics and on_step
            # (stage 2's code usage) are those of its last micro batch
            step_extra = parts.on_step(engine, out, step) if parts.on_step else {}
            log_now = step % config.run.log_every == 0 or step == max_steps
            save_now = step % config.run.checkpoint_every == 0 or step == max_steps
            # The loss all-reduce (and the loss's sync to host) only on the steps that use it:
            # every step, they were about 1% of a demo step's time (py-spy). The condition is the
            # step's, so every rank joins the same collectives.
            metrics = (
                _step_metrics(out, engine, world) | step_extra
                if log_now or save_now
                else step_extra
            )
            if tracker and log_now:
                metrics["samples_per_s"] = (
                    (step - state0) * layout.global_batch / (time.monotonic() - start)
                )
                tracker.log_metrics(metrics, step=step)
                _append_jsonl(metrics_log, {"step": step, "metrics": metrics})
            if parts.evaluate and config.eval_every and step % config.eval_every == 0:
                engine.eval()
                with torch.no_grad():
                    evals = parts.evaluate(engine.module)
                if tracker:
                    evals = {f"eval/{k}": v for k, v in evals.items()}
                    tracker.log_metrics(evals, step=step)
                    _append_jsonl(metrics_log, {"step": step, "metrics": evals})
            if save_now:
                _save_and_report(engine, parts, ctx, state, metrics, consumed)
                if rank == 0 and metrics_log.is_file():
                    ctx.folder.push(METRICS_LOG)
            if step >= max_steps:
                break
        if step < max_steps:
            if seen == 0 and len(consumed_before) == 0:
                raise ValueError(
                    "the training dataset shard yielded no full batch: more data or a smaller batch size"
                )
            state.update(epoch=state["epoch"] + 1)
            consumed_before, consumed = pa.array([], pa.string()), []
    _finish(engine, parts, spec, ctx, tracker)


def _epoch_batches(shard: Any, cache: EpochCache, *, micro: int, seed: int, epoch: int,
                   rank: int, world: int | None) -> Iterable[pa.Table]:  # fmt: skip
    """One epoch of this rank's rows in micro batches: a seeded permutation of the rank's rows
    sorted by key, from `cache` (`jobs.epoch_cache`), which reads a whole pass first; or, for a
    shard over the cache's bound, streamed from Ray Data (seeded local shuffle, the partial last
    batch included). The caller cuts full batches (`jobs.elastic.unconsumed_batches`).

    Why fill before the first epoch too: the rows of a shard arrive in the order img2dataset
    downloaded them, which changes from one ingest to the next, and a first epoch streamed in that
    order trained another model on every ingest. From the cache every epoch's order depends only
    on the rank's rows, the seed and the epoch (the demo's stage 1 on two ingests whose files hold
    the rows in other orders, with the same rows per rank: identical losses to the last digit). A
    resumed run serves the same order as the run it resumes.

    Which rows a rank gets: with `world` (`run.rank_rows=global_shuffle`) the shard is the whole
    training set, the same on every rank; the epoch is one permutation of it by (seed, epoch) and
    this rank serves its slice, so the same config on the same data trains the same model. Such a
    shard must fit the cache: streamed, every rank would train on every row. Without `world` the
    shard is Ray Data's `streaming_split`, whose membership varied between runs of the demo (three
    runs, three different sets)."""

    def stream() -> Iterable[pa.Table]:
        # drop_last=False: the cache must hold every row of the shard, the partial last batch's
        # too; training drops that batch later (`unconsumed_batches`). Recording only the full
        # batches cached the first pass's subset for good: rows it dropped were never trained
        # again, and a run resumed past epoch 0 refilled a different subset (other losses).
        return shard.iter_batches(batch_size=micro, drop_last=False, batch_format="pyarrow",
                                  local_shuffle_buffer_size=4 * micro, local_shuffle_seed=seed + epoch)  # fmt: skip

    if cache.enabled and not cache.ready:
        cache.fill(stream())
    if cache.ready and world is not None:
        return cache.epoch(seed=(seed, epoch), batch_size=micro, part=(rank, world))
    if cache.ready:
        return cache.epoch(seed=(seed, epoch, rank), batch_size=micro)
    if world is not None:
        raise ValueError(
            f"run.rank_rows=global_shuffle: rank {rank}'s copy of the training set is over "
            f"run.epoch_cache_mb={cache.max_bytes >> 20}; raise it, or set run.rank_rows=streaming_split"
        )
    if rank == 0:
        logger.info("epoch %d streams from Ray Data: the shard is over run.epoch_cache_mb", epoch)
    return stream()


def _start(spec: WorkerSpec[Any, Any], parts: JobParts, ctx: RunContext,
           stack: contextlib.ExitStack) -> tuple[Any, dict[str, Any], pa.Array, BatchLayout]:  # fmt: skip
    """The DeepSpeed engine, the loop state, the keys already consumed in its epoch and the batch
    layout: fresh, or from Ray Train's latest checkpoint. A checkpoint written by another number
    of ranks is converted to DeepSpeed's universal format first (rank 0, once; the others wait).
    A resumed run keeps the global batch it was started with, whatever the config says now."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    config, optim = spec.config, spec.config.optim
    optimizer = torch.optim.AdamW(
        param_groups(parts.task, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, lr=optim.lr, warmup_start_lr=optim.warmup_start_lr,
                            warmup_steps=optim.warmup_steps, max_steps=optim.max_steps, min_lr=optim.min_lr),
    )  # fmt: skip
    checkpoint = ray.train.get_checkpoint()
    ckpt_dir = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
    saved = json.loads((ckpt_dir / STATE_FILE).read_text()) if ckpt_dir else None
    configured = global_batch(config)
    # a checkpoint from before elastic resume: its global batch was the per-worker one x its world
    run_batch = (saved.get("global_batch") or optim.batch_size_per_worker * saved.get("world", ctx.world)
                 if saved else configured)  # fmt: skip
    if run_batch != configured and ctx.rank == 0:
        logger.warning(
            "keeping the run's global batch of %d (the config now gives %d)", run_batch, configured
        )
    layout = batch_layout(run_batch, optim.batch_size_per_worker, ctx.world)
    # checkpoints written before elastic resume existed carry no world: they were never resized
    resized = saved is not None and saved.get("world", ctx.world) != ctx.world
    if ctx.rank == 0:
        _drop_lost_checkpoints(ctx.folder, saved["step"] if saved else 0)
    load_dir = ckpt_dir
    if saved is not None and resized:
        assert ckpt_dir is not None
        universal = f"{UNIVERSAL_DIR}/{saved['tag']}"
        if ctx.rank == 0:
            to_universal(ckpt_dir, saved["tag"], ctx.run_dir)
            ctx.folder.push(universal)  # the ranks on other nodes read it from the store
        if dist.is_initialized():
            dist.barrier()
        if ctx.rank != 0:
            ctx.folder.pull(universal)
        load_dir = ctx.run_dir / UNIVERSAL_DIR
    engine, _, _, _ = deepspeed.initialize(
        model=parts.task, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(config, layout, load_universal=resized),
    )  # fmt: skip
    if saved is None or ckpt_dir is None or load_dir is None:
        fresh = {"step": 0, "epoch": 0, "world": ctx.world, "global_batch": layout.global_batch}
        return engine, fresh, pa.array([], pa.string()), layout
    # DeepSpeed's own loader unpickles its state files: they are ours, written by this loop.
    engine.load_checkpoint(str(load_dir), tag=saved["tag"], load_module_strict=True)
    rng = ckpt_dir / f"rng_rank{ctx.rank}.pt"
    if rng.exists():  # a rank that did not exist before a grow starts from its seed
        _set_rng_state(torch.load(rng, weights_only=True))
    job_state = ckpt_dir / JOB_STATE_FILE
    stored = json.loads(job_state.read_text()) if job_state.exists() else {}
    for name, obj in parts.stateful.items():
        if name in stored:
            obj.load_state_dict(stored[name])
    consumed = load_consumed_keys(ckpt_dir)
    if resized and ctx.rank == 0:
        record_resize(ctx.folder, {"step": saved["step"], "epoch": saved["epoch"], "from_workers": saved["world"],
                                    "to_workers": ctx.world, "micro_batch": layout.micro_batch,
                                    "accumulation": layout.accumulation, "global_batch": layout.global_batch,
                                    "consumed_in_epoch": len(consumed), "weights_sha256": state_digest(engine.module.state_dict()),
                                    "time": time.time()})  # fmt: skip
    logger.warning("rank %d resumed at step %d (epoch %d, %d rows of it consumed) on %d workers%s", ctx.rank,
                   saved["step"], saved["epoch"], len(consumed), ctx.world,
                   f" (was {saved['world']})" if resized else "")  # fmt: skip
    return (
        engine,
        saved | {"world": ctx.world, "global_batch": layout.global_batch},
        consumed,
        layout,
    )


def _drop_lost_checkpoints(folder: RunFolder, step: int) -> None:
    """Delete the checkpoint folders of steps after `step` (the one resumed from): an attempt that
    died wrote them, but Ray Train never registered them. Left in place, this attempt would write
    its own files of the same step into them and mix its ranks' files with the dead attempt's (a
    stale `zero_pp_rank_1` beside a 1-rank checkpoint). Through the run folder's filesystem: Ray
    Train's checkpoints are in the store on an object-store root; the local mirror's universal
    conversions are dropped as well."""
    import shutil

    import pyarrow.fs as pafs

    def lost(name: str) -> bool:
        return re.fullmatch(r"step\d{8}", name) is not None and int(name[4:]) > step

    for base in [folder.path, folder.remote_path(UNIVERSAL_DIR)]:
        infos = folder.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.Directory and lost(info.base_name):
                logger.warning(
                    "removing %s: written after step %d by an attempt that died", info.path, step
                )
                folder.fs.delete_dir(info.path)
    if folder.remote and (folder.local / UNIVERSAL_DIR).is_dir():
        for path in (folder.local / UNIVERSAL_DIR).iterdir():
            if lost(path.name):
                shutil.rmtree(path, ignore_errors=True)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors (name, dtype, shape, fp32 bytes), in order: the same
    weights give the same digest whatever the number of ranks that trained them."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def collective_device() -> torch.device:
    """Where a tensor must live for this process group's collectives: NCCL takes only CUDA tensors
    (a CPU tensor fails with "No backend type associated with device type cpu"), gloo CPU ones."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _step_metrics(out: Any, engine: Any, world: int) -> dict[str, float]:
    """Loss terms averaged over ranks (one all-reduce), this rank's task metrics, the lr."""
    import torch.distributed as dist

    names = ["loss", *out.terms]
    values = torch.stack(
        [out.loss.detach().float(), *(t.detach().float() for t in out.terms.values())]
    ).to(collective_device())
    if world > 1:
        dist.all_reduce(values)
        values /= world
    metrics = dict(zip(names, values.tolist(), strict=True))
    metrics |= {k: float(v) for k, v in out.metrics.items()}
    metrics["lr"] = engine.get_lr()[0]
    return metrics


def _save_and_report(engine: Any, parts: JobParts, ctx: RunContext, state: dict[str, Any],
                     metrics: dict[str, float], consumed: list[str]) -> None:  # fmt: skip
    """Every rank writes its DeepSpeed shard, its RNG and the keys it consumed in this epoch to a
    local dir; Ray Train merges them into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    tag = f"step{state['step']:08d}"
    with tempfile.TemporaryDirectory(prefix="seedpipe-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=tag, client_state=checkpoint_info())
        torch.save(_rng_state(), Path(tmp, f"rng_rank{ctx.rank}.pt"))
        save_consumed_keys(Path(tmp), ctx.rank, consumed)
        if ctx.rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state | {"tag": tag}))
            Path(tmp, CONFIG_FILE).write_text(ctx.resolved_yaml)
            if parts.stateful:
                Path(tmp, JOB_STATE_FILE).write_text(
                    json.dumps({name: obj.state_dict() for name, obj in parts.stateful.items()})
                )
        ray.train.report({k: v for k, v in metrics.items() if np.isfinite(v)} | {"step": state["step"]},
                         checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=tag)  # fmt: skip


def _kill_once(folder: RunFolder, step: int, checkpoint_every: int) -> None:
    """Fault injection: SIGKILL this process the first time step `kill_at_step` is reached in this
    run, once Ray Train has registered the last checkpoint before it. Ray Train V2's controller
    registers a reported checkpoint when it next polls the workers: a worker that dies before
    that loses it (the run then resumes from an earlier one), a race the tests must not depend on.
    The marker and Ray's snapshot are read in the run folder's store (the restarted rank may be on
    another node)."""
    marker = f"fault_injected_step{step}"
    if folder.exists(marker):
        return
    last = step - step % checkpoint_every
    if last > 0:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f"step{last:08d}" not in (
            folder.read_text("checkpoint_manager_snapshot.json") or ""
        ):
            time.sleep(0.1)
    folder.write_text(marker, str(os.getpid()))
    logger.warning("fault injection: SIGKILL rank process %d at step %d", os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


def _open_tracker(spec: WorkerSpec[Any, Any], ctx: RunContext) -> Any:
    import dataclasses

    from pipelines.tracking import RunTracker, flatten
    from pipelines.tracking.run_tags import job_run_name, job_run_tags

    params = flatten(dataclasses.asdict(spec.config))
    tags = {"job": spec.job.name, "stage": spec.job.name, "corpus": spec.config.corpus,
            "code_version": ctx.code_version, "run_folder": ctx.run_name,
            **job_run_tags(spec.config, spec.input_datasets)}  # fmt: skip
    name = job_run_name(job=spec.job.name, corpus=spec.config.corpus, folder=ctx.run_name, params=params,
                        input_digests=[d.digest for d in spec.input_datasets])  # fmt: skip
    tracker = RunTracker(
        run_dir=ctx.folder, run_name=name, tracking_uri=ctx.tracking_uri, tags=tags
    )
    tracker.log_params(params)
    for ds in spec.input_datasets:
        tracker.log_dataset(**ds.as_kwargs())
    return tracker


def _finish(
    engine: Any, parts: JobParts, spec: WorkerSpec[Any, Any], ctx: RunContext, tracker: Any
) -> None:
    """Export the trained model (gathering ZeRO-3 partitions on all ranks), register it from rank 0."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if spec.config.deepspeed.zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if ctx.rank == 0:
            out = ctx.run_dir / "export"
            parts.export(engine.module, out)
            artifacts = (
                parts.final_artifacts(engine.module, ctx.run_dir) if parts.final_artifacts else []
            )
            for path in artifacts:
                tracker.log_artifact(path, "plots")
            # the run folder in the store holds what the run made, like a local one
            for name in ("export", METRICS_LOG, *(Path(p).name for p in artifacts)):
                if (ctx.run_dir / name).exists():
                    ctx.folder.push(name)
            _register(spec, ctx, tracker, out)
    if tracker:
        tracker.close()


def _register(spec: WorkerSpec[Any, Any], ctx: RunContext, tracker: Any, out: Path) -> None:
    from jobs.export import ModelExportDeferred, log_seed_model

    record = REGISTERED_FILE
    try:
        info = log_seed_model(tracker, out, kind=spec.job.export_kind, registered_name=spec.config.register_as,
                              input_datasets=[d.as_kwargs() for d in spec.input_datasets])  # fmt: skip
    except ModelExportDeferred as deferred:
        # The model is trained and saved: a tracking outage must not fail (and so re-run) the job.
        logger.error("%s", deferred)
        ctx.folder.write_text(record, json.dumps({"deferred": str(deferred)}))
        return
    ctx.folder.write_text(record, json.dumps({"uri": info.model_uri, "digest": info.digest}))
