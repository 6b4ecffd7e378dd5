"""`seedpipe demo`: the whole pipeline on one machine, no GPU, no internet, in minutes.

    seedpipe demo [--root ./seed-demo] [--num-images N] [--fresh] [--verbose] [key=value ...]
    make demo                       # make setup, then this

One process and one local Ray (`cli_common.ensure_ray`, started by the first step with work and
reused by every later one); the embedded MLflow store `<root>/mlflow.db` (or MLFLOW_TRACKING_URI
when set); nothing written outside `--root` but this node's throwaway scratch
(`pipelines.storage.scratch_dir`). The steps are the README's commands, called in-process
(`run(config)` of the data stages, `main(argv)` of ingest, the jobs and evaluate):

    ingest    the compositional corpus (`pipelines.synthetic.make_scenes`: shapes x colours x
              positions x backgrounds) served on 127.0.0.1, downloaded by img2dataset
    features  --encoder tiny  (random-init ViT patch features + stage-2 targets)
    stage1    train-tokenizer --stage 1 --config demo_stage1
    qembeds   --stage1 <stage-1 model>
    stage2    train-tokenizer --stage 2 --config demo_stage2 stage1=<stage-1 model>
    tokenize  --tokenizer <tokenizer>
    lora      train-lora --config demo_lora tokens=<tokens dataset>
    evaluate  --tokenizer <tokenizer> --lora <adapter>, on the held-out split

A second run reuses what is up to date:
- the corpus, when `<root>/demo/state.json` records the same corpus settings (its URL list names a
  server port that no longer exists, so the ingest itself cannot be asked);
- the data stages plan against the catalog: their plans are no-ops;
- a job runs as `<job>-<corpus>-<key>`, key = digest of its resolved config and of the digests of
  its input datasets and models (as the job's own `prepare` names them, run in a scratch folder).
  When that run folder's `registered_model.json` names a model the store resolves, the job is
  skipped. A changed config or input gets a new run, never a resume of a run on other inputs;
- evaluate, when its results file was made from the same models and features.

Each step prints a progress line with its time; its own output (Ray's included) goes to
`<root>/demo/logs/` (`--verbose`: to the terminal). At the end: the results table (each metric
beside chance), the training losses, where everything was written, and the commands that come
next. `<root>/demo/summary.json` holds the same (`benchmarks/bench_demo.py` reads it).

`--root` may be an object-store URI (`s3://bucket/prefix`, with MLFLOW_TRACKING_URI set to a
tracking server and the store's variables, e.g. AWS_ENDPOINT_URL): the catalog and runs are there
like every command's, and `<root>/demo/` (state, summary, evaluation, URL list, samples, step logs)
is a `pipelines.storage.RunFolder`: written in its node-local mirror, pushed to the store (a step's
log when the step ends, failed or not); on a local root the mirror is the folder itself. `--fresh`
deletes the prefix through the store, only when it holds demo/state.json, and this node's cached
copies of its folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jobs.demo_report import loss_text, losses, report, summary
from pipelines.config import cli_main, parse_command
from pipelines.storage import (
    REMOTE_URI_FILE,
    RunFolder,
    filesystem,
    is_remote,
    join_uri,
    scratch_dir,
)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Offline by design: no hub look-ups (they retry slowly), no wandb, no usage stats."""
STATE_FILE = "state.json"
STEPS = ("ingest", "features", "stage1", "qembeds", "stage2", "tokenize", "lora", "evaluate")


@dataclass(kw_only=True)
class DemoConfig:
    root: str = "./seed-demo"
    """Where everything is written: the catalog, runs, the MLflow store, logs."""
    corpus: str = "shapes"
    """Name of the synthetic corpus in the catalog."""
    num_images: int = 3000
    """Images in the synthetic corpus."""
    samples_per_shard: int = 500
    """Images per raw shard (the unit of work of every data stage)."""
    image_size: int = 32
    """Side of the served and ingested images (the tiny preset's ViT input)."""
    download_processes: int = 2
    """img2dataset processes of the ingest (each downloads whole shards)."""
    seed: int = 0
    """Seed of the synthetic corpus."""
    encoder: str = "tiny"
    """Features encoder preset (its width must match the demo configs' preset)."""
    stage1_config: str = "demo_stage1"
    """Shipped config (or YAML path) of tokenizer stage 1."""
    stage2_config: str = "demo_stage2"
    """Shipped config (or YAML path) of tokenizer stage 2."""
    lora_config: str = "demo_lora"
    """Shipped config (or YAML path) of the LoRA job."""
    stage1_steps: int = 0
    """Stage-1 optimizer steps (0: the config's optim.max_steps)."""
    stage2_steps: int = 0
    """Stage-2 optimizer steps (0: the config's)."""
    lora_steps: int = 0
    """LoRA optimizer steps (0: the config's)."""
    fresh: bool = False
    """Delete the demo root first (only a folder or prefix the demo made, or an empty one)."""
    verbose: bool = False
    """Show every step's own output instead of writing it to <root>/demo/logs/."""
    dry_run: bool = False
    """Print the steps and stop."""
    address: str | None = None
    """Ray cluster address (default: RAY_ADDRESS, else a local Ray)."""

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus must not be empty")
        if self.num_images < 20:
            raise ValueError(f"num_images must be >= 20, got {self.num_images}")
        if self.download_processes < 1:
            raise ValueError(f"download_processes must be >= 1, got {self.download_processes}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        for name in ("stage1_steps", "stage2_steps", "lora_steps"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0 (0: the config's), got {getattr(self, name)}"
                )


class StepFailed(RuntimeError):
    """A step exited non-zero; the message names the step."""


@dataclass
class StepResult:
    name: str
    seconds: float
    status: str
    """built, trained, measured (work done); up to date, skipped, reused (earlier work reused)."""
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    """Machine-readable extras: a job's run folder, model and losses."""


class Demo:
    """The demo's steps and what they produced; `run()` runs them in order."""

    def __init__(self, config: DemoConfig, out: IO[str]) -> None:
        from pipelines.catalog import Catalog

        self.config = config
        self.out = out
        """Where progress lines go: the terminal, also while a step's own output is captured."""
        self.root = root_uri(config.root)
        self.catalog = Catalog(self.root)
        self.results: list[StepResult] = []
        self.models: dict[str, str] = {}
        """stage1, tokenizer, lora -> models:/ URI."""
        self.digests: dict[str, str] = {}
        self.datasets: dict[str, str] = {}
        """features, tokens -> dataset name."""
        self.evaluation: dict[str, Any] = {}

    # ---- bookkeeping -----------------------------------------------------------------------
    @functools.cached_property
    def folder(self) -> RunFolder:
        """`<root>/demo`: made on first use, so that `--fresh` and `--dry-run` come first."""
        return RunFolder(join_uri(self.root, "demo"))

    def location(self, name: str) -> str:
        """Where `<root>/demo/<name>` is, as the user is told (the store URI on an object store)."""
        return self.folder.uri_of(name)

    def where(self, catalog_path: str) -> str:
        """A catalog path as the user is told it (the store URI on an object store)."""
        return catalog_path if "://" in catalog_path else self.catalog.location(catalog_path)

    def say(self, text: str) -> None:
        sys.stdout.flush()
        print(text, file=self.out, flush=True)

    def state(self) -> dict[str, Any]:
        text = self.folder.read_text(STATE_FILE)
        return json.loads(text) if text else {}

    def save_state(self, **updates: Any) -> None:
        self.folder.write_text(
            STATE_FILE, json.dumps(self.state() | updates, indent=2, sort_keys=True)
        )

    @contextlib.contextmanager
    def captured(self, name: str) -> Iterator[None]:
        """Output into the log `<root>/demo/<name>` (the mirror's copy while it runs), appended to
        earlier runs' as on a local root (so the store's copy first: a mirror may be stale or
        gone), pushed to the store afterwards, failure or not."""
        log = self.folder.local / name
        if self.folder.remote and not self.config.verbose and not self.folder.pull(name):
            log.unlink(missing_ok=True)
        try:
            with _captured(log, self.config.verbose):
                yield
        finally:
            if not self.config.verbose and log.is_file():
                self.folder.push(name)

    def step(self, name: str, what: str, fn: Callable[[], StepResult]) -> StepResult:
        """One step: a start line, its own output captured into its log, an end line with its time."""
        tag = f"[{STEPS.index(name) + 1}/{len(STEPS)}] {name:9s}"
        log_name = f"logs/{STEPS.index(name) + 1}-{name}.log"
        self.say(f"{tag} {what}")
        start = time.monotonic()
        try:
            with self.captured(log_name):
                result = fn()
        except Exception as err:
            self.say(f"{tag} FAILED after {time.monotonic() - start:.1f} s: {err}")
            log = self.folder.local / log_name
            if not self.config.verbose and log.is_file() and not isinstance(err, ValueError):
                tail = log.read_text(errors="replace").splitlines()[-40:]
                self.say(f"  last lines of {self.location(log_name)}:\n"
                         + "\n".join(f"  | {line}" for line in tail))  # fmt: skip
            raise
        result.seconds = time.monotonic() - start
        self.results.append(result)
        self.say(
            f"{tag} {result.seconds:6.1f} s  {result.status}"
            + (f": {result.detail}" if result.detail else "")
        )
        return result

    def common(self) -> list[str]:
        return ["--root", self.root, "--corpus", self.config.corpus] + (
            ["--address", self.config.address] if self.config.address else [])  # fmt: skip

    # ---- steps -----------------------------------------------------------------------------
    def corpus_spec(self) -> dict[str, Any]:
        from pipelines.synthetic import SceneFactors

        c = self.config
        spec = {"num_images": c.num_images, "seed": c.seed, "image_size": c.image_size,
                "samples_per_shard": c.samples_per_shard, "factors": dataclasses.asdict(SceneFactors())}  # fmt: skip
        return json.loads(json.dumps(spec))  # as state.json holds it (tuples are lists there)

    def ingest(self) -> StepResult:
        from pipelines import ingest
        from pipelines.datasets import dataset_ref
        from pipelines.synthetic import ImageServer, SceneFactors, make_scenes, write_url_list

        c, spec = self.config, self.corpus_spec()
        raw = self.catalog.raw_dir(c.corpus)
        where = self.where(raw)
        existing = dataset_ref(self.catalog, raw, "input")
        if existing.rows:
            if self.state().get("corpora", {}).get(c.corpus) == spec:
                return StepResult("ingest", 0, "up to date", f"{existing.rows} images, {where}")
            raise ValueError(f"corpus {c.corpus!r} in {self.root} was not made with these settings "
                             f"({spec}): run with --fresh, or choose another --root or --corpus")  # fmt: skip
        images = make_scenes(c.num_images, seed=c.seed, size=c.image_size, factors=SceneFactors())
        url_list = f"{c.corpus}-urls.tsv"
        with ImageServer(images) as server:
            write_url_list(self.folder.local / url_list,
                           [(server.image_url(n), text) for n, _, text in images], "tsv")  # fmt: skip
            self.folder.push(url_list)  # the ingest (and its lineage) names the store's copy
            code = ingest.main([*self.common(), "--url-list", self.location(url_list), "--allow-private-hosts",
                                "--samples-per-shard", str(c.samples_per_shard), "--image-size", str(c.image_size),
                                "--processes", str(c.download_processes)])  # fmt: skip
        if code != 0:
            raise StepFailed(f"seedpipe ingest exited {code}")
        self.write_samples()
        self.save_state(corpora=self.state().get("corpora", {}) | {c.corpus: spec})
        ref = dataset_ref(self.catalog, raw, "input")
        shards = len(self.catalog.committed(raw))
        return StepResult(
            "ingest", 0, "built", f"{ref.rows} of {c.num_images} images in {shards} shards, {where}"
        )

    def write_samples(self, n: int = 3) -> None:
        """A few new scenes (drawn with another seed) to try `seedpipe caption` on."""
        from pipelines.synthetic import SceneFactors, make_scenes

        samples = self.folder.local / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        scenes = make_scenes(
            n, seed=self.config.seed + 10_000, size=self.config.image_size, factors=SceneFactors()
        )
        for i, (_, data, caption) in enumerate(scenes):
            (samples / f"{i}-{caption.replace(' ', '_')}.jpg").write_bytes(data)
        self.folder.push("samples")

    def samples(self) -> list[Path]:
        """The sample images as local files (`seedpipe caption` reads local files): on an object
        store, this node's copy, fetched when a rerun found the corpus up to date without one."""
        local = self.folder.local / "samples"
        if self.folder.remote and not any(local.glob("*.jpg")):
            self.folder.pull("samples")
        return sorted(local.glob("*.jpg"))

    def stage(self, name: str, module: Any, config_cls: type, argv: list[str]) -> StepResult:
        """A data stage through its own grammar and its typed `run`; its plan says what was built."""
        from pipelines.cli_common import parse_stage

        prog = f"seedpipe {'tokenize' if name == 'tokenize' else name}"
        result = module.run(
            parse_stage(config_cls, self.common() + argv, prog=prog, doc=module.__doc__)
        )
        if not result.ok:
            raise StepFailed(f"{prog}: failed shards {result.failed_shards}")
        info, where = {"output_dir": result.output_dir}, self.where(result.output_dir)
        if not result.plan.to_build:
            return StepResult(
                name, 0, "up to date", f"{len(result.plan.up_to_date)} shards, {where}", info
            )
        return StepResult(name, 0, "built", f"{len(result.plan.to_build)} shards ({result.rows_out} rows), "
                          f"{where}", info)  # fmt: skip

    def job(
        self, name: str, job: Any, module: Any, argv: list[str], *, steps: int, model: str
    ) -> StepResult:
        """A training job: skipped when the run of its key registered a model, else `main(argv)`.
        The registered models:/ URI becomes `self.models[model]` (the next steps' input)."""
        from jobs.config import CONFIG_DIR
        from jobs.job import run_folder
        from pipelines.models import resolve_model

        argv = [*argv, *self.common()] + ([f"optim.max_steps={steps}"] if steps else [])
        config = job.resolve(
            parse_command(job.config_cls, argv, prog=name, description="", config_dirs=[CONFIG_DIR])
        )
        run_name = f"{job.name}-{self.config.corpus}-{self.job_key(job, config)[:10]}"
        folder = run_folder(
            dataclasses.replace(config, run=dataclasses.replace(config.run, name=run_name)),
            job.name,
        )
        record = folder.read_text("registered_model.json")
        info = json.loads(record) if record else {}
        status = "skipped"
        if "uri" in info:
            try:
                resolve_model(info["uri"], self.catalog)
            except (
                ValueError
            ):  # registered in another store, or deleted: train (resumes the finished run)
                info = {}
        if "uri" not in info:
            stage = ["--stage", name[-1]] if name.startswith("stage") else []
            code = module.main([*stage, *argv, f"run.name={run_name}"])
            record = folder.read_text("registered_model.json")
            info = json.loads(record) if record else {}
            if code != 0 or "uri" not in info:
                raise StepFailed(
                    f"{name} exited {code}"
                    + (f": {info['deferred']}" if "deferred" in info else "")
                )
            status = "trained"
        self.models[model], self.digests[model] = info["uri"], info.get("digest", "")
        folder.pull("metrics.jsonl")
        curve = losses(folder.local)
        extra = {"run_dir": folder.uri, "model": info["uri"], "loss_first": curve[0][1] if curve else None,
                 "loss_last": curve[-1][1] if curve else None, "steps": curve[-1][0] if curve else 0}  # fmt: skip
        if status == "skipped":
            return StepResult(
                name,
                0,
                status,
                f"{info['uri']} exists for this config and these inputs ({folder.name})",
                extra,
            )
        return StepResult(name, 0, status, f"{loss_text(curve)}; registered {info['uri']}", extra)

    def job_key(self, job: Any, config: Any) -> str:
        """Digest of the resolved config (run name aside) and of the digests of the job's inputs."""
        from pipelines import config as cfg
        from pipelines.catalog import sha256_text

        scratch = self.folder.local / "scratch" / job.name  # never pushed: deleted below
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            probe = dataclasses.replace(
                config, run=dataclasses.replace(config.run, name="", storage_path=str(scratch))
            )
            inputs = sorted(
                f"{d.context}:{d.name}={d.digest}" for d in job.prepare(probe).input_datasets
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        plain = dataclasses.replace(config, run=dataclasses.replace(config.run, name=""))
        return sha256_text(cfg.to_yaml(plain), *inputs)

    def evaluate(self) -> StepResult:
        from jobs import evaluate
        from pipelines.catalog import sha256_text
        from pipelines.datasets import dataset_ref

        features = dataset_ref(self.catalog, self.catalog.stage_dir(self.config.corpus, "features",
                                                                    self.datasets["features"]), "eval")  # fmt: skip
        key = sha256_text(
            *(f"{k}={self.models[k]}@{self.digests[k]}" for k in ("tokenizer", "lora")),
            features.digest,
        )
        name, path = "evaluation.json", self.folder.local / "evaluation.json"
        where = self.location(name)
        earlier = self.folder.read_text(name) if self.state().get("evaluation_key") == key else None
        if earlier:
            self.evaluation = json.loads(earlier)
            return StepResult("evaluate", 0, "reused", f"{where} (same models and features)")
        # evaluate writes --json to a local file: the mirror's, then pushed
        code = evaluate.main([*self.common(), "--tokenizer", self.models["tokenizer"], "--lora", self.models["lora"],
                              "--json", str(path)])  # fmt: skip
        if code != 0 or not path.is_file():
            raise StepFailed(f"seedpipe evaluate exited {code}")
        self.folder.push(name)
        self.evaluation = json.loads(path.read_text())
        self.save_state(evaluation_key=key)
        split = self.evaluation.get("split", {})
        return StepResult("evaluate", 0, "measured", f"{split.get('rows', '?')} held-out images, "
                          f"{split.get('captions', '?')} distinct captions, {where}")  # fmt: skip

    def run(self) -> None:
        from jobs import train_lora, train_tokenizer
        from jobs.lora import LoraJob
        from jobs.stage1 import Stage1Job
        from jobs.stage2 import Stage2Job
        from pipelines import features, qembeds, tokens

        c = self.config
        self.step("ingest", f"{c.num_images} synthetic scenes served on 127.0.0.1, downloaded by img2dataset",
                  self.ingest)  # fmt: skip
        done = self.step("features", f"seedpipe features --encoder {c.encoder}",
                         lambda: self.stage("features", features, features.FeaturesConfig, ["--encoder", c.encoder]))  # fmt: skip
        self.datasets["features"] = Path(done.info["output_dir"]).name
        self.step("stage1", f"seedpipe train-tokenizer --stage 1 --config {c.stage1_config}",
                  lambda: self.job("stage1", Stage1Job(), train_tokenizer, ["--config", c.stage1_config],
                                   steps=c.stage1_steps, model="stage1"))  # fmt: skip
        stage1 = self.models["stage1"]
        self.step("qembeds", f"seedpipe qembeds --stage1 {stage1}",
                  lambda: self.stage("qembeds", qembeds, qembeds.QEmbedsConfig, ["--stage1", stage1]))  # fmt: skip
        self.step("stage2", f"seedpipe train-tokenizer --stage 2 --config {c.stage2_config} stage1={stage1}",
                  lambda: self.job("stage2", Stage2Job(), train_tokenizer, ["--config", c.stage2_config, f"stage1={stage1}"],
                                   steps=c.stage2_steps, model="tokenizer"))  # fmt: skip
        tokenizer = self.models["tokenizer"]
        done = self.step("tokenize", f"seedpipe tokenize --tokenizer {tokenizer}",
                         lambda: self.stage("tokenize", tokens, tokens.TokensConfig, ["--tokenizer", tokenizer]))  # fmt: skip
        self.datasets["tokens"] = Path(done.info["output_dir"]).name
        self.step("lora", f"seedpipe train-lora --config {c.lora_config} tokens={self.datasets['tokens']}",
                  lambda: self.job("lora", LoraJob(), train_lora, ["--config", c.lora_config, f"tokens={self.datasets['tokens']}"],
                                   steps=c.lora_steps, model="lora"))  # fmt: skip
        self.step(
            "evaluate",
            f"seedpipe evaluate --tokenizer {tokenizer} --lora {self.models['lora']}",
            self.evaluate,
        )


@contextlib.contextmanager
def _captured(log: Path, verbose: bool) -> Iterator[None]:
    """A step's own output into `log`: Python's streams and file descriptors 1 and 2, so that
    img2dataset's and Ray's processes (which write to the inherited descriptors) land there too."""
    if verbose:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _descriptor_streams()
    with open(log, "ab", buffering=0) as f:  # only its descriptor is used
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            out.flush()
            err.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


@functools.cache
def _descriptor_streams() -> tuple[IO[str], IO[str]]:
    """Text streams on descriptors 1 and 2, never closed: Python's stdout and stderr while a step
    runs. A logging handler made during a step (Ray Data's) keeps the stream it found; this one
    writes wherever the descriptor points later, where the step's own log file, once closed, gave
    "--- Logging error --- I/O operation on closed file" and lost the record."""
    return (
        open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False),
        open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False),
    )


def root_uri(root: str) -> str:
    """The root as every step is given it: an object-store URI as it is, a local path absolute."""
    return root.rstrip("/") if is_remote(root) else str(Path(root).expanduser().resolve())


def _fresh(root: str) -> None:
    """Delete a demo root: only a folder (or store prefix) the demo made (it holds
    demo/state.json) or an empty one; through the root's filesystem."""
    import pyarrow.fs as pafs

    fs, path = filesystem(root)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return
    made = fs.get_file_info(f"{path}/demo/{STATE_FILE}").type == pafs.FileType.File
    if kind != pafs.FileType.Directory or (
        not made and fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    ):
        raise ValueError(
            f"--fresh: {root} is not a folder made by `seedpipe demo` (no demo/{STATE_FILE}); not deleting it"
        )
    if not is_remote(root):
        shutil.rmtree(path)
        return
    if "/" in path:
        fs.delete_dir(path)
    else:  # a whole bucket: its objects, never the bucket
        fs.delete_dir_contents(path)
    _forget_local_copies(root)


def _forget_local_copies(root: str) -> None:
    """This node's mirrors and fetched copies of folders under a deleted store root. They are a
    cache, but one that would outlive the root: the new run folders get the same names (a job's run
    is named by the digest of its config and inputs), and a mirror's stale `mlflow_run_id` or
    metrics would be taken for theirs (`RunFolder.pull` keeps the local file when the store has none)."""
    prefix = root.rstrip("/") + "/"
    # each names what it copies: a mirror its `.remote_uri`, a fetched copy its `.complete`
    markers = [*scratch_dir("runs").glob(f"*/*/{REMOTE_URI_FILE}"),
               *scratch_dir("fetched").glob("*/.complete")]  # fmt: skip
    for marker in markers:
        with contextlib.suppress(OSError):
            if marker.read_text().strip().startswith(prefix):
                shutil.rmtree(marker.parent, ignore_errors=True)


def _terminal() -> IO[str]:
    """A stream on the terminal that stays there while descriptor 1 is redirected into a step log."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (
        AttributeError,
        OSError,
        ValueError,
    ):  # no descriptor (a captured stream): write to it as is
        return sys.stdout


def run_demo(config: DemoConfig, out: IO[str] | None = None) -> Demo:
    """The whole demo (see the module docstring); returns the Demo with its results."""
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    demo = Demo(config, out or _terminal())
    if config.fresh:
        _fresh(demo.root)
    if config.dry_run:
        demo.say(f"demo: dry run; would run {', '.join(STEPS)} under {demo.root}")
        return demo
    demo.save_state(made_by="seedpipe demo")
    started_ray = not ray.is_initialized()
    start = time.monotonic()
    logs = "" if config.verbose else f"; each step's own output is in {demo.location('logs')}"
    demo.say(
        f"seedpipe demo: root {demo.root}, corpus {config.corpus} ({config.num_images} images){logs}"
    )
    try:
        demo.run()
    finally:
        if started_ray and ray.is_initialized():
            with demo.captured("logs/ray-shutdown.log"):
                ray.shutdown()
    seconds = time.monotonic() - start
    demo.folder.write_text(
        "summary.json", json.dumps(summary(demo, seconds), indent=2, sort_keys=True)
    )
    demo.say(report(demo, seconds))
    return demo


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """The whole pipeline end to end on a synthetic corpus, CPU only and offline: ingest, features,
    tokenizer stages 1 and 2, tokenize, LoRA, evaluate; then the results table."""
    config = parse_command(DemoConfig, argv, prog="seedpipe demo", description=main.__doc__ or "")
    try:
        run_demo(config)
    except StepFailed as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
