"""A real S3 API server on 127.0.0.1 for tests (moto's standalone server), started and stopped by
the test, bounded in time, in its own process group.

Clients reach it through the standard AWS variables (`env()`): pyarrow's S3FileSystem, s3fs (what
img2dataset writes through), boto3 and MLflow's S3 artifact repository all read them, so nothing in
seedpipe's configs is S3-specific.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port, stop_group

REGION = "us-east-1"


class S3Server:
    """`moto_server` on 127.0.0.1: a fresh, empty, in-memory S3 that lives as long as the process."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "s3-server.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """What a user of an S3-compatible store sets (AWS's names, plus MLflow's for artifacts)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # no ~/.aws lookups, no EC2 metadata probe (a 1 s timeout per client otherwise)
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def start(self, timeout_s: float = 60.0) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        cmd = [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"moto_server did not come up in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (paginated)."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def tracking_server(self, base: Path, bucket: str) -> MlflowServer:
        """A (not yet started) `mlflow server` in `base/mlflow` whose artifacts are objects in
        `s3://<bucket>/mlartifacts` on this server, as a cluster's tracking server keeps them."""
        server_dir = base / "mlflow"
        server_dir.mkdir()
        return MlflowServer(server_dir, artifacts_destination=f"s3://{bucket}/mlartifacts",
                            env=self.env())  # fmt: skip

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_group(self.proc, timeout_s)
        self.proc = None
