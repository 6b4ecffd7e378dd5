"""Stage-2 training cost: cached causal embeddings vs per-step ViT + Q-Former; Ray Train vs a plain loop.

Usage::

    .venv/bin/python benchmarks/bench_training.py [--batch-size 32] [--steps 20] [--warmup 3]
        [--threads 1] [--job-batch-size 32] [--job-steps 60] [--workers 1 2]
        [--plain-threads 1] [--log-every 10] [--seed 0] [--skip-model] [--skip-loop]

One run, the `small` preset in RANDOM INIT (no weights are on disk here; step times depend on
shapes only), two measurements printed as ratios:

1. Model cost, in-process, plain torch AdamW + grad clipping, `--threads` torch threads: the
   stage-2 step (`Stage2Task`: quantizer + decoders, Q-Former frozen) from cached causal
   embeddings (fp16, like the qembeds dataset: what seedpipe trains on) vs the same step
   recomputing the frozen vision encoder on preprocessed pixels + the frozen Q-Former every step
   (what the public SEED code does every epoch). Same tokenizer weights, same batches, `--warmup`
   untimed steps each, then `--steps` timed steps each, alternating step by step (ABBA order) so
   that load from other processes hits both alike; medians, which shrug off load bursts. JPEG
   decode and preprocessing are *not* in the recompute step (pixels are prepared once), nor is the
   target encoder (targets are fixed): the speedup is a lower bound of what caching saves.
2. Distribution-layer overhead: a tmp catalog (raw fixture -> `small` features -> a random
   CausalQFormer saved with save_pretrained as the stage-1 model -> qembeds), the real stage-2 job
   (`jobs.train_tokenizer.main(["--stage", "2", ...])`: Ray Train + DeepSpeed ZeRO-2, gloo) on
   `--workers` workers of 1 CPU each, vs a plain single-process loop over the same qembeds parquet
   read with pyarrow, the same model and collate (`Stage2Job().build`), optimizer, schedule and batch
   size, on `--plain-threads` torch threads (1 by default: the same as a 1-CPU Ray worker gets).
   The job's rate is its own `samples_per_s` from metrics.jsonl (timed from the first batch
   request: it excludes worker start-up and DeepSpeed init but includes the first batch's wait
   on Ray Data); a steady rate between the first and last logged step and the wall time of the
   whole `main()` call are reported beside it.

1 torch thread by default for both: on a machine shared with other processes, multi-threaded
CPU timings are erratic (OpenMP threads wait on each other whenever a core is taken).

Each phase also reports the share of the machine's CPU that other processes used meanwhile: on a
shared machine only phases near 0% are comparable in absolute terms. Defaults take under 6 minutes
on 2 cores shared with a test suite (load average ~15), less on an idle machine; `--steps`/`--job-steps`/`--batch-size`/`--job-batch-size` scale it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRESET = "small"
CORPUS = "bench"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# ---- how busy the machine was: our process tree vs everyone else ---------------------------
class CpuShare:
    """Share of the machine's CPU used by processes outside this one's tree during a phase.

    Samples the tree once a second (cheap) so that CPU of children that exit during the phase
    (Ray workers) is still counted.
    """

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.share = 0.0
        self.wall_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    def _sample(self, into: dict[int, float]) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            into[proc.pid] = t.user + t.system + t.children_user + t.children_system

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample(self.last)

    def __enter__(self) -> CpuShare:
        self._sample(self.first)
        self._busy0, self._t0 = self._busy(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self.last)
        self.wall_s = time.perf_counter() - self._t0
        ours = sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())
        others = self._busy() - self._busy0 - ours
        self.share = max(0.0, others) / (self.wall_s * (os.cpu_count() or 1))


# ---- 1. cached embeddings vs recomputing ViT + Q-Former -------------------------------------
@dataclass
class ModelResult:
    cached_ms: list[float]
    """ms of each timed step, cached-embeddings path."""
    recompute_ms: list[float]
    vit_params: int
    qformer_params: int
    trainable_params: int
    tokens: int
    others: float

    @property
    def cached(self) -> float:
        return statistics.median(self.cached_ms)

    @property
    def recompute(self) -> float:
        return statistics.median(self.recompute_ms)


def _adamw(task: Any, lr: float = 1e-4) -> Any:
    import torch

    from jobs.trainer import param_groups

    return torch.optim.AdamW(param_groups(task, 0.05), lr=lr, betas=(0.9, 0.999))


def _step(task: Any, optimizer: Any, batch: dict[str, Any], grad_clip: float = 1.0) -> float:
    """One stage-2 step as the job does it: forward, backward, clip, AdamW; returns the loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    out = task(batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], grad_clip
    )
    optimizer.step()
    return out.loss.item()


def bench_model(*, batch_size: int, steps: int, warmup: int, threads: int, seed: int,
                pool: int = 4) -> ModelResult:  # fmt: skip
    import numpy as np
    import torch

    from seed_core.encoders import load_vision_encoder, preprocess_images
    from seed_core.presets import get_preset
    from seed_core.qformer import CausalQFormer
    from seed_core.tasks import Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    torch.set_num_threads(threads)
    preset = get_preset(PRESET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomInitWarning: expected, said in the header
        vision = load_vision_encoder(preset.vision)
    assert vision.is_random_init
    torch.manual_seed(seed)
    tok_cfg = preset.tokenizer
    cached_task = Stage2Task(SeedTokenizer.from_qformer(CausalQFormer(tok_cfg.qformer), tok_cfg))
    recompute_task = copy.deepcopy(cached_task)  # the same initial weights on both paths
    cached_opt, recompute_opt = _adamw(cached_task), _adamw(recompute_task)
    cached_task.train()
    recompute_task.train()

    # A pool of batches, prepared once: pixels (decode + preprocess done), targets, and the
    # cached causal embeddings in fp16 as the qembeds dataset stores them.
    rng = np.random.default_rng(seed)
    side = preset.vision.image_size
    target_dim = preset.target.projection_dim
    batches = []
    for _ in range(pool):
        images = [rng.integers(0, 256, (side * 5 // 4, side * 3 // 2, 3), dtype=np.uint8)
                  for _ in range(batch_size)]  # fmt: skip
        pixels = preprocess_images(images, image_size=side)
        target = torch.from_numpy(rng.standard_normal((batch_size, target_dim), dtype=np.float32))
        with torch.no_grad():
            embeds = cached_task.tokenizer.embed(vision(pixels)).half()
        batches.append((pixels, embeds, target))

    def cached_step(i: int) -> float:
        _, embeds, target = batches[i % pool]
        return _step(cached_task, cached_opt,
                     {"causal_embeds": embeds, "target_image_embed": target})  # fmt: skip

    def recompute_step(i: int) -> float:
        pixels, _, target = batches[i % pool]
        # the ViT on the pixels (no grad, frozen), then Stage2Task runs the frozen Q-Former on
        # the patch features itself: the path SEED's training code takes every step
        return _step(recompute_task, recompute_opt,
                     {"patch_features": vision(pixels), "target_image_embed": target})  # fmt: skip

    for i in range(warmup):
        cached_step(i)
        recompute_step(i)
    cached_ms: list[float] = []
    recompute_ms: list[float] = []
    with CpuShare() as cpu:
        for i in range(steps):
            order = [(cached_step, cached_ms), (recompute_step, recompute_ms)]
            for fn, out in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn(warmup + i)
                out.append((time.perf_counter() - start) * 1000)
    return ModelResult(
        cached_ms=cached_ms,
        recompute_ms=recompute_ms,
        vit_params=sum(p.numel() for p in vision.parameters()),
        qformer_params=sum(p.numel() for p in cached_task.tokenizer.qformer.parameters()),
        trainable_params=sum(p.numel() for p in cached_task.parameters() if p.requires_grad),
        tokens=preset.vision.num_tokens,
        others=cpu.share,
    )


# ---- 2. Ray Train + DeepSpeed job vs a plain loop -------------------------------------------
@dataclass
class LoopResult:
    name: str
    count: int
    """Workers of a job, torch threads of a plain loop."""
    samples_per_s: float
    """From the first batch request to the last step (the job's own `samples_per_s`)."""
    steady_per_s: float
    """Between the first and the last logged step (no first-batch latency)."""
    wall_s: float
    """The whole call: for the job, config + prepare + Ray Train start + loop + checkpoint + export."""
    loop_s: float
    first_s: float
    """Seconds to the first logged step (the first `log_every` steps, first batch wait included)."""
    others: float
    note: str


def make_catalog(root: str, tmp: str, *, rows: int, seed: int) -> tuple[str, dict[str, float]]:
    """raw fixture -> small features -> random stage-1 Q-Former -> qembeds; returns (stage1 dir, timings)."""
    import torch

    from pipelines import features, qembeds
    from pipelines.catalog import Catalog
    from pipelines.features import FeaturesConfig
    from pipelines.qembeds import QEmbedsConfig
    from pipelines.stage import Resources
    from seed_core.presets import get_preset
    from seed_core.qformer import CausalQFormer
    from tests.raw_fixture import make_raw_corpus

    times = {}
    shards = 4
    start = time.perf_counter()
    make_raw_corpus(Catalog(root), CORPUS, num_shards=shards, per_shard=math.ceil(rows / shards))
    times["raw fixture"] = time.perf_counter() - start
    resources = Resources(num_workers=2, batch_size=64)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = features.run(
            FeaturesConfig(root=root, corpus=CORPUS, encoder=PRESET, resources=resources)
        )
    assert made.ok, made
    times["features (small encoders)"] = time.perf_counter() - start
    stage1 = Path(tmp, "stage1-random")
    torch.manual_seed(seed)
    CausalQFormer(get_preset(PRESET).tokenizer.qformer).save_pretrained(stage1)
    start = time.perf_counter()
    made = qembeds.run(QEmbedsConfig(root=root, corpus=CORPUS, features=PRESET, stage1=str(stage1),
                                     resources=resources))  # fmt: skip
    assert made.ok, made
    times["qembeds"] = time.perf_counter() - start
    return str(stage1), times


def job_overrides(root: str, stage1: str, *, workers: int, batch_size: int, steps: int, log_every: int,
                  seed: int) -> list[str]:  # fmt: skip
    return [f"root={root}", f"corpus={CORPUS}", f"stage1={stage1}", f"preset={PRESET}",
            "holdout=0", "eval_every=0", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1",
            f"run.name=bench-w{workers}", f"run.checkpoint_every={steps}", f"run.log_every={log_every}",
            f"run.seed={seed}", f"optim.max_steps={steps}", f"optim.batch_size_per_worker={batch_size}",
            "deepspeed.zero_stage=2", "deepspeed.precision=fp32"]  # fmt: skip


def _rates(points: list[tuple[int, float]], batch: int) -> tuple[float, float]:
    """(cumulative, steady) samples/s from (step, seconds since the loop's start) points."""
    (s0, t0), (s1, t1) = points[0], points[-1]
    steady = (s1 - s0) * batch / (t1 - t0) if s1 > s0 else float("nan")
    return s1 * batch / t1, steady


def run_job(root: str, stage1: str, *, workers: int, batch_size: int, steps: int, log_every: int,
            seed: int) -> LoopResult:  # fmt: skip
    from jobs import train_tokenizer

    argv = ["--stage", "2", *job_overrides(root, stage1, workers=workers, batch_size=batch_size,
                                           steps=steps, log_every=log_every, seed=seed)]  # fmt: skip
    with CpuShare() as cpu:
        start = time.perf_counter()
        rc = train_tokenizer.main(argv)
        wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"stage-2 job with {workers} worker(s) failed (rc {rc})")
    records = [json.loads(line) for line in
               Path(root, "runs", f"bench-w{workers}", "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    global_batch = batch_size * workers
    # samples_per_s = step * global batch / seconds since the loop's start: invert it per record
    points = [(r["step"], r["step"] * global_batch / r["metrics"]["samples_per_s"])
              for r in records if "samples_per_s" in r["metrics"]]  # fmt: skip
    assert points and points[-1][0] == steps, points
    cumulative, steady = _rates(points, global_batch)
    return LoopResult(
        name=f"Ray Train + DeepSpeed, {_plural(workers, 'worker')}",
        count=workers,
        samples_per_s=cumulative,
        steady_per_s=steady,
        wall_s=wall,
        loop_s=points[-1][1],
        first_s=points[0][1],
        others=cpu.share,
        note=f"ZeRO-2 fp32, gloo, 1 CPU + 1 torch thread per worker, batch {batch_size}/worker"
        f" (global {global_batch})",
    )


def _arrow_batches(files: list[str], columns: list[str], batch_size: int) -> Iterator[Any]:
    """Full `batch_size`-row Arrow tables over the files, in order, forever (epochs), drop_last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    while True:
        pending: list[Any] = []
        rows = 0
        for path in files:
            for record_batch in pq.ParquetFile(path).iter_batches(
                batch_size=batch_size, columns=columns
            ):
                pending.append(record_batch)
                rows += record_batch.num_rows
                while rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, batch_size)
                    rest = table.slice(batch_size)
                    pending, rows = rest.to_batches(), rest.num_rows


def run_plain(root: str, stage1: str, *, threads: int, batch_size: int, steps: int, log_every: int,
              seed: int, tag: str = "") -> LoopResult:  # fmt: skip
    """The job's model, collate, optimizer and schedule, in one process with no Ray or DeepSpeed."""
    import torch

    from jobs.job import RunContext, run_location
    from jobs.stage2 import Stage2Job, Stage2JobConfig
    from jobs.trainer import lr_lambda, param_groups
    from pipelines.config import load_config, to_yaml

    torch.set_num_threads(threads)
    with CpuShare() as cpu:
        start = time.perf_counter()
        config = load_config(Stage2JobConfig, None, job_overrides(
            root, stage1, workers=1, batch_size=batch_size, steps=steps, log_every=log_every, seed=seed))  # fmt: skip
        job = Stage2Job()
        prepared = job.prepare(config)
        name, storage = run_location(config, job.name)
        # what jobs.launch hands rank 0 of 1 (the plain loop logs nowhere: no tracking URI)
        context = RunContext(run_name=name, storage_path=storage, tracking_uri="", code_version="",
                             resolved_yaml=to_yaml(config))  # fmt: skip
        torch.manual_seed(seed)  # rank 0's seed in the job
        parts = job.build(config, prepared.inputs, context)
        optim = config.optim
        optimizer = torch.optim.AdamW(param_groups(parts.task, optim.weight_decay), lr=optim.lr,
                                      betas=tuple(optim.betas))  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(s, lr=optim.lr, warmup_start_lr=optim.warmup_start_lr,
                                warmup_steps=optim.warmup_steps, max_steps=optim.max_steps,
                                min_lr=optim.min_lr),
        )  # fmt: skip
        params = [p for g in optimizer.param_groups for p in g["params"]]
        task = parts.task.train()
        columns = ["causal_embeds", prepared.inputs.target]
        points = []
        loop_start = time.perf_counter()
        batches = _arrow_batches(prepared.train_files, columns, batch_size)
        for step in range(1, steps + 1):
            batch = parts.collate(next(batches))
            optimizer.zero_grad(set_to_none=True)
            out = task(batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
            schedule.step()
            out.loss.item()  # the job reads its loss terms every step too
            parts.on_step(task, out, step)  # codebook-usage accounting, as in the job
            if step % log_every == 0 or step == steps:
                points.append((step, time.perf_counter() - loop_start))
        wall = time.perf_counter() - start
    cumulative, steady = _rates(points, batch_size)
    return LoopResult(
        name=f"plain PyTorch loop, {_plural(threads, 'thread')}{tag}",
        count=threads,
        samples_per_s=cumulative,
        steady_per_s=steady,
        wall_s=wall,
        loop_s=points[-1][1],
        first_s=points[0][1],
        others=cpu.share,
        note=f"pyarrow read + the job's collate/model/AdamW/schedule, batch {batch_size}",
    )


def ray_worker_threads() -> int:
    """torch threads in a 1-CPU Ray worker (Ray sets OMP_NUM_THREADS to the worker's CPUs)."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- main -----------------------------------------------------------------------------------
def _ratio_line(label: str, a: float, b: float, width: int = 44) -> str:
    return f"  {label:<{width}s} {a / b:6.2f} x"


def _print_model(m: ModelResult, args: argparse.Namespace) -> None:
    print(f"\n== 1. stage-2 step, {args.batch_size} images/step, {_plural(args.threads, 'torch thread')}, "
          f"plain torch AdamW in-process ({args.steps} timed steps each after {args.warmup} warm-up, "
          f"alternating step by step; others' CPU meanwhile {m.others:.0%}) ==")  # fmt: skip
    print(f"  trainable (quantizer + decoders) {m.trainable_params / 1e6:.2f} M params; frozen ViT "
          f"{m.vit_params / 1e6:.2f} M ({m.tokens} tokens), frozen Q-Former {m.qformer_params / 1e6:.2f} M")  # fmt: skip
    print(f"  {'ms/step':<44s} {'median':>8s} {'mean':>8s} {'min':>8s} {'max':>8s}")
    for name, times in (
        ("cached causal embeddings (seedpipe)", m.cached_ms),
        ("ViT + Q-Former every step (public SEED)", m.recompute_ms),
    ):
        print(f"  {name:<44s} {statistics.median(times):8.1f} {statistics.fmean(times):8.1f} "
              f"{min(times):8.1f} {max(times):8.1f}")  # fmt: skip
    print(_ratio_line("speedup from caching (recompute / cached)", m.recompute, m.cached)
          + f"   (medians; means {statistics.fmean(m.recompute_ms) / statistics.fmean(m.cached_ms):.2f} x, "
            f"fastest steps {min(m.recompute_ms) / min(m.cached_ms):.2f} x)")  # fmt: skip
    print(f"  frozen ViT + Q-Former forward per step: {m.recompute - m.cached:.0f} ms (medians), "
          f"{1 - m.cached / m.recompute:.0%} of the recompute step; decode, preprocessing and the "
          "target encoder, which SEED's loop also runs per step, are not counted")  # fmt: skip


def _print_loops(plains: list[LoopResult], jobs: list[LoopResult], catalog_times: dict[str, float],
                 rows: int, worker_threads: int, args: argparse.Namespace) -> None:  # fmt: skip
    print(f"\n== 2. Ray Train + DeepSpeed stage-2 job vs a plain loop, {args.job_steps} steps, "
          f"qembeds of {rows} rows ({PRESET} features, random stage-1 Q-Former) ==")  # fmt: skip
    print("  catalog: " + ", ".join(f"{k} {v:.0f} s" for k, v in catalog_times.items()))
    print(f"  Ray workers get {_plural(worker_threads, 'torch thread')} each (Ray sets OMP_NUM_THREADS to a "
          f"worker's CPUs)")  # fmt: skip
    first = f"1st {args.log_every} s"
    print(f"  {'':<36s} {'samples/s':>9s} {'steady':>7s} {first:>9s} {'loop s':>7s} {'wall s':>7s} "
          f"{'others':>7s}   knobs")  # fmt: skip
    for r in [*plains, *jobs]:
        print(f"  {r.name:<36s} {r.samples_per_s:9.1f} {r.steady_per_s:7.1f} {r.first_s:9.1f} "
              f"{r.loop_s:7.1f} {r.wall_s:7.1f} {r.others:7.0%}   {r.note}")  # fmt: skip
    print("  samples/s: from the first batch request to the last step (the job's metrics.jsonl "
          "`samples_per_s`: worker start-up and DeepSpeed init excluded, the wait for the first "
          f"batch included); steady: from the first logged step ({args.log_every}) to the last; "
          f"{first}: seconds to step {args.log_every}; loop s: first batch request to last step; "
          "wall s: the whole call, start-up, final checkpoint, export and MLflow registration "
          "included (Ray itself was already up)")  # fmt: skip
    by_threads: dict[int, list[LoopResult]] = {}
    for plain in plains:
        by_threads.setdefault(plain.count, []).append(plain)
    print("\n  ratios job / plain loop (samples/s; < 1: the distribution layer costs throughput; a "
          "plain loop run twice counts as the mean of its runs)")  # fmt: skip
    for job in jobs:
        for threads, group in by_threads.items():
            rate, steady, wall = (statistics.fmean(getattr(p, k) for p in group)
                                  for k in ("samples_per_s", "steady_per_s", "wall_s"))  # fmt: skip
            label = f"{_plural(job.count, 'worker')} / plain {_plural(threads, 'thread')}"
            print(_ratio_line(label, job.samples_per_s, rate)
                  + f"   steady {job.steady_per_s / steady:.2f} x, wall {job.wall_s / wall:.2f} x")  # fmt: skip
    print("  job time outside the loop (start-up, final checkpoint, export, registration): "
          + ", ".join(f"{_plural(j.count, 'worker')} {j.wall_s - j.loop_s:.0f} s" for j in jobs)
          + f"; first-batch wait: up to step {args.log_every} the jobs took "
          + ", ".join(f"{j.first_s:.1f} s" for j in jobs)
          + f" vs {plains[0].first_s:.1f} s for the plain loop")  # fmt: skip
    cores = os.cpu_count() or 1
    if any(j.count > 1 for j in jobs):
        print(f"  NOTE: on {cores} CPU cores the gloo workers (plus Ray Data's read tasks and the "
              "raylet) compete for the same cores as each other, so a multi-worker ratio measures the "
              "distribution layer's overhead (all-reduce of gradients and metrics, ZeRO-2 partitions, "
              "Ray Data streaming split), not scaling. On a machine shared with other processes, "
              "N busy processes also get a larger share of it than the plain loop's one.")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("1. cached embeddings vs recompute (in-process)")
    group.add_argument("--batch-size", type=int, default=32, help="images per step")
    group.add_argument("--steps", type=int, default=20, help="timed steps per path")
    group.add_argument("--warmup", type=int, default=3, help="untimed steps per path first")
    group.add_argument("--threads", type=int, default=1,
                       help="torch threads (1: multi-threaded timings are erratic on a shared machine)")  # fmt: skip
    group = parser.add_argument_group("2. Ray Train + DeepSpeed job vs a plain loop")
    group.add_argument("--job-batch-size", type=int, default=32, help="batch per worker")
    group.add_argument("--job-steps", type=int, default=60, help="optimizer steps per run")
    group.add_argument("--log-every", type=int, default=10, help="job's run.log_every")
    group.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="job runs")
    group.add_argument("--plain-threads", type=int, nargs="+", default=[1],
                       help="plain loop runs (torch threads); the first is the baseline")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-model", action="store_true", help="skip measurement 1")
    parser.add_argument("--skip-loop", action="store_true", help="skip measurement 2")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.threads, args.job_batch_size,
           args.job_steps, args.log_every, *args.workers, *args.plain_threads) < 1 or args.warmup < 0:  # fmt: skip
        parser.error("sizes, steps, threads and workers must be >= 1, --warmup >= 0")
    if args.job_steps < 2 * args.log_every:
        parser.error(
            "--job-steps must be >= 2 * --log-every (the steady rate needs two log points)"
        )

    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT))  # `tests.raw_fixture` is not part of the installed package
    import torch

    from seed_core.presets import get_preset

    preset = get_preset(PRESET)
    print(f"machine: {cores} CPUs, torch {torch.__version__}, 1-min load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)  # fmt: skip
    print(f"model: preset '{PRESET}' in RANDOM INIT (no pretrained weights offline; step times depend "
          f"on shapes only): ViT {preset.vision.num_layers} x {preset.vision.hidden_size} on "
          f"{preset.vision.image_size}x{preset.vision.image_size}, Q-Former "
          f"{preset.tokenizer.qformer.num_layers} x {preset.tokenizer.qformer.hidden_size}, "
          f"{preset.tokenizer.quantizer.num_codes} codes x {preset.tokenizer.quantizer.code_dim}",
          flush=True)  # fmt: skip

    model = None
    if not args.skip_model:
        print("\n1. timing the stage-2 step, cached vs recompute ...", flush=True)
        model = bench_model(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                            threads=args.threads, seed=args.seed)  # fmt: skip
        _print_model(model, args)

    if not args.skip_loop:
        import ray

        from jobs.deepspeed_ops import configure_environment
        from pipelines.cli_common import WORKER_ENV_KEYS

        saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
        with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
            root = f"{tmp}/root"
            # every MLflow run of the stages and jobs lands in the temp dir, never the user's store
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            configure_environment()
            # cli_common.ensure_ray's local Ray (>= 4 logical CPUs so that 2 training workers leave
            # room for Ray Data's read tasks), with worker logs kept out of this report
            env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
            start = time.perf_counter()
            ray.init(num_cpus=max(4, cores), runtime_env={"env_vars": env}, include_dashboard=False,
                     log_to_driver=False)  # fmt: skip
            ray.data.DataContext.get_current().enable_progress_bars = False
            print(f"\n2. local Ray up in {time.perf_counter() - start:.1f} s", flush=True)
            try:
                worker_threads = ray_worker_threads()
                # enough rows that no run starts a second epoch (a margin for the split's rounding)
                rows = math.ceil(args.job_steps * args.job_batch_size * max(args.workers) * 1.1)
                print(f"building the catalog ({rows} rows) ...", flush=True)
                stage1, catalog_times = make_catalog(root, tmp, rows=rows, seed=args.seed)
                knobs = dict(batch_size=args.job_batch_size, steps=args.job_steps,
                             log_every=args.log_every, seed=args.seed)  # fmt: skip
                plains: list[LoopResult] = []
                jobs: list[LoopResult] = []
                # plain, jobs, plain again on other thread counts: drift hits both sides
                # the baseline plain loop before and after the jobs (drift check, its mean is the
                # baseline), then other thread counts
                base = args.plain_threads[0]
                runs: list[tuple[str, Callable[[], LoopResult], list[LoopResult]]] = [
                    (f"plain loop, {_plural(base, 'thread')}",
                     lambda: run_plain(root, stage1, threads=base, tag=", before", **knobs), plains),
                    *((f"stage-2 job, {_plural(w, 'worker')}",
                       lambda w=w: run_job(root, stage1, workers=w, **knobs), jobs) for w in args.workers),
                    (f"plain loop, {_plural(base, 'thread')}, again",
                     lambda: run_plain(root, stage1, threads=base, tag=", after", **knobs), plains),
                    *((f"plain loop, {_plural(t, 'thread')}",
                       lambda t=t: run_plain(root, stage1, threads=t, **knobs), plains)
                      for t in dict.fromkeys(args.plain_threads) if t != base),
                ]  # fmt: skip
                for label, fn, out in runs:
                    print(f"running {label} ...", flush=True)
                    out.append(fn())
            finally:
                ray.shutdown()
                if saved_uri is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = saved_uri
        if model is not None:
            _print_model(model, args)  # again, next to part 2, for one readable report
        _print_loops(plains, jobs, catalog_times, rows, worker_threads, args)
    print(f"\n1-min load average {os.getloadavg()[0]:.2f} at the end; absolute rates are comparable "
          "only where others' CPU is near 0%; the ratios were measured side by side")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
