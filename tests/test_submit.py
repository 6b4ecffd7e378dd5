"""`seedpipe submit` / `seedpipe jobs` against a real Ray head on 127.0.0.1, and the submission
they build (offline).

The head is `ray start --head --block` with its own temp dir and ports, `RAY_AUTH_MODE=disabled`
on both sides (PITFALLS.md: a mismatch is a 401), stopped in a finally by the pid of the process
the test started and the descendants recorded before stopping it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from jobs import submit
from pipelines.catalog import Catalog
from tests.raw_fixture import make_raw_corpus

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CORPUS = "sub"
MARK = "SEEDPIPE_TEST_HEAD"
"""Env var set on the head: every process of that head inherits it."""


# ---------------------------------------------------------------------------------------------
# offline: what submit sends


def test_submission_resolves_root_config_and_module(tmp_path, monkeypatch):
    """A relative root becomes absolute and is passed as --root and SEEDPIPE_ROOT; a shipped
    config stays a name; the module is the command's; no ray.init env key is shipped."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SEEDPIPE_ROOT", raising=False)
    sub = submit.build_submission("train-tokenizer", ["--stage", "1", "--config", "tiny_stage1",
                                  "--root", "data", "--corpus", "c"], cwd=tmp_path)  # fmt: skip
    root = str(tmp_path / "data")
    assert sub.entrypoint == (
        f"python -m jobs.cli train-tokenizer --stage 1 --config tiny_stage1 --corpus c --root {root}"
    )
    assert sub.runtime_env["env_vars"] == {"SEEDPIPE_ROOT": root}
    assert sub.runtime_env["working_dir"] == str(REPO)
    assert {".git", ".venv", "seed-data", "mlruns"} <= set(sub.runtime_env["excludes"])
    assert sub.submission_id.startswith("train-tokenizer-")
    # no --root: the YAML's root (tiny_stage1 says ./seed-data), made absolute
    sub = submit.build_submission("features", ["--corpus", "c", "root=/abs/r"], cwd=tmp_path)
    assert sub.root == "/abs/r" and sub.entrypoint.endswith("--corpus c --root /abs/r")
    sub = submit.build_submission(
        "train-lora", ["--config", "tiny_lora", "--corpus", "c"], cwd=tmp_path
    )
    assert sub.root == str(tmp_path / "seed-data")
    # every seedpipe command goes through the CLI; dotted modules as they are, without --root
    assert submit.build_submission("ui", [], cwd=tmp_path).entrypoint.startswith(
        "python -m jobs.cli ui"
    )
    assert submit.build_submission("http.server", ["0"]).entrypoint == "python -m http.server 0"


def test_submission_refuses_what_cannot_work_on_the_cluster(tmp_path, monkeypatch):
    """Refused here, clearly: an object-store root without a tracking server, a --config file
    outside the shipped tree, an unknown command, and a tree over Ray's package limit."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        submit.build_submission("features", ["--root", "s3://b/seed", "--corpus", "c"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    sub = submit.build_submission("features", ["--root", "s3://b/seed", "--corpus", "c"])
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    outside = tmp_path / "mine.yaml"
    outside.write_text("corpus: c\n")
    with pytest.raises(ValueError, match="outside the shipped tree"):
        submit.build_submission("train-lora", ["--config", str(outside)], cwd=tmp_path)
    inside = submit.build_submission(
        "train-lora", ["--config", "jobs/configs/tiny_lora.yaml"], cwd=REPO
    )
    assert "--config jobs/configs/tiny_lora.yaml" in inside.entrypoint
    with pytest.raises(ValueError, match="unknown command"):
        submit.build_submission("no-such-command", [])
    tree = tmp_path / "tree"
    (tree / "big").mkdir(parents=True)
    (tree / "big" / "blob.bin").write_bytes(b"x" * 5000)
    (tree / "small.py").write_text("print()\n")
    with pytest.raises(ValueError, match=r"over Ray's package limit .* largest: big"):
        submit.check_package_size(tree, submit.EXCLUDES, limit=4096)
    (tree / ".rayignore").write_text("big/\n")
    assert submit.check_package_size(tree, submit.EXCLUDES, limit=4096) < 4096


def test_own_flags_are_taken_from_anywhere_before_a_double_dash():
    """--address/--name/--wait are submit's wherever they are; the rest keeps its order."""
    own, rest = submit.split_own_flags(["features", "--corpus", "c", "--address", "http://h:8265",
                                        "--no-wait", "x=1", "--name=n", "--", "--address", "a"],
                                       submit.SubmitConfig)  # fmt: skip
    assert own == ["--address", "http://h:8265", "--no-wait", "--name=n"]
    assert rest == ["features", "--corpus", "c", "x=1", "--address", "a"]


# ---------------------------------------------------------------------------------------------
# against a real head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(width: int) -> int:
    """The first port of `width` consecutive ports that nothing listens on now."""
    for _ in range(200):
        base = random.randrange(30000, 45000 - width)
        try:
            for port in range(base, base + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


class LocalHead:
    """`ray start --head --block` on 127.0.0.1: own temp dir, every port chosen here."""

    def __init__(self) -> None:
        # short: Ray's unix sockets live under it (107-byte path limit)
        self.temp_dir = tempfile.mkdtemp(prefix="sp-ray-", dir="/tmp")
        names = ["port", "dashboard-port", "node-manager-port", "object-manager-port",
                 "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port"]  # fmt: skip
        self.ports = {name: _free_port() for name in names}
        self.worker_base = _free_range(100)
        self.url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{self.ports['port']}"
        self.log = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")
        }
        # jobs run `python -m ...`: the head's PATH finds this venv's python first
        return env | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", MARK: self.temp_dir,
                      "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}  # fmt: skip

    def start(self, timeout_s: float = 120) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "4",
               "--temp-dir", self.temp_dir, "--disable-usage-stats",
               "--min-worker-port", str(self.worker_base),
               "--max-worker-port", str(self.worker_base + 99)]  # fmt: skip
        cmd += [a for name, port in self.ports.items() for a in (f"--{name}", str(port))]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True)  # fmt: skip
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            try:
                JobSubmissionClient(self.url).list_jobs()
                return
            except Exception:
                time.sleep(1)
        raise TimeoutError(f"no job server at {self.url} after {timeout_s} s")

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM the blocking `ray start` (it stops its node), then kill by pid whatever of this
        head is left: the descendants recorded before, and orphans carrying this head's marker."""
        if self.proc is None:
            return
        try:
            # an exited `ray start`'s pid may belong to another process by now (pids wrap at 32768)
            alive = self.proc.poll() is None
            victims = psutil.Process(self.proc.pid).children(recursive=True) if alive else []
        except psutil.NoSuchProcess:
            victims = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for p in psutil.process_iter():
            try:
                if p.environ().get(MARK) == self.temp_dir:
                    victims.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        alive = []
        for p in victims:
            try:
                p.kill()
                alive.append(p)
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def seedpipe(*argv: str, cwd: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (no tracking URI, auth off like the head)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    return subprocess.run([str(VENV_BIN / "seedpipe"), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)  # fmt: skip


def submitted_id(out: str) -> str:
    match = re.search(r"^submitted (\S+):", out, re.M)
    assert match, out
    return match.group(1)


def wait_status(client, submission_id: str, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(submission_id))) not in wanted:
        assert time.monotonic() < deadline, f"{submission_id} still {status} after {timeout_s} s"
        time.sleep(1)
    return status


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_runs_stage1_on_a_head_and_reports_failures_and_stops(tmp_path):
    """On a real head: the tiny stage-1 job submitted with --wait SUCCEEDS and leaves its MLflow run
    and checkpoint in the catalog; a failing job's --wait exits with its code and the log tail
    shows the error; `seedpipe jobs` lists both; `seedpipe jobs stop` stops a running job."""
    import mlflow
    import ray
    from ray.job_submission import JobSubmissionClient

    from pipelines import features

    root, work = tmp_path / "catalog", tmp_path / "work"
    work.mkdir()
    make_raw_corpus(Catalog(str(root)), CORPUS, num_shards=3, per_shard=16)
    head = LocalHead()
    try:
        head.start()
        result = features.run(features.FeaturesConfig(root=str(root), corpus=CORPUS, encoder="tiny",
                                                      address=head.gcs_address))  # fmt: skip
        assert result.ok and result.rows_out == 48
        ray.shutdown()
        client = JobSubmissionClient(head.url)

        ok = seedpipe("submit", "train-tokenizer", "--stage", "1", "--config", "tiny_stage1",
                      "--root", str(root), "--corpus", CORPUS, "--address", head.url,
                      "--name", "stage1", cwd=work, timeout_s=900)  # fmt: skip
        assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
        stage1_id = submitted_id(ok.stdout)
        assert stage1_id.startswith("stage1-")
        assert f"job {stage1_id} SUCCEEDED" in ok.stdout
        assert "stage1: registered models:/seed-tokenizer-stage1/1" in ok.stdout  # streamed log
        info = client.get_job_info(stage1_id)
        assert str(info.status) == "SUCCEEDED" and info.metadata["name"] == "stage1"
        assert "--root " + str(root) in info.entrypoint

        run_dir = root / "runs" / f"stage1-{CORPUS}"
        ckpt = run_dir / "step00000012"
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "config.yaml").is_file()
        assert (ckpt / "step00000012" / "mp_rank_00_model_states.pt").is_file()
        tracking = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
        run = tracking.get_run((run_dir / "mlflow_run_id").read_text().strip())
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in tracking.get_metric_history(run.info.run_id, "loss")) == list(
            range(1, 13)
        )
        assert not list(work.iterdir()), "the job wrote into the submitting folder"

        bad = seedpipe("submit", "train-tokenizer", "--stage", "1", "--config", "tiny_stage1",
                       "--root", str(root), "--corpus", "missing", "--address", head.url,
                       "--name", "broken", cwd=work, timeout_s=300)  # fmt: skip
        bad_id = submitted_id(bad.stdout)
        assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
        assert f"job {bad_id} FAILED" in bad.stdout
        tail = seedpipe("jobs", "logs", bad_id, "--tail", "3", "--address", head.url, cwd=work)
        assert tail.returncode == 1 and "error:" in tail.stdout and "missing" in tail.stdout, (
            tail.stdout
        )

        long = seedpipe("submit", "http.server", "0", "--bind", "127.0.0.1", "--no-wait",
                        "--address", head.url, cwd=work, timeout_s=120)  # fmt: skip
        assert long.returncode == 0, long.stderr[-3000:]
        long_id = submitted_id(long.stdout)
        wait_status(client, long_id, {"RUNNING"}, timeout_s=120)
        listing = seedpipe("jobs", "--address", head.url, cwd=work)
        rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
        assert (
            rows[stage1_id] == "SUCCEEDED"
            and rows[bad_id] == "FAILED"
            and rows[long_id] == "RUNNING"
        )
        stop = seedpipe("jobs", "stop", long_id, "--address", head.url, cwd=work, timeout_s=120)
        assert stop.returncode == 0 and f"job {long_id} STOPPED" in stop.stdout, (
            stop.stdout + stop.stderr
        )
        assert str(client.get_job_status(long_id)) == "STOPPED"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.stop()
