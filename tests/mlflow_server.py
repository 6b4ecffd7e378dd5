"""A real `mlflow server` on 127.0.0.1 for tests: started and stopped by the test, bounded in time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic_auth_env(root: Path, *, admin_username: str, admin_password: str,
                   default_permission: str = "READ") -> dict[str, str]:  # fmt: skip
    """The environment of an `--app-name basic-auth` server: its ini (auth users in
    `root/auth.db`), the admin to create on first start, and the CSRF key the app insists on."""
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{root}/auth.db\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "seedpipe-tests-only-csrf-key",
    }


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store, in its own process group."""

    def __init__(self, root: Path, *, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None, app_name: str | None = None) -> None:  # fmt: skip
        """`artifacts_destination`: where the server stores artifacts (default `root/artifacts`;
        e.g. `s3://bucket/mlartifacts` with the S3 variables in `env`). `app_name`: MLflow's
        `--app-name` (e.g. `basic-auth`)."""
        self.root = root
        self.artifacts_destination = artifacts_destination or str(root / "artifacts")
        self.extra_env = dict(env or {})
        self.app_name = app_name
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: list[float] = []

    def start(self, timeout_s: float = 60.0) -> None:
        # The job runner spawns huey consumers that outlive a SIGTERM to the server process alone;
        # it is not needed here and slows the start on 2 cores.
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{self.root}/server.db", "--artifacts-destination",
               self.artifacts_destination, "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"] + (["--app-name", self.app_name] if self.app_name else [])  # fmt: skip
        t0 = time.monotonic()
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # fmt: skip
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        self.start_seconds.append(time.monotonic() - t0)
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"mlflow server did not come up in {timeout_s}s:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_group(self.proc, timeout_s)
        self.proc = None


def stop_group(proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM a server started with `start_new_session=True` and its process group, SIGKILL
    after `timeout_s`; None (never started, or stopped) does nothing."""
    if proc is None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
