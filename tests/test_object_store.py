"""The README chain on an object-store root, as a cluster user runs it.

A real S3 API server (moto's, tests/s3_server.py) and a real `mlflow server` whose artifacts are in
the same bucket, both on 127.0.0.1; the installed `seedpipe` console script, each command a
subprocess from a fresh empty folder, with `--root s3://seed/seed-data`, `MLFLOW_TRACKING_URI` set
to the server and the AWS variables for the endpoint: ingest (img2dataset from a loopback HTTP
server), features, stage 1, qembeds, stage 2, tokenize, LoRA, then evaluate, lineage and status; a
killed and resumed job whose checkpoint is in the bucket. Each subprocess gets its own HOME and
TMPDIR and a Ray temp dir inside that TMPDIR, so the test sees every byte written outside the
store: the working folder must stay empty, and HOME and TMPDIR hold nothing but Ray's temp dir
(where this node's throwaway scratch lives: `pipelines.storage.scratch_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.synthetic import ImageServer, make_images, write_url_list
from tests.chain import CORPUS, NUM_IMAGES, SAMPLES_PER_SHARD, seedpipe_exe, steps
from tests.mlflow_server import MlflowServer
from tests.s3_server import S3Server

# one xdist worker runs the module: its chain (a module fixture) is built once, not once per worker
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000), pytest.mark.xdist_group("object-store")]
BUCKET = "seed"
ROOT = f"s3://{BUCKET}/seed-data"
PREFIX = "seed-data/"
STEP_TIMEOUT_S = 900


@dataclass
class StoreChain:
    s3: S3Server
    mlflow: MlflowServer
    base: Path
    env: dict[str, str]
    workdir: Path
    logs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, argv: list[str], *, check: bool = True, env: dict | None = None):
        start = time.monotonic()
        proc = subprocess.run([seedpipe_exe(), *argv], cwd=self.workdir, env=env or self.env,
                              capture_output=True, text=True, timeout=STEP_TIMEOUT_S)  # fmt: skip
        self.seconds[name] = time.monotonic() - start
        self.logs[name] = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, (
                f"`seedpipe {' '.join(argv)}` exited {proc.returncode}:\n{self.logs[name][-4000:]}"
            )
        return proc

    def keys(self, prefix: str = PREFIX) -> list[str]:
        return self.s3.keys(BUCKET, prefix)


def isolated_env(base: Path, s3: S3Server, tracking_uri: str, ray_tmp: str) -> dict[str, str]:
    """A cluster user's shell: the store's variables, the tracking server, and (for the test's
    eyes) a HOME and a TMPDIR of its own, and Ray's temp dir under `ray_tmp` (short: Ray's unix
    sockets live there, 107 bytes at most)."""
    home, tmp = base / "home", base / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH", "SEEDPIPE_SCRATCH")}  # fmt: skip
    env.update(s3.env())
    # MLflow's client telemetry keeps an installation id in ~/.config/mlflow (MLflow's own, not
    # seedpipe's data); off, as on a cluster without internet
    env.update(HOME=str(home), TMPDIR=str(tmp), RAY_TMPDIR=ray_tmp,
               MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true")  # fmt: skip
    return env


@pytest.fixture(scope="module")
def store_chain(tmp_path_factory):
    """The README chain on `s3://seed/seed-data`, built once for this module's tests."""
    base = tmp_path_factory.mktemp("s3c")
    ray_tmp = tempfile.mkdtemp(prefix="s3r", dir="/tmp")
    s3 = S3Server(base)
    s3.start()
    s3.create_bucket(BUCKET)
    mlflow = s3.tracking_server(base, BUCKET)
    try:
        mlflow.start()
        workdir = base / "user"
        workdir.mkdir()
        chain = StoreChain(s3=s3, mlflow=mlflow, base=base, workdir=workdir,
                           env=isolated_env(base, s3, mlflow.uri, ray_tmp))  # fmt: skip
        inputs = base / "inputs"
        inputs.mkdir()
        url_list = inputs / "urls.tsv"
        images = make_images(NUM_IMAGES, seed=0)
        with ImageServer(images) as server:
            write_url_list(url_list, [(server.image_url(n), c) for n, _, c in images], "tsv")
            for name, argv in steps(ROOT):
                chain.run(name, [str(url_list) if a == "URLS" else a for a in argv])
        yield chain
    finally:
        mlflow.stop()
        s3.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_readme_step_commits_its_data_in_the_bucket(store_chain):
    """Ingest .. LoRA on an s3:// root: every stage's shards and completion records, the manifest,
    the run folders with their configs, Ray Train's checkpoints, the exports and the registered
    models' artifacts are objects in the bucket."""
    keys = set(store_chain.keys())
    corpus = f"{PREFIX}corpora/{CORPUS}"
    num_shards = NUM_IMAGES // SAMPLES_PER_SHARD
    for sid in (f"{i:05d}" for i in range(num_shards)):
        assert {f"{corpus}/raw/{sid}.tar", f"{corpus}/raw/{sid}.done.json"} <= keys
        for stage in ("features", "qembeds", "tokens"):
            assert any(k.startswith(f"{corpus}/{stage}/") and k.endswith(f"/{sid}.done.json")
                       for k in keys), (stage, sid)  # fmt: skip
    for job in ("stage1", "stage2", "lora"):
        run = f"{PREFIX}runs/{job}-{CORPUS}"
        assert {f"{run}/config.yaml", f"{run}/registered_model.json", f"{run}/mlflow_run_id",
                f"{run}/metrics.jsonl"} <= keys, job  # fmt: skip
        assert any(k.startswith(f"{run}/export/") for k in keys), job
        # Ray Train's checkpoints, in the store (the resolved config inside each)
        assert any(k.startswith(f"{run}/step") and k.endswith("/config.yaml") for k in keys), job
    assert any(k.startswith(f"{PREFIX}runs/stages/ingest-{CORPUS}") for k in keys)
    artifacts = store_chain.s3.keys(BUCKET, "mlartifacts/")
    assert any(k.endswith("MLmodel") for k in artifacts), "registered models' artifacts"


def test_nothing_is_written_outside_the_store_and_rays_temp_dir(store_chain):
    """After the whole chain the working folder and HOME are empty and TMPDIR holds no file of
    seedpipe's: every byte it wrote outside the bucket went to Ray's temp dir (where each node's
    throwaway scratch lives)."""
    for folder in (store_chain.workdir, Path(store_chain.env["HOME"])):
        written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert written == [], (folder, written[:20])
    # Two libraries' own temp folders, made on import and removed at a clean interpreter exit,
    # which Ray's killed workers and img2dataset's processes do not have: wandb's media/artifact
    # staging (img2dataset imports wandb) and torch inductor's compile cache.
    third_party = ("wandb-media", "wandb-artifacts", "torchinductor_")
    tmp = Path(store_chain.env["TMPDIR"])
    ours = sorted(p.name for p in tmp.iterdir() if not any(t in p.name for t in third_party))
    assert ours == [], ours
    scratch = Path(store_chain.env["RAY_TMPDIR"], "ray", "seedpipe-scratch")
    assert scratch.is_dir()  # the mirrors and staging were there


def test_evaluate_lineage_and_status_read_the_store(store_chain):
    """evaluate scores the registered models on the held-out split, lineage walks the LoRA model
    back to the URL list, status sees every dataset up to date; all on the s3:// root."""
    out = store_chain.base / "eval.json"
    store_chain.run("evaluate", ["evaluate", "--root", ROOT, "--corpus", CORPUS, "--tokenizer",
                                 "models:/seed-tokenizer/1", "--lora", "models:/seed-lora/1",
                                 "--json", str(out)])  # fmt: skip
    metrics = json.loads(out.read_text())
    metrics = metrics.get("metrics", metrics)
    assert "i2t_r1_codes" in metrics and "caption_bleu4" in metrics
    lineage = store_chain.run("lineage", ["lineage", "models:/seed-lora/1", "--root", ROOT]).stdout
    assert "URL list" in lineage and f"{CORPUS}/raw" in lineage
    status = store_chain.run("status", ["status", "--root", ROOT]).stdout
    assert "features/tiny" in status and "stale" not in status.split("registered")[0]
    assert sorted(os.listdir(store_chain.workdir)) == []


def test_killed_worker_resumes_from_its_checkpoint_in_the_bucket(store_chain):
    """Rank 1 SIGKILLed at step 7 of a stage-1 run on the s3:// root: the job resumes from the
    step-5 checkpoint Ray Train wrote to the bucket and finishes; MLflow has each step 1..12 once,
    and `compare` puts it beside the chain's stage-1 run."""
    from mlflow import MlflowClient

    store_chain.run("killed", ["train-tokenizer", "--stage", "1", "--config", "tiny_stage1",
                               "--root", ROOT, "--corpus", CORPUS, "run.name=killed",
                               "fault.kill_at_step=7", "fault.rank=1",
                               "register_as=seed-tokenizer-stage1-killed"])  # fmt: skip
    keys = set(store_chain.keys(f"{PREFIX}runs/killed/"))
    assert f"{PREFIX}runs/killed/fault_injected_step7" in keys  # the kill really happened
    # the checkpoints Ray Train kept (run.keep_checkpoints) are objects in the bucket
    assert any(k.startswith(f"{PREFIX}runs/killed/step") and k.endswith("/trainer_state.json")
               for k in keys)  # fmt: skip
    os.environ.update(store_chain.s3.env())  # the client below reads the run from the server
    client = MlflowClient(store_chain.mlflow.uri)
    run_id = next(k for k in keys if k.endswith("/mlflow_run_id"))
    run_id = store_chain.s3.client().get_object(Bucket=BUCKET, Key=run_id)["Body"].read().decode()
    steps_logged = Counter(m.step for m in client.get_metric_history(run_id.strip(), "loss"))
    assert steps_logged == Counter(range(1, 13))
    # and the two stage-1 runs of this root compare side by side, read from the server alone
    out = store_chain.base / "cmp"
    table = store_chain.run("compare", ["compare", "--stage", "stage1", "--last", "2", "--root",
                                        ROOT, "--out", str(out)]).stdout  # fmt: skip
    assert "killed" in table and (out / "compare.png").is_file()


def test_an_object_store_root_without_a_tracking_server_is_one_error_line(tmp_path):
    """`--root s3://...` with MLFLOW_TRACKING_URI unset: exit 2 and one `error:` line naming what to
    set, before any work (nothing written in the bucket or the working folder)."""
    s3 = S3Server(tmp_path)
    s3.start()
    try:
        s3.create_bucket(BUCKET)
        env = isolated_env(tmp_path, s3, "unused", str(tmp_path / "ray"))
        env.pop("MLFLOW_TRACKING_URI")
        work = tmp_path / "user"
        work.mkdir()
        for argv in (["features", "--root", ROOT, "--corpus", "c", "--encoder", "tiny"],
                     ["train-tokenizer", "--stage", "1", "--config", "tiny_stage1", "--root", ROOT,
                      "--corpus", "c"],
                     ["ingest", "--root", ROOT, "--corpus", "c", "--url-list", str(tmp_path)]):  # fmt: skip
            proc = subprocess.run([seedpipe_exe(), *argv], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert proc.returncode == 2, proc.stderr[-2000:]
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "MLFLOW_TRACKING_URI" in errors[0], proc.stderr[-2000:]
        assert s3.keys(BUCKET) == [] and os.listdir(work) == []
    finally:
        s3.stop()


def test_caption_and_generate_use_the_models_on_the_store(store_chain):
    """caption and generate run the registered models against the s3:// root; generate's contact
    sheet and its record go to `<root>/generated` in the bucket, nothing into the working folder."""
    image = store_chain.base / "sample.jpg"
    image.write_bytes(make_images(1, seed=7)[0][1])
    caption = store_chain.run("caption", ["caption", str(image), "--root", ROOT, "--lora",
                                          "models:/seed-lora/1"]).stdout  # fmt: skip
    assert f"{image}:" in caption
    prompt = "a red square on a blue background"
    generated = store_chain.run("generate", ["generate", prompt, "--root", ROOT, "--lora",
                                             "models:/seed-lora/1"]).stdout  # fmt: skip
    assert "contact sheet: s3://" in generated
    keys = set(store_chain.keys(f"{PREFIX}generated/"))
    slug = "a-red-square-on-a-blue-background"
    assert {f"{PREFIX}generated/{slug}.png", f"{PREFIX}generated/{slug}.json"} <= keys, keys
    assert sorted(os.listdir(store_chain.workdir)) == []
