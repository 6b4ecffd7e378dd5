"""Fault tolerance of the training jobs: a killed worker, a killed driver, a tracking server outage.

They run on the catalog the README chain built (tests/chain.py): its features, and its stage-1
run as the uninterrupted reference, so no stage-1 job is run twice for these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs import train_tokenizer
from jobs.config import CONFIG_DIR
from tests.chain import CORPUS
from tests.mlflow_server import MlflowServer
from tests.process_tree import kill_driver_and_ray

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the session chain may build here
REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(CONFIG_DIR / "tiny_stage1.yaml")


@pytest.fixture(scope="module")
def root(cli_chain):
    return cli_chain.root


def loss_steps(client: MlflowClient, run_dir: Path) -> tuple[str, Counter]:
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return run_id, Counter(m.step for m in client.get_metric_history(run_id, "loss"))


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec["metrics"]:
            out[rec["step"]] = rec["metrics"]["loss"]  # a resumed run rewrites its steps
    return out


def test_killed_worker_resumes_from_the_last_checkpoint(root):
    """Rank 1 SIGKILLed at step 7 (max_failures=1): the job finishes from the step-5 checkpoint; MLflow has
    steps 1..12 exactly once, and the resumed steps reproduce the chain's uninterrupted run's losses."""
    base = ["--stage", "1", "--config", STAGE1, "--root", str(root), "--corpus", CORPUS]
    assert (
        train_tokenizer.main([*base, "run.name=killed", "fault.kill_at_step=7", "fault.rank=1"])
        == 0
    )
    runs = root / "runs"
    assert (runs / "killed" / "fault_injected_step7").exists()  # the kill really happened
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    _, logged = loss_steps(client, runs / "killed")
    assert logged == Counter(range(1, 13))
    clean, killed = jsonl_losses(runs / f"stage1-{CORPUS}"), jsonl_losses(runs / "killed")
    # same step, optimizer state, RNG and next batches after the restart -> the same losses
    for step in range(1, 13):
        assert killed[step] == pytest.approx(clean[step], rel=1e-4, abs=1e-6), step


def test_relaunched_driver_resumes_the_same_run(root, tmp_path):
    """The driver process (and its local Ray) SIGKILLed after a checkpoint; the same command again
    resumes from it in the same MLflow run, with every step logged exactly once."""
    run_dir = root / "runs" / "driver"
    ray_tmp = f"/tmp/rd{os.getpid()}"
    cmd = [sys.executable, "-m", "jobs.train_tokenizer", "--stage", "1", "--config", STAGE1, f"root={root}",
           f"corpus={CORPUS}", "run.name=driver", "optim.max_steps=20"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        # Ray Train's record of registered checkpoints: kill only once step 5 is in it.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"

        def registered() -> bool:
            return snapshot.exists() and "step00000005" in snapshot.read_text()

        while time.monotonic() < deadline and not registered():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert "step00000005" in snapshot.read_text()
    finally:
        kill_driver_and_ray(proc, ray_tmp)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    second = subprocess.run(
        cmd, env=env | {"RAY_TMPDIR": ray_tmp + "b"}, capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed at step" in second.stdout + second.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    again, logged = loss_steps(client, run_dir)
    assert again == run_id
    assert logged == Counter(range(1, 21))


def test_tracking_server_outage_does_not_kill_the_job(root, tmp_path, monkeypatch):
    """A real `mlflow server` stopped mid-job and restarted: the job finishes and every step reaches MLflow once."""
    server = MlflowServer(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    run_dir = root / "runs" / "outage"
    argv = ["--stage", "1", "--config", STAGE1, f"root={root}", f"corpus={CORPUS}", "run.name=outage",
            "optim.max_steps=40", "register_as=outage-stage1"]  # fmt: skip
    result: dict[str, int] = {}
    job = threading.Thread(target=lambda: result.setdefault("rc", train_tokenizer.main(argv)))
    job.start()
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3
        ):
            time.sleep(0.2)
        server.stop()
        stopped_at = len(metrics.read_text().splitlines())
        while (
            time.monotonic() < deadline and len(metrics.read_text().splitlines()) < stopped_at + 8
        ):
            time.sleep(0.2)  # the job keeps training while the server is down
        assert job.is_alive() or result.get("rc") == 0
        server.start()
        job.join(timeout=400)
    finally:
        server.stop()
    assert result.get("rc") == 0
    server.start()
    try:
        client = MlflowClient(server.uri)
        _, logged = loss_steps(client, run_dir)
        assert logged == Counter(range(1, 41))
        assert client.get_model_version("outage-stage1", "1").run_id
    finally:
        server.stop()
