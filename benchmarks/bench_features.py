"""The Ray Data features stage vs a plain webdataset + DataLoader loop vs the JPEG decode floor.

Usage::

    .venv/bin/python benchmarks/bench_features.py [--shard-size 256] [--num-shards 2] [--scale 4]
        [--num-workers 2] [--batch-size 32] [--ray-worker-niceness 0]
        [--loader-workers 1] [--torch-threads 0 1]

One run, one synthetic raw corpus (varied 256x256 JPEGs of random shapes + noise, captions,
written with `tests.raw_fixture.write_raw_shard` like ingest writes them), the `small` preset's
encoders in RANDOM INIT (no weights are on disk here; throughput depends on shapes only):

1. Ray stage: `pipelines.features.run` on a fresh root and feature set, a fresh local Ray with
   `--ray-cpus` CPUs per run, `Resources(num_workers, batch_size)`; on N and on scale*N images.
   Ray starts its workers at nice 15 (its `worker_niceness` default) unless told otherwise.
2. Plain loop: what clip-retrieval does. `webdataset` reads the same tars, a torch DataLoader
   (`--loader-workers` processes, 1 torch thread each) decodes with PIL and runs
   `preprocess_images`; the main process runs vision + target encoder on batches of the same
   size and saves float16 .npy outputs; on torch's default thread count (one per core: the
   headline, what clip-retrieval gets) and again on 1 thread (what each Ray actor gets).
3. Decode floor: PIL decode + bicubic resize to the encoder input size only, no model, on 1
   thread and on all cores (PIL releases the GIL); no CPU pipeline can beat it.
4. Peak memory of the Ray stage at N and scale*N images (must not grow with the corpus).

Prints a table of rates, the ratios, where the Ray stage's time goes, and the memory peaks.
Defaults take about 1.5 minutes on 2 idle cores; `--shard-size`/`--num-shards`/`--scale` scale
it up. Each rate comes with the share of the CPUs that other processes used meanwhile: on a
shared machine, only rates measured near 0% are comparable.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET = "small"
NICENESS_ENV = "RAY_worker_niceness"  # Ray config env vars are case-sensitive: RAY_<config name>
SHAPES = ("circle", "square", "triangle", "bar")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


# ---- corpus ---------------------------------------------------------------------------------
def make_sample(rng: np.random.Generator, size: int) -> tuple[bytes, str]:
    """A JPEG of a gradient background, 2-6 random shapes and sensor-like noise, and its caption.

    Noise keeps the JPEGs photo-sized (~20-30 KB at 256x256, q90) so that decoding is real work.
    """
    from PIL import Image, ImageDraw

    names = list(COLOURS)
    bg_a, bg_b = rng.choice(len(names), 2, replace=False)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    bg = (1 - ramp) * np.array(COLOURS[names[bg_a]]) + ramp * np.array(COLOURS[names[bg_b]])
    img = Image.fromarray(np.broadcast_to(bg, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    words = []
    for _ in range(int(rng.integers(2, 7))):
        colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        x1, y1 = x0 + rng.integers(size // 8, size // 2), y0 + rng.integers(size // 8, size // 2)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
        elif shape == "bar":
            draw.rectangle((x0, y0, x1, y0 + (y1 - y0) // 4), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        words.append(f"a {colour} {shape}")
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 10, (size, size, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    caption = " and ".join(words) + f" on a {names[bg_a]} to {names[bg_b]} background"
    return buf.getvalue(), caption


def write_corpora(root: str, *, shard_size: int, num_shards: int, scale: int, image_size: int,
                  seed: int) -> dict[str, int]:  # fmt: skip
    """Corpus 'bench-n' = the first num_shards shards of 'bench-{scale}n' (same bytes)."""
    from pipelines.catalog import Catalog
    from tests.raw_fixture import write_raw_shard

    catalog = Catalog(root)
    rng = np.random.default_rng(seed)
    small, large = "bench-n", f"bench-{scale}n"
    for shard in range(num_shards * scale):
        samples = []
        for i in range(shard_size):
            image, caption = make_sample(rng, image_size)
            samples.append((f"{shard:05d}{i:04d}", image, caption))
        write_raw_shard(catalog, large, shard, samples)
        if shard < num_shards:
            write_raw_shard(catalog, small, shard, samples)
    return {small: num_shards * shard_size, large: num_shards * scale * shard_size}


def raw_tars(root: str, corpus: str) -> list[str]:
    from pipelines.catalog import Catalog

    catalog = Catalog(root)
    raw = catalog.raw_dir(corpus)
    return [f"{raw}/{r.files[0]}" for _, r in sorted(catalog.committed(raw).items())]


# ---- process-tree monitor: peak memory, our CPU vs everyone else's -------------------------
@dataclass
class TreeStats:
    """What a TreeMonitor saw over one phase. Memory in MiB: peaks of the *summed* group."""

    rss: float = 0.0
    pss: float = 0.0
    driver_rss: float = 0.0
    max_worker_rss: float = 0.0
    system_rss: float = 0.0
    max_workers_alive: int = 0
    samples: int = 0
    wall_s: float = 0.0
    our_cpu_s: float = 0.0
    """CPU seconds of the driver and its descendants during the phase."""
    others_cpu_share: float = 0.0
    """Busy CPU not ours (other tenants, steal) / (wall * cores): 0 on a quiet machine."""
    first_seen: dict[str, float] = field(default_factory=dict)
    """Process title substring -> seconds after the phase start when first seen."""
    niceness: dict[str, int] = field(default_factory=dict)


class TreeMonitor:
    """Samples the driver's process tree with psutil every `interval_s` in a background thread.

    psutil over the tree rather than Ray's memory stats: `ray memory` reports object-store
    references, not process memory, and a local Ray's every process (gcs_server, raylet, its
    agents, and the raylet's `ray::` workers: the MapWorker actors, Ray Data's helper actors,
    IDLE prestarted workers) descends from the driver. The headline is the peak over time of the
    summed RSS of the driver + the `ray::` worker processes (not the Agent ones). RSS counts
    shared pages (torch's libraries, the object store's shared memory) once per process, so the
    summed PSS, which splits shared pages among their users, is printed too (it costs ~1-3 ms a
    process to read, so it is sampled every 10th time). Ray's own daemons (gcs_server, raylet,
    agents, monitors) are summed separately: they are there whatever the job.
    """

    WATCH = ("MapWorker",)

    def __init__(self, interval_s: float = 0.1, pss_every: int = 10) -> None:
        import psutil

        self.psutil = psutil
        self.driver = psutil.Process()
        self.interval_s, self.pss_every = interval_s, pss_every
        self.stats = TreeStats()
        self._procs: dict[int, object] = {}
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._start = time.perf_counter()
        self._busy_start = self._busy()
        for proc in self._tree():  # CPU already spent before the phase is not the phase's
            self._cpu_first[proc.pid] = self._cpu(proc) or 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(pss=False)
        s = self.stats
        s.wall_s = time.perf_counter() - self._start
        s.our_cpu_s = sum(
            last - self._cpu_first.get(pid, 0.0) for pid, last in self._cpu_last.items()
        )
        others = self._busy() - self._busy_start - s.our_cpu_s
        s.others_cpu_share = max(0.0, others) / (s.wall_s * (os.cpu_count() or 1))

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    def _tree(self) -> list:
        return [self.driver, *self.driver.children(recursive=True)]

    def _cpu(self, proc: object) -> float | None:
        try:
            t = proc.cpu_times()  # type: ignore[attr-defined]
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            return None
        return t.user + t.system

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample(pss=self.stats.samples % self.pss_every == 0)

    def sample(self, pss: bool) -> None:
        mib, s = 1 << 20, self.stats
        rss = pss_sum = system = 0.0
        workers = 0
        now = time.perf_counter() - self._start
        for proc in self._tree():
            try:
                title = "driver" if proc is self.driver else proc.cmdline()[0]
                mem = proc.memory_full_info() if pss else proc.memory_info()
                cpu = self._cpu(proc)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, IndexError):
                continue  # a worker exiting between the listing and the read
            if cpu is not None:
                self._cpu_last[proc.pid] = cpu
            for watched in self.WATCH:
                if watched in title:
                    s.first_seen.setdefault(watched, now)
                    s.niceness.setdefault(watched, proc.nice())
            if proc is self.driver or (title.startswith("ray::") and "Agent" not in title):
                rss += mem.rss / mib
                pss_sum += getattr(mem, "pss", 0) / mib
                if proc is self.driver:
                    s.driver_rss = max(s.driver_rss, mem.rss / mib)
                else:
                    workers += 1
                    s.max_worker_rss = max(s.max_worker_rss, mem.rss / mib)
            else:
                system += mem.rss / mib
        s.rss, s.pss, s.system_rss = max(s.rss, rss), max(s.pss, pss_sum), max(s.system_rss, system)
        s.max_workers_alive = max(s.max_workers_alive, workers)
        s.samples += 1


# ---- 1. the Ray Data features stage ---------------------------------------------------------
@dataclass
class RayRun:
    images: int
    init_s: float
    """ray.init (a fresh local Ray)."""
    stage_s: float
    """`StageResult.seconds`: actors' start + model load + every shard (the stage's images/s)."""
    call_s: float
    """The whole `features.run` call: plan + MLflow run + the stage."""
    first_worker_s: float
    """run() called -> the first MapWorker actor process is seen."""
    first_commit_s: float
    """run() called -> the first shard's completion record."""
    steady_rate: float
    """Images/s once every actor has committed a shard (nan if too few shards)."""
    tree: TreeStats

    @property
    def rate(self) -> float:
        return self.images / self.stage_s


def run_ray_stage(root: str, corpus: str, *, images: int, num_workers: int, batch_size: int,
                  ray_cpus: int) -> RayRun:  # fmt: skip
    import ray

    from pipelines import features
    from pipelines.catalog import DONE_SUFFIX, Catalog
    from pipelines.cli_common import WORKER_ENV_KEYS
    from pipelines.stage import Resources

    start = time.perf_counter()
    # cli_common.ensure_ray's init, with the CPU count pinned so that the run does not depend on
    # what Ray detects; worker logs stay in the session folder (a failed shard fails the assert).
    env = {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}
    ray.init(num_cpus=ray_cpus, runtime_env={"env_vars": env}, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - start
    try:
        with TreeMonitor() as monitor:
            called = time.time()
            result = features.run(features.FeaturesConfig(root=root, corpus=corpus, encoder=PRESET, feature_set="bench-small",
                                  resources=Resources(num_workers=num_workers, batch_size=batch_size)))  # fmt: skip
    finally:
        ray.shutdown()  # kills the actors: the next measurement starts from a quiet machine
    assert result.ok and result.rows_out == images, (result.failed_shards, result.rows_out, images)

    # Where the time goes, from the completion records' mtimes (each is written as its shard ends)
    catalog = Catalog(root)
    out = catalog.stage_dir(corpus, "features", "bench-small")
    done = sorted((os.stat(f"{out}/{sid}{DONE_SUFFIX}").st_mtime - called, r.rows)
                  for sid, r in catalog.committed(out).items())  # fmt: skip
    steady = float("nan")
    if len(done) > num_workers:
        # rows of the shards after each actor's first / from the mean first commit to the last
        since = sum(t for t, _ in done[:num_workers]) / num_workers
        steady = sum(rows for _, rows in done[num_workers:]) / (done[-1][0] - since)
    tree = monitor.stats
    return RayRun(images=images, init_s=init_s, stage_s=result.seconds, call_s=tree.wall_s,
                  first_worker_s=tree.first_seen.get("MapWorker", float("nan")),
                  first_commit_s=done[0][0], steady_rate=steady, tree=tree)  # fmt: skip


def wait_for_ray_exit(timeout_s: float = 20.0) -> None:
    """ray.shutdown() signals its processes; wait until they are gone so they cost no CPU."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.2)


# ---- 2. the plain webdataset + DataLoader loop ----------------------------------------------
@dataclass
class PlainRun:
    images: int
    torch_threads: int
    load_s: float
    loop_s: float
    wait_s: float
    """Main process blocked on the DataLoader (decode + preprocess not keeping up)."""
    model_s: float
    tree: TreeStats = field(default_factory=TreeStats)

    @property
    def rate(self) -> float:
        return self.images / (self.load_s + self.loop_s)


class _Preprocess:
    """(key, PIL image, caption) -> (key, (3, S, S) tensor, caption); runs in the loader workers."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, sample: tuple) -> tuple:
        from seed_core.encoders import preprocess_images

        key, image, caption = sample
        return key, preprocess_images([image], image_size=self.image_size)[0], caption


def run_plain_loop(tars: list[str], out_dir: str, *, images: int, batch_size: int,
                   loader_workers: int, torch_threads: int, flush_every: int) -> PlainRun:  # fmt: skip
    import torch
    import webdataset as wds

    from seed_core.encoders import load_target_encoder, load_vision_encoder
    from seed_core.presets import get_preset

    # The main process runs the models on torch_threads threads; each DataLoader worker process is
    # set to 1 torch thread by torch itself (it only decodes and resizes, on PIL).
    torch.set_num_threads(torch_threads)
    start = time.perf_counter()
    preset = get_preset(PRESET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomInitWarning: expected, reported in the header
        vision, target = load_vision_encoder(preset.vision), load_target_encoder(preset.target)
    assert preset.vision.image_size == preset.target.image_size  # one preprocess serves both
    load_s = time.perf_counter() - start

    dataset = (
        wds.WebDataset(tars, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("__key__", "jpg", "txt")
        .map(_Preprocess(preset.vision.image_size))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers)
    start = time.perf_counter()
    wait_s = model_s = 0.0
    count, part, pending = 0, 0, []
    ready = time.perf_counter()
    for keys, pixels, _captions in loader:
        got = time.perf_counter()
        wait_s += got - ready
        with torch.inference_mode():
            patches = vision(pixels).float().numpy().astype(np.float16)
            embeds = target(pixels).float().numpy().astype(np.float16)
        ready = time.perf_counter()
        model_s += ready - got
        pending.append((keys, patches, embeds))
        count += len(keys)
        if sum(len(k) for k, _, _ in pending) >= flush_every:
            _save(out_dir, part, pending)
            part, pending = part + 1, []
        ready = time.perf_counter()
    if pending:
        _save(out_dir, part, pending)
    loop_s = time.perf_counter() - start
    assert count == images, (count, images)
    return PlainRun(images=count, torch_threads=torch_threads, load_s=load_s, loop_s=loop_s,
                    wait_s=wait_s, model_s=model_s)  # fmt: skip


def _save(out_dir: str, part: int, pending: list) -> None:
    """Like clip-retrieval's writer: one .npy per output partition and a key list."""
    keys = [k for ks, _, _ in pending for k in ks]
    np.save(f"{out_dir}/patches_{part:04d}.npy", np.concatenate([p for _, p, _ in pending]))
    np.save(f"{out_dir}/embeds_{part:04d}.npy", np.concatenate([e for _, _, e in pending]))
    Path(f"{out_dir}/keys_{part:04d}.txt").write_text("\n".join(keys))


# ---- 3. the decode + resize floor -----------------------------------------------------------
def read_jpegs(tars: list[str]) -> list[bytes]:
    out = []
    for path in tars:
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]  # type: ignore[union-attr]
    return out


def _decode_resize(data: bytes, size: int, draft: bool = False) -> object:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if draft:  # libjpeg's DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding
            img.draft("RGB", (size, size))
        return img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def decode_rate(jpegs: list[bytes], size: int, *, threads: int, draft: bool = False) -> float:
    """Images/s of PIL decode + bicubic resize; PIL releases the GIL in both, so threads scale."""
    for data in jpegs[:16]:  # warm-up (imports, allocator)
        _decode_resize(data, size, draft)
    start = time.perf_counter()
    if threads == 1:
        for data in jpegs:
            _decode_resize(data, size, draft)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda d: _decode_resize(d, size, draft), jpegs))
    return len(jpegs) / (time.perf_counter() - start)


# ---- main -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-size", type=int, default=256, help="images per raw shard")
    parser.add_argument("--num-shards", type=int, default=2, help="shards of the N-image corpus")
    parser.add_argument("--scale", type=int, default=4, help="the large corpus is scale * N images")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray stage: actors (1 CPU each)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per model forward (both)"
    )
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="local Ray CPUs")
    parser.add_argument("--ray-worker-niceness", type=int, default=None,
                        help="RAY_worker_niceness for the local Ray (default: Ray's, 15)")  # fmt: skip
    parser.add_argument(
        "--loader-workers", type=int, default=1, help="plain loop: DataLoader workers"
    )
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[0, 1],
                        help="plain loop: model thread counts to run, the first is the headline "
                             "(0: torch's default, one per core)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.scale < 2 or args.num_shards < 1 or args.shard_size < 1:
        parser.error("need --scale >= 2, --num-shards >= 1, --shard-size >= 1")

    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "TOKENIZERS_PARALLELISM": "false"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    if args.ray_worker_niceness is not None:  # read by the raylet at ray.init
        os.environ[NICENESS_ENV] = str(args.ray_worker_niceness)
    sys.path.insert(0, str(ROOT))  # `tests.raw_fixture` is not part of the installed package
    import torch

    from seed_core.presets import get_preset

    # Plain loop: torch's default (one thread per core) unless --torch-threads; read it here,
    # before anything could change it. The Ray actors get OMP_NUM_THREADS = their num_cpus (1)
    # from Ray, hence 1 torch thread each.
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(t or default_threads for t in args.torch_threads))
    cores = os.cpu_count() or 1
    preset = get_preset(PRESET)
    side = preset.vision.image_size
    print(f"machine: {cores} CPUs, torch {torch.__version__}, 1-min load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)  # fmt: skip
    print(f"encoders: preset '{PRESET}' in RANDOM INIT (no pretrained weights offline; rates "
          f"depend on shapes only): vision {preset.vision.num_tokens} tokens x "
          f"{preset.vision.hidden_size}, {preset.vision.num_layers} layers; target "
          f"{preset.target.num_layers} layers -> {preset.target.projection_dim}; input {side}x{side}",
          flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        root = f"{tmp}/root"
        # the stage logs an MLflow run: keep it in the temp dir, never in the user's tracking store
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        start = time.perf_counter()
        sizes = write_corpora(root, shard_size=args.shard_size, num_shards=args.num_shards,
                              scale=args.scale, image_size=args.image_size, seed=args.seed)  # fmt: skip
        (small, n), (large, n_large) = sizes.items()
        tars = raw_tars(root, large)
        mean_kb = sum(os.path.getsize(t) for t in tars) / n_large / 1024
        print(f"corpus: {n} and {n_large} images in shards of {args.shard_size}, "
              f"{args.image_size}x{args.image_size} JPEG q90, {mean_kb:.1f} KB/sample in the tars "
              f"({time.perf_counter() - start:.1f} s to write)", flush=True)  # fmt: skip

        # 1 + 4. the Ray stage, on N then scale*N images, each on its own fresh local Ray
        ray_runs = {}
        for corpus, images in ((small, n), (large, n_large)):
            print(f"\n== Ray features stage on {corpus} ({images} images) ==", flush=True)
            ray_runs[corpus] = run_ray_stage(root, corpus, images=images, num_workers=args.num_workers,
                                             batch_size=args.batch_size, ray_cpus=args.ray_cpus)  # fmt: skip
            wait_for_ray_exit()
        ray_run = ray_runs[large]

        # 2. the plain loop, on the large corpus's tars, with Ray gone
        plains = []
        for threads in thread_counts:
            print(f"\n== plain webdataset + DataLoader loop on {large}, {threads} torch threads ==",
                  flush=True)  # fmt: skip
            out_dir = f"{tmp}/plain-out-{threads}"
            os.makedirs(out_dir)
            with TreeMonitor() as mon:
                plains.append(run_plain_loop(tars, out_dir, images=n_large, batch_size=args.batch_size,
                                             loader_workers=args.loader_workers, torch_threads=threads,
                                             flush_every=args.shard_size))  # fmt: skip
            plains[-1].tree = mon.stats
        plain = plains[0]

        # 3. the floor, from bytes in memory (no tar reading)
        print(f"\n== decode + bicubic resize to {side}x{side} (no model) ==", flush=True)
        jpegs = read_jpegs(tars)
        floors = {}
        for name, threads, draft in (
            ("1", 1, False),
            ("all", cores, False),
            ("draft", cores, True),
        ):
            with TreeMonitor() as mon:
                floors[name] = (decode_rate(jpegs, side, threads=threads, draft=draft), mon.stats)
        floor = max(floors["1"][0], floors["all"][0])

    nice = ray_run.tree.niceness.get("MapWorker", "?")

    def plain_row(p: PlainRun, first: bool) -> tuple:
        name = f"plain loop, {n_large} img" if first else "  same, other threads"
        default = " (torch's default)" if p.torch_threads == default_threads else ""
        return (name, p.rate, p.tree, f"DataLoader(num_workers={args.loader_workers}, batch_size="
                f"{args.batch_size}), model on {p.torch_threads} torch thread(s){default}")  # fmt: skip

    rows = [
        (f"Ray stage, {n_large} img", ray_run.rate, ray_run.tree,
         f"Resources(num_workers={args.num_workers}, batch_size={args.batch_size}), 1 CPU + 1 torch "
         f"thread per actor, {args.ray_cpus} Ray CPUs, actors at nice {nice}"),
        ("  its steady part", ray_run.steady_rate, ray_run.tree,
         "after each actor's first shard (commit times)"),
        (f"Ray stage, {n} img", ray_runs[small].rate, ray_runs[small].tree, "same knobs"),
        *(plain_row(p, first=p is plain) for p in plains),
        ("decode floor, 1 thread", floors["1"][0], floors["1"][1],
         f"PIL decode + bicubic resize to {side}x{side}"),
        (f"decode floor, {cores} threads", floors["all"][0], floors["all"][1], "PIL releases the GIL"),
        ("decode, JPEG draft", floors["draft"][0], floors["draft"][1],
         f"{cores} threads, DCT-domain downscale while decoding (neither pipeline uses it)"),
    ]  # fmt: skip
    print("\n== results (others' CPU: share of the machine used by other processes meanwhile) ==")
    print(f"  {'':<26s} {'img/s':>9s} {'others':>7s}   knobs")
    for name, rate, tree, note in rows:
        print(f"  {name:<26s} {rate:9.1f} {tree.others_cpu_share:7.0%}   {note}")
    print(f"\n== ratios (decode floor = best of 1 and {cores} threads, {floor:.0f} img/s) ==")
    print(f"  (plain loop = {plain.torch_threads} torch threads)")
    print(f"  Ray stage / plain loop     {ray_run.rate / plain.rate:6.2f}   "
          f"(steady part: {ray_run.steady_rate / plain.rate:.2f})")  # fmt: skip
    print(f"  Ray stage / decode floor   {ray_run.rate / floor:6.3f}   "
          f"(steady part: {ray_run.steady_rate / floor:.3f})")  # fmt: skip
    print(f"  plain loop / decode floor  {plain.rate / floor:6.3f}")
    print("\n== where the time goes (seconds) ==")
    for images, r in ((n, ray_runs[small]), (n_large, ray_run)):
        print(f"  Ray, {images} img: ray.init {r.init_s:.1f} | run() -> first MapWorker process "
              f"{r.first_worker_s:.1f} (plan, MLflow run, Ray Data start) -> first shard committed "
              f"{r.first_commit_s:.1f} (actor imports + model load + 1 shard) | stage (from Ray Data's "
              f"start) {r.stage_s:.1f}, run() {r.call_s:.1f}")  # fmt: skip
    for p in plains:
        print(f"  plain loop, {p.torch_threads} torch thread(s): model load {p.load_s:.1f} | loop "
              f"{p.loop_s:.1f}, of which model {p.model_s:.1f}, waiting on the DataLoader "
              f"{p.wait_s:.1f}")  # fmt: skip
    a, b = ray_runs[small].tree, ray_run.tree
    print(f"\n== peak memory of the Ray stage, MiB ({n} vs {n_large} images) ==")
    print(f"  {'':<34s} {n:>8d} {n_large:>8d}  ratio")
    for name, x, y in (
        ("driver + ray:: workers, RSS sum", a.rss, b.rss),
        ("driver + ray:: workers, PSS sum", a.pss, b.pss),
        ("driver RSS", a.driver_rss, b.driver_rss),
        ("largest single worker RSS", a.max_worker_rss, b.max_worker_rss),
        ("Ray daemons RSS (gcs, raylet...)", a.system_rss, b.system_rss),
    ):
        print(f"  {name:<34s} {x:8.0f} {y:8.0f}  {y / x:5.2f}")
    print(f"  ray:: workers alive at once (max): {a.max_workers_alive} / {b.max_workers_alive}; "
          f"samples every 0.1 s: {a.samples} / {b.samples}")  # fmt: skip
    print(f"\n1-min load average {os.getloadavg()[0]:.2f} at the end; rates are comparable only "
          f"where others' CPU is near 0%")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
