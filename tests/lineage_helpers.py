"""Helpers of the lineage / compare / status tests: copies of the session's chain, the commands as a user runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.chain import seedpipe_exe, user_env

TIMEOUT_S = 300


def copy_chain(chain_root: Path, base: Path, *, corpora: bool = True) -> Path:
    """A copy of the chain's root at `base/data` (`mlflow.db`, and the catalog when `corpora`), so
    that a test can damage or extend it without touching the session's chain. Artifacts stay where
    they are: the store names them by absolute path, so models:/ URIs resolve to the chain's own."""
    root = base / "data"
    root.mkdir(parents=True)
    shutil.copy2(chain_root / "mlflow.db", root / "mlflow.db")
    if corpora:
        shutil.copytree(chain_root / "corpora", root / "corpora")
    return root


def seedpipe(
    args: list[str], cwd: Path, timeout: int = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`seedpipe ARGS` as a user runs it (console script, MLFLOW_TRACKING_URI unset)."""
    return subprocess.run([seedpipe_exe(), *args], cwd=cwd, env=user_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def tracking_client(root: Path):  # noqa: ANN201 - an MlflowClient
    from pipelines.tracking import mlflow_client

    uri = f"sqlite:///{root.resolve()}/mlflow.db"
    return mlflow_client(uri)
