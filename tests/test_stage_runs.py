"""Stage runs: recorded locally first, mirrored to MLflow, synced by the next invocation after an
outage. The outage test starts a real `mlflow server` on 127.0.0.1; the others use an unreachable
loopback port and the embedded SQLite store."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.catalog import Catalog, Plan
from pipelines.cli_common import StageConfig, run_stage
from pipelines.tracking import RunTracker, pending_stage_runs, stage_run, sync_pending
from pipelines.tracking.rundir import FALLBACK_FILE, RUN_ID_FILE, read_state
from pipelines.tracking.stage_runs import CONFIG_FILE, RECORD_FILE
from pipelines.tracking.store import RUN_KEY_TAG, find_or_create_run

CONFIG = {"corpus": "demo", "encoder": "tiny", "resources": {"num_workers": 2}}
INPUT = {"name": "demo/raw", "digest": "a" * 64, "uri": "file:///data/raw", "rows": 48}
OUTPUT = {"name": "demo/features/tiny", "digest": "b" * 64, "uri": "file:///data/f", "rows": 47}
METRICS = {"rows_in": 48.0, "rows_out": 47.0, "shards_failed": 0.0}


def _dead_uri() -> str:
    """A loopback URI nothing listens on (connection refused: a store that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _run_features_stage(catalog: Catalog) -> Path:
    """What `run_stage` logs for a stage that built shards, through the same `stage_run` API."""
    with stage_run(catalog, stage="features", corpus="demo", config=CONFIG) as run:
        run.log_dataset(context="input", **INPUT)
        run.log_dataset(context="output", **OUTPUT)
        run.log_metrics(METRICS)
        run.log_dict({"failed_shards": []}, "summary.json")
    return run.run_dir


def _features_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("seedpipe")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.stage = 'features'")


def _assert_delivered_once(client: MlflowClient, run_dir: Path) -> None:
    """The run of `run_dir` is on the server once, with its params, datasets and metrics once."""
    [run] = _features_runs(client)
    assert run.info.run_id == (run_dir / RUN_ID_FILE).read_text().strip()
    assert run.info.status == "FINISHED"
    assert run.data.params == {"corpus": "demo", "encoder": "tiny", "resources.num_workers": "2"}
    assert run.data.tags["corpus"] == "demo" and run.data.tags["run_dir"] == str(run_dir)
    assert run.data.tags["output.demo/features/tiny"] == "b" * 64
    datasets = Counter((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs)
    assert datasets == Counter({("demo/raw", "a" * 36): 1, ("demo/features/tiny", "b" * 36): 1})
    for key, value in METRICS.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(0, value)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json"} <= artifacts
    assert not (run_dir / FALLBACK_FILE).exists()
    assert json.loads((run_dir / RECORD_FILE).read_text())["run_id"] == run.info.run_id


def test_stage_run_with_store_down_records_locally(tmp_path, monkeypatch):
    """With the store unreachable a stage run finishes without raising and keeps its config,
    record and every op (the run's creation first) queued in its run folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    catalog = Catalog(tmp_path / "root")
    start = time.monotonic()
    run_dir = _run_features_stage(catalog)
    assert time.monotonic() - start < 15

    assert run_dir.parent == tmp_path / "root" / "runs" / "stages"
    assert run_dir.name.startswith("features-demo-")
    assert json.loads((run_dir / CONFIG_FILE).read_text()) == CONFIG
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["status"] == "FINISHED" and record["run_id"] is None
    assert [(d["name"], d["digest"]) for d in record["datasets"]] == [
        ("demo/raw", "a" * 64),
        ("demo/features/tiny", "b" * 64),
    ]
    assert record["metrics"] == METRICS
    ops = [json.loads(line) for line in (run_dir / FALLBACK_FILE).read_text().splitlines()]
    assert ops[0]["op"] == "create" and ops[-1] == ops[-1] | {"op": "status", "status": "FINISHED"}
    assert not (run_dir / RUN_ID_FILE).exists()
    assert pending_stage_runs(catalog) == [run_dir]

    start = time.monotonic()
    assert sync_pending(catalog, budget_s=2) == 0  # still down: bounded, no error
    assert time.monotonic() - start < 10
    assert (run_dir / FALLBACK_FILE).is_file()


def test_sync_adopts_a_run_whose_create_reply_was_lost(tmp_path, monkeypatch):
    """A queued run whose create reached the store before the outage (reply lost) is adopted by
    the sync, not created twice, and a second sync delivers nothing more."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    catalog = Catalog(tmp_path / "root")
    run_dir = _run_features_stage(catalog)
    store = f"sqlite:///{tmp_path}/store.db"
    client = MlflowClient(store)
    key = read_state(run_dir)["run_key"]
    landed = find_or_create_run(client, uri=store, experiment="seedpipe", run_key=key,
                                run_name="features:demo", tags={"stage": "features"})  # fmt: skip

    assert sync_pending(catalog, tracking_uri=store) == 1
    assert (run_dir / RUN_ID_FILE).read_text().strip() == landed
    _assert_delivered_once(client, run_dir)
    assert sync_pending(catalog, tracking_uri=store) == 0
    _assert_delivered_once(client, run_dir)
    [run] = _features_runs(client)
    assert run.data.tags[RUN_KEY_TAG] == key


def test_sync_skips_a_folder_a_live_tracker_holds(tmp_path, monkeypatch):
    """A sync leaves alone a stage run folder whose tracker is still open (it delivers its own
    queue) and never raises."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    catalog = Catalog(tmp_path / "root")
    run_dir = _run_features_stage(catalog)
    live = RunTracker(run_dir=run_dir, run_name="features:demo", create_timeout_s=0,
                      defer_create=True, tracking_uri=_dead_uri())  # fmt: skip
    try:
        assert sync_pending(catalog, tracking_uri=f"sqlite:///{tmp_path}/store.db") == 0
        assert (run_dir / FALLBACK_FILE).is_file()
    finally:
        live.close(timeout_s=0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stage_run_during_outage_is_synced_once_by_a_noop_invocation(tmp_path, mlflow_server,
                                                                     monkeypatch):  # fmt: skip
    """A stage that ran while the server was stopped is delivered, once, with its params,
    datasets and metrics by the next stage invocation with nothing to build; a second one and an
    explicit sync add nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    catalog = Catalog(tmp_path / "root")
    mlflow_server.stop()
    run_dir = _run_features_stage(catalog)
    assert (run_dir / FALLBACK_FILE).is_file()
    mlflow_server.start()

    def noop_invocation() -> None:
        config = StageConfig(root=str(tmp_path / "root"), corpus="demo")
        run_stage(catalog, stage="features", config=config, plan=Plan(up_to_date=["00000"]),
                  tasks=[], resolved={}, input_dir="", output_dir="", worker_cls=object,
                  worker_kwargs={})  # fmt: skip

    noop_invocation()
    client = MlflowClient(mlflow_server.uri)
    _assert_delivered_once(client, run_dir)
    noop_invocation()
    assert sync_pending(catalog) == 0
    _assert_delivered_once(client, run_dir)
    assert pending_stage_runs(catalog) == []
