"""RunTracker: stable run id, idempotent params, exactly-once metric steps across restarts and
tracking-server outages, fallback replay, MLflow's name rule, no environment edits. Stores are per-test SQLite files; the outage test starts
a real `mlflow server` on 127.0.0.1 and stops it in a fixture."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import RunTracker, check_names, replay_fallback
from pipelines.tracking.fields import tag_key
from pipelines.tracking.rundir import FALLBACK_FILE, REJECTED_FILE, RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_uri() -> str:
    """A loopback URI nothing listens on (connection refused: an unreachable server)."""
    return f"http://127.0.0.1:{_free_port()}"


def _steps(client: MlflowClient, run_id: str, key: str) -> Counter[int]:
    return Counter(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One embedded store for the module (creating its tables takes seconds); tests use their own
    run folders and experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def experiment(request, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return request.node.name


def test_run_id_is_stable_and_params_idempotent(tmp_path, sqlite_uri, experiment, caplog):
    """A second tracker on the same run folder continues the same run; re-logged params are
    accepted, a changed one is kept as a tag instead of failing."""
    config = {"model": {"width": 32, "layers": 2}, "lr": 1e-3}
    first = RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=sqlite_uri,
                         experiment=experiment)  # fmt: skip
    first.log_params(config)
    first.close()
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == first.run_id

    second = RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=sqlite_uri,
                         experiment=experiment)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        second.log_params(config)
        second.log_params({"lr": 2e-3})
    second.close()
    assert second.run_id == first.run_id
    run = second.client.get_run(first.run_id)
    assert run.data.params == {"model.width": "32", "model.layers": "2", "lr": "0.001"}
    assert run.data.tags["param_changed.lr"] == "0.002"
    assert run.info.status == "FINISHED"
    assert "params differ" in caplog.text
    assert len(second.client.search_runs([run.info.experiment_id])) == 1


def test_resumed_job_logs_each_step_exactly_once(tmp_path, sqlite_uri, experiment):
    """Steps 0..9, a crash (no close), then a new tracker re-logging 5..14: history holds 0..14 once."""
    tracker = RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=sqlite_uri,
                         experiment=experiment)  # fmt: skip
    run_id = tracker.run_id
    for step in range(10):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    del tracker  # the process "dies": no close, the run stays RUNNING
    gc.collect()

    resumed = RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=sqlite_uri,
                         experiment=experiment)  # fmt: skip
    assert resumed.run_id == run_id
    assert resumed.last_step("loss") == 9
    for step in range(5, 15):
        resumed.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1, "grad_norm": 1.0}, step=step)
    resumed.close()

    for key in ("loss", "lr"):
        assert _steps(resumed.client, run_id, key) == Counter(range(15))
    assert _steps(resumed.client, run_id, "grad_norm") == Counter(range(5, 15))
    assert resumed.client.get_run(run_id).info.status == "FINISHED"


def test_new_run_without_server_fails_clearly(tmp_path):
    """With no reachable server, creating a run retries for create_timeout_s, then raises and
    writes no run id."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot create the MLflow run"):
        RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=_dead_uri(),
                   create_timeout_s=1.5)  # fmt: skip
    assert time.monotonic() - start < 10
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()


def test_offline_resume_queues_then_replay_delivers_in_batches(tmp_path, sqlite_uri, experiment):
    """A resumed tracker that cannot reach its server queues everything (each call stays fast);
    replay_fallback delivers it in MLflow-sized batches, sets aside an op the server rejects, and
    skips points the server already has."""
    run_dir = tmp_path / "run"
    first = RunTracker(run_dir=run_dir, run_name="job", tracking_uri=sqlite_uri,
                         experiment=experiment)  # fmt: skip
    first.log_metrics({"loss": 0.0}, step=0)
    first.close()

    offline = RunTracker(run_dir=run_dir, run_name="job", tracking_uri=_dead_uri(),
                         retry_interval_s=0.2)  # fmt: skip
    artifact = tmp_path / "gone.txt"
    artifact.write_text("x")
    offline.log_artifact(artifact)
    deliver, attempts = offline._outbox.deliver, []
    offline._outbox.deliver = lambda budget_s: attempts.append(budget_s) or deliver(budget_s)
    for step in range(1, 1200):
        offline.log_metrics({"loss": float(step), **({"wide": 1.0} if step < 3 else {})}, step=step)
    # the calls queue and return: only the backed-off retries (0.2 s, doubling) try the server,
    # a dozen over the first ~200 s however fast the loop runs
    assert len(attempts) <= 12, f"{len(attempts)} delivery attempts for 1199 calls"
    offline.log_metrics({f"k{i}": float(i) for i in range(1500)}, step=7)  # > 1000 per batch
    offline.log_dict({"a": 1}, "config.json")
    offline.close(timeout_s=0.5)
    lines = (run_dir / FALLBACK_FILE).read_text().splitlines()
    assert len(lines) == offline.pending > 1200
    artifact.unlink()  # gone before it could be delivered: rejected, not blocking

    # the "server" already got steps 1..3 before the outage began (the reply was lost)
    client = MlflowClient(sqlite_uri)
    for step in (1, 2, 3):
        client.log_metric(first.run_id, "loss", float(step), step=step)
    delivered = replay_fallback(run_dir, sqlite_uri)
    assert delivered == len(lines) - 1
    assert not (run_dir / FALLBACK_FILE).exists()
    assert len((run_dir / REJECTED_FILE).read_text().splitlines()) == 1
    assert _steps(client, first.run_id, "loss") == Counter(range(1200))
    assert _steps(client, first.run_id, "k1499") == Counter([7])
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert "config.json" in {a.path for a in client.list_artifacts(first.run_id)}
    assert replay_fallback(run_dir, sqlite_uri) == 0


def test_replay_after_process_death(tmp_path, sqlite_uri, experiment):
    """Ops queued by a process that dies (os._exit, no cleanup) are delivered by replay_fallback."""
    run_dir = tmp_path / "run"
    RunTracker(
        run_dir=run_dir, run_name="job", tracking_uri=sqlite_uri, experiment=experiment
    ).close()
    script = textwrap.dedent(f"""
        import os
        from pipelines.tracking import RunTracker
        t = RunTracker(run_dir={str(run_dir)!r}, run_name="job", tracking_uri={_dead_uri()!r},
                       retry_interval_s=60)
        for step in range(5):
            t.log_metrics({{"loss": float(step)}}, step=step)
        t.set_tags({{"phase": "dying"}})
        os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    ops = [json.loads(line) for line in (run_dir / FALLBACK_FILE).read_text().splitlines()]
    assert [op["op"] for op in ops] == ["status", "batch", *["batch"] * 5, "batch"]

    assert replay_fallback(run_dir, sqlite_uri) == len(ops)
    client = MlflowClient(sqlite_uri)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert _steps(client, run_id, "loss") == Counter(range(5))
    assert client.get_run(run_id).data.tags["phase"] == "dying"


def test_name_rule_matches_mlflows_store(sqlite_uri, experiment):
    """check_names accepts exactly the metric names MLflow's store accepts (for these cases), and
    tag_key turns any dataset name into a valid tag name."""
    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    good = ["loss", "eval/recall_at_1", "rows.blocked_address", "a b:c-d", "x" * 250]
    bad = ["", "../up", "/abs", "a//b", "a/./b", "a/", "bad#name", "ünïcode?", "x" * 251]
    for name in good + bad:
        try:
            client.log_metric(run_id, name, 1.0)
            store_ok = True
        except Exception:
            store_ok = False
        try:
            check_names([name], "metric")
            ours_ok = True
        except ValueError:
            ours_ok = False
        assert (name in good) == ours_ok == store_ok, name
    for name in ["cc3m/features/paper-v2", "../x", "/abs//path/", "a#b?c", "./."]:
        check_names([tag_key("input", name)], "tag")
    assert tag_key("output", "synth/raw") == "output.synth/raw"


class _EnvSpy(MutableMapping):
    """os.environ, recording every read and write made through it."""

    def __init__(self, real: MutableMapping[str, str]) -> None:
        self.real, self.reads, self.writes = real, Counter(), []

    def __getitem__(self, key: str) -> str:
        self.reads[key] += 1
        return self.real[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.writes.append(("set", key, value))
        self.real[key] = value

    def __delitem__(self, key: str) -> None:
        self.writes.append(("del", key))
        del self.real[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.real)

    def __len__(self) -> int:
        return len(self.real)

    def copy(self) -> dict[str, str]:
        return dict(self.real)


def test_tracker_never_edits_the_environment_while_logging(tmp_path, monkeypatch):
    """Once a tracker exists, logging, retrying against a down server, flushing and closing make
    HTTP requests that read MLflow's settings from os.environ but never write it."""
    tracker = RunTracker(run_dir=tmp_path / "run", run_name="job", tracking_uri=_dead_uri(),
                         retry_interval_s=0, create_timeout_s=0, defer_create=True)  # fmt: skip
    spy = _EnvSpy(os.environ)
    monkeypatch.setattr(os, "environ", spy)
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.log_params({"optim": {"lr": 0.1}})
    tracker.set_tags({"phase": "outage"})
    tracker.log_dataset(name="demo/raw", digest="a" * 64, uri="file:///data/raw", context="input")
    tracker.log_dict({"a": 1}, "config.json")
    tracker.close(timeout_s=0.2)
    monkeypatch.undo()
    assert spy.writes == []
    assert spy.reads["MLFLOW_HTTP_REQUEST_TIMEOUT"] > 0  # the requests were made, bounded
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ  # set once, when the tracker was made
    assert tracker.pending > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_server_outage_is_queued_and_caught_up_exactly_once(tmp_path, mlflow_server, caplog):
    """With the server stopped, logging stays fast and lands in the fallback file; after it comes
    back on the same port and store, every step is on the server exactly once and the file is gone."""
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir=run_dir, run_name="outage", tracking_uri=mlflow_server.uri,
                         retry_interval_s=0.5)  # fmt: skip
    tracker.log_params({"optim": {"lr": 0.1}})
    for step in range(5):
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    assert tracker.pending == 0

    mlflow_server.stop()
    latencies = []
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        for step in range(5, 10):
            t0 = time.monotonic()
            tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.2)  # some calls fall due for a retry: still fast (connection refused)
        tracker.set_tags({"phase": "outage"})
        assert max(latencies) < 1.0, latencies
        assert tracker.pending == 6
        ops = [json.loads(line) for line in (run_dir / FALLBACK_FILE).read_text().splitlines()]
        assert [op["metrics"][0][3] for op in ops if op.get("metrics")] == [5, 6, 7, 8, 9]

        mlflow_server.start()
        for step in range(10, 15):
            tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
        assert tracker.flush(timeout_s=30)
    assert caplog.text.count("is unreachable") == 1
    assert caplog.text.count("reachable again") == 1
    assert not (run_dir / FALLBACK_FILE).exists()
    tracker.close()

    client = MlflowClient(mlflow_server.uri)
    for key in ("loss", "lr"):
        assert _steps(client, tracker.run_id, key) == Counter(range(15))
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"optim.lr": "0.1"}
    assert run.data.tags["phase"] == "outage"
    assert run.info.status == "FINISHED"
    print(f"server start seconds: {mlflow_server.start_seconds}, "
          f"logging latency while down: max {max(latencies) * 1e3:.1f} ms")  # fmt: skip


def test_job_run_name_names_the_run_folder_once():
    """The MLflow run name keeps an explicit run.name but never repeats `<job>-<corpus>`."""
    from pipelines.tracking.run_tags import job_run_name

    def name(folder: str) -> str:
        return job_run_name(
            job="lora", corpus="shapes", folder=folder, params={"a": 1}, input_digests=["d"]
        )

    digest = name("lora-shapes").rsplit("-", 1)[1]
    assert name("lora-shapes") == f"lora-shapes-{digest}"
    assert name("lora-shapes-8fb1fe3343") == f"lora-shapes-8fb1fe3343-{digest}"  # seedpipe demo's
    assert name("ablation") == f"lora-shapes-ablation-{digest}"
    assert name("lora-shapes2") == f"lora-shapes-lora-shapes2-{digest}"
