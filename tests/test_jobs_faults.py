"""Fault tolerance of the training jobs: a killed worker, a killed driver relaunched on another
number of workers (elastic resume), a tracking server outage.

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
import torch
from mlflow import MlflowClient

from jobs import train_tokenizer
from jobs.config import CONFIG_DIR
from tests.chain import CORPUS
from tests.mlflow_server import MlflowServer
from tests.process_tree import kill_driver_and_ray

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the session chain may build here
REPO = Path(__file__).resolve().parents[1]
STAGE1 = str(CONFIG_DIR / "tiny_stage1.yaml")
STAGE2 = str(CONFIG_DIR / "tiny_stage2.yaml")


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


def test_relaunched_driver_resumes_the_same_run_on_another_number_of_workers(root, tmp_path):
    """Stage 2's driver (and its local Ray) SIGKILLed after the step-3 checkpoint of a 2-worker
    run; the same command with scaling.num_workers=1 resumes it in the same MLflow run with every
    step logged once: the checkpoint converted to DeepSpeed's universal format and its very weights
    loaded, the global batch kept (4 x 2 accumulated), each row of the epoch consumed once."""
    from jobs.elastic import load_consumed_keys
    from jobs.trainer import state_digest

    run_dir = root / "runs" / "relaunched"
    ray_tmp = f"/tmp/rd{os.getpid()}"
    cmd = [sys.executable, "-m", "jobs.train_tokenizer", "--stage", "2", "--config", STAGE2, f"root={root}",
           f"corpus={CORPUS}", "stage1=models:/seed-tokenizer-stage1/1", "run.name=relaunched",
           "register_as=seed-tokenizer-relaunched", "optim.max_steps=9", "run.checkpoint_every=3",
           "run.keep_checkpoints=3"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        # Ray Train's record of registered checkpoints: kill only once step 3 is in it.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"

        def registered() -> bool:
            return snapshot.exists() and "step00000003" in snapshot.read_text()

        while time.monotonic() < deadline and not registered():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert "step00000003" in snapshot.read_text()
    finally:
        kill_driver_and_ray(proc, ray_tmp)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    second = subprocess.run([*cmd, "scaling.num_workers=1"], env=env | {"RAY_TMPDIR": ray_tmp + "b"},
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed at step" in second.stdout + second.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    again, logged = loss_steps(client, run_dir)
    assert again == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert logged == Counter(range(1, 10))

    resizes = [json.loads(line) for line in (run_dir / "resizes.jsonl").read_text().splitlines()]
    (resize,) = resizes
    assert (resize["from_workers"], resize["to_workers"]) == (2, 1) and resize["step"] >= 3
    assert (resize["global_batch"], resize["micro_batch"], resize["accumulation"]) == (8, 4, 2)
    tag = f"step{resize['step']:08d}"
    saved = torch.load(run_dir / tag / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]  # fmt: skip
    assert resize["weights_sha256"] == state_digest(saved)
    assert (run_dir / "universal" / tag / "zero").is_dir()

    # keys consumed in the epoch: those of the 2-rank checkpoint are carried by the later ones,
    # none twice, 8 per step
    state = json.loads((run_dir / "step00000009" / "trainer_state.json").read_text())
    assert state["world"] == 1 and state["step"] == 9
    before = load_consumed_keys(run_dir / tag).to_pylist()
    assert len(before) == len(set(before)) == resize["step"] * 8
    if state["epoch"] == 0:
        after = load_consumed_keys(run_dir / "step00000009").to_pylist()
        assert len(after) == len(set(after)) == 9 * 8 and set(before) <= set(after)


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
