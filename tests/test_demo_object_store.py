"""`seedpipe demo --root s3://...`: the demo on an object-store root, as a cluster user runs it.

A real S3 API server (moto's, tests/s3_server.py) and a real `mlflow server` whose artifacts are in
the same bucket, both on 127.0.0.1; the installed `seedpipe` console script as a subprocess from an
empty working folder, with the AWS variables, MLFLOW_TRACKING_URI, and a HOME, TMPDIR and Ray temp
dir of its own. The slow test runs every step on the CI-sized knobs and then again (everything
reused); the fast one checks, without Ray, what an object-store root changes before any step:
the tracking-server rule and `--fresh`, which deletes only a prefix the demo made, through the
store, together with this node's cached copies of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chain import seedpipe_exe
from tests.s3_server import S3Server

BUCKET = "seed"
ROOT = f"s3://{BUCKET}/demo"
PREFIX = "demo/"
# The smallest demo that still has two shards per stage and two training ranks per job (the tiny
# job configs, 2 optimizer steps each): the plumbing is what this guards, not what the demo learns.
ARGV = ["demo", "--root", ROOT, "--num-images", "64", "--samples-per-shard", "32",
        "--stage1-config", "tiny_stage1", "--stage2-config", "tiny_stage2", "--lora-config", "tiny_lora",
        "--stage1-steps", "2", "--stage2-steps", "2", "--lora-steps", "2"]  # fmt: skip
RUN_TIMEOUT_S = 900


def user_env(base: Path, s3: S3Server, ray_tmp: str, tracking_uri: str | None) -> dict[str, str]:
    """A cluster user's shell: the store's variables, the tracking server (if any), and a HOME and
    TMPDIR of its own, Ray's temp dir under `ray_tmp` (short: Ray's unix sockets live there)."""
    home, tmp = base / "home", base / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    drop = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH", "SEEDPIPE_SCRATCH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(s3.env())
    env.update(HOME=str(home), TMPDIR=str(tmp), RAY_TMPDIR=ray_tmp)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    server.start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def seedpipe(
    argv: list[str], workdir: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """The installed console script as a user runs it; its result and wall seconds."""
    start = time.monotonic()
    proc = subprocess.run([seedpipe_exe(), *argv], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
    return proc, time.monotonic() - start


def read_json(s3: S3Server, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.mark.slow
@pytest.mark.cluster  # `make test-cluster`: the S3 README chain (tests/test_object_store.py) is in `make test`
@pytest.mark.timeout(1500)
def test_demo_on_an_object_store_root_runs_every_step_and_a_rerun_reuses_them(tmp_path, s3):
    """Every step does its work on `s3://seed/demo`: the catalog, the run folders and the demo's own
    state, summary, evaluation, samples and step logs are objects in the bucket; the report names
    the store; nothing lands in the working folder. A second run reuses every step."""
    ray_tmp = tempfile.mkdtemp(prefix="s3d", dir="/tmp")
    mlflow = s3.tracking_server(tmp_path, BUCKET)
    try:
        mlflow.start()
        work = tmp_path / "user"
        work.mkdir()
        env = user_env(tmp_path, s3, ray_tmp, mlflow.uri)

        first, first_s = seedpipe(ARGV, work, env)
        out = first.stdout + first.stderr
        assert first.returncode == 0, out[-6000:]
        assert "results on the held-out split" in first.stdout and "i2t_r1_codes" in first.stdout
        for line in (f"corpus         {ROOT}/corpora/shapes", f"runs           {ROOT}/runs",
                     f"MLflow store   {mlflow.uri}", f"results        {ROOT}/demo/evaluation.json",
                     f"step logs      {ROOT}/demo/logs", f"seedpipe lineage models:/seed-lora/1 --root {ROOT}",
                     f"seedpipe evaluate --root {ROOT} --corpus shapes"):  # fmt: skip
            assert line in first.stdout, (line, first.stdout[-3000:])
        summary = read_json(s3, f"{PREFIX}demo/summary.json")
        assert [s["status"] for s in summary["steps"]] == ["built", "built", "trained", "built",
                                                           "trained", "built", "trained", "measured"]  # fmt: skip
        assert summary["models"]["lora"] == "models:/seed-lora/1"
        assert "i2t_r1_codes" in summary["metrics"]

        keys = set(s3.keys(BUCKET, PREFIX))
        demo = f"{PREFIX}demo"
        assert {f"{demo}/state.json", f"{demo}/summary.json", f"{demo}/evaluation.json",
                f"{demo}/shapes-urls.tsv"} <= keys  # fmt: skip
        assert read_json(s3, f"{demo}/state.json")["made_by"] == "seedpipe demo"
        logs = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{demo}/logs/")}
        assert {"1-ingest.log", "3-stage1.log", "8-evaluate.log", "ray-shutdown.log"} <= logs, logs
        assert any(k.startswith(f"{demo}/samples/") and k.endswith(".jpg") for k in keys)
        assert not any(k.startswith(f"{demo}/scratch/") for k in keys), (
            "the job-key probe stays local"
        )
        corpus = f"{PREFIX}corpora/shapes"
        for sid in ("00000", "00001"):
            assert f"{corpus}/raw/{sid}.done.json" in keys
            for stage in ("features", "qembeds", "tokens"):
                assert any(k.startswith(f"{corpus}/{stage}/") and k.endswith(f"/{sid}.done.json")
                           for k in keys), (stage, sid)  # fmt: skip
        for job in ("stage1", "stage2", "lora"):
            assert any(k.startswith(f"{PREFIX}runs/{job}-shapes-") and k.endswith("/registered_model.json")
                       for k in keys), job  # fmt: skip
        assert any(k.endswith("MLmodel") for k in s3.keys(BUCKET, "mlartifacts/"))

        second, second_s = seedpipe(ARGV, work, env)
        assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
        again = read_json(s3, f"{PREFIX}demo/summary.json")
        for name, took, record in (("first", first_s, summary), ("second", second_s, again)):
            steps = ", ".join(f"{s['name']} {s['seconds']:.0f}" for s in record["steps"])
            print(f"demo on s3, {name} run: {took:.0f} s in all; steps (s): {steps}")
        assert [s["status"] for s in again["steps"]] == ["up to date", "up to date", "skipped",
            "up to date", "skipped", "up to date", "skipped", "reused"], again["steps"]  # fmt: skip
        assert again["models"] == summary["models"] and again["metrics"] == summary["metrics"]
        assert "reused what was up to date: ingest, features, stage1" in second.stdout
        assert second_s < first_s / 2, (second_s, first_s)
        # the step logs grow across runs, as on a local root
        log = s3.client().get_object(Bucket=BUCKET, Key=f"{demo}/logs/1-ingest.log")["Body"].read()
        assert log.count(b"ingest plan:") == 1 and b"rows read" in log
        # Ray Data's logger, made during an earlier step, still writes (to the current step's log)
        evaluate_log = s3.client().get_object(Bucket=BUCKET, Key=f"{demo}/logs/8-evaluate.log")
        assert b"--- Logging error ---" not in evaluate_log["Body"].read()

        assert sorted(os.listdir(work)) == [], "something was written in the working folder"
    finally:
        mlflow.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_on_an_object_store_root_fresh_deletes_only_a_prefix_the_demo_made(tmp_path, s3, monkeypatch, capsys):  # fmt: skip
    """Without Ray (`--dry-run`): no tracking server is one error line before anything is written;
    `--fresh` refuses a prefix without demo/state.json and leaves it alone; on the demo's own prefix
    it deletes every object under it (a sibling sharing its name's start stays) and this node's
    mirrors and fetched copies of its folders (another root's stay)."""
    from jobs.demo import main
    from pipelines.storage import RunFolder, local_copy, scratch_dir, uri_key

    work = tmp_path / "user"
    work.mkdir()
    monkeypatch.chdir(work)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEEDPIPE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    put = s3.client().put_object

    assert main(["--root", ROOT, "--dry-run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MLFLOW_TRACKING_URI" in errors[0], errors
    assert s3.keys(BUCKET) == []

    # never contacted: a dry run tracks nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    put(Bucket=BUCKET, Key=f"{PREFIX}notes.txt", Body=b"not the demo's")
    assert main(["--root", ROOT, "--fresh", "--dry-run"]) == 2
    assert "not a folder made by `seedpipe demo`" in capsys.readouterr().err
    assert s3.keys(BUCKET) == [f"{PREFIX}notes.txt"]

    put(Bucket=BUCKET, Key=f"{PREFIX}demo/state.json", Body=b'{"made_by": "seedpipe demo"}')
    put(Bucket=BUCKET, Key=f"{PREFIX}corpora/shapes/raw/00000.tar", Body=b"x")
    put(Bucket=BUCKET, Key="demo-other/keep.txt", Body=b"another root")
    mine, other = RunFolder(f"{ROOT}/runs/stage1-x"), RunFolder("s3://seed/demo-other/runs/y")
    (mine.local / "mlflow_run_id").write_text("stale\n")
    fetched = scratch_dir("fetched") / uri_key(f"{ROOT}/runs/stage1-x/export")
    fetched.mkdir(parents=True)
    (fetched / ".complete").write_text(f"{ROOT}/runs/stage1-x/export")
    put(Bucket=BUCKET, Key="demo-other/tok/a.txt", Body=b"a")
    kept = Path(local_copy("s3://seed/demo-other/tok"))

    assert main(["--root", ROOT, "--fresh", "--dry-run"]) == 0
    assert "would run ingest, features" in capsys.readouterr().out
    assert s3.keys(BUCKET) == ["demo-other/keep.txt", "demo-other/tok/a.txt"]
    assert not mine.local.exists() and not fetched.exists()
    assert other.local.is_dir() and kept.is_dir()
    assert os.listdir(work) == []


def test_on_an_object_store_root_a_failed_steps_log_is_printed_and_kept_in_the_bucket(tmp_path, s3, monkeypatch):  # fmt: skip
    """A step that fails: its output (Python's and the descriptors', as a subprocess writes) is in
    its log, whose tail is printed under the log's store URI, and the log is in the bucket. A
    logging handler made during the step (as Ray Data makes one) can still write after it."""
    import io
    import logging

    from jobs.demo import Demo, DemoConfig

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEEDPIPE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    out = io.StringIO()
    demo = Demo(DemoConfig(root=ROOT), out)
    handlers: list[logging.StreamHandler] = []

    def fails() -> None:
        handlers.append(logging.StreamHandler())  # on sys.stderr as the step has it
        print("python line")
        subprocess.run(["echo", "subprocess line"], check=True)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        demo.step("features", "a step that fails", fails)
    printed = out.getvalue()
    assert "FAILED after" in printed and f"last lines of {ROOT}/demo/logs/2-features.log" in printed
    assert "  | python line" in printed and "  | subprocess line" in printed
    log = s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}demo/logs/2-features.log")["Body"]
    assert log.read().decode().splitlines() == ["python line", "subprocess line"]
    handlers[0].stream.write("after the step\n")  # not "I/O operation on closed file"
    handlers[0].stream.flush()
