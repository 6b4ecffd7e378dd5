"""A run folder's tracking files: their names, the small state file, atomic writes, and the lock
that gives one process (a tracker, a replay or a sync) the folder at a time.

    <run_dir>/mlflow_run_id          the MLflow run id, once the run exists on the server
    <run_dir>/mlflow_state.json      run key, tracking URI, last step per metric key
    <run_dir>/mlflow_fallback.jsonl  the ops not yet delivered, in order (absent when none)
    <run_dir>/mlflow_rejected.jsonl  ops the server refused, with the error
    <run_dir>/mlflow.lock            the folder lock (filelock; flock on POSIX)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

RUN_ID_FILE = "mlflow_run_id"
STATE_FILE = "mlflow_state.json"
FALLBACK_FILE = "mlflow_fallback.jsonl"
REJECTED_FILE = "mlflow_rejected.jsonl"
LOCK_FILE = "mlflow.lock"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def read_state(run_dir: Path) -> dict[str, Any]:
    """The state file's fields ({} when absent or unreadable: it is rebuilt from the queue)."""
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(run_dir / STATE_FILE, json.dumps(state, sort_keys=True))


class RunDirBusy(RuntimeError):
    """Another live process holds the run folder."""


class RunDirLock:
    """Exclusive lock on `<run_dir>/mlflow.lock` for the holder's lifetime (or `release`).

    flock underneath: the kernel drops it when the holder dies, so a restarted job gets it back.
    `wait_s=0` tries once (a sync skips a folder a live stage holds)."""

    def __init__(self, run_dir: Path, wait_s: float = 10.0) -> None:
        self.path = run_dir / LOCK_FILE
        # thread_local=False: a tracker may be closed from another thread than the one that made it
        self._lock: FileLock | None = FileLock(self.path, timeout=wait_s, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise RunDirBusy(
                f"{run_dir} is in use by another RunTracker, replay or sync (lock {self.path})"
            ) from None
        except OSError as exc:  # e.g. a read-only folder: go on unprotected
            self._lock = None
            warnings.warn(f"cannot lock {self.path} ({exc}); continuing", stacklevel=2)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
