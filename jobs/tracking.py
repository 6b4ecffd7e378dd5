"""`RunTracker`: rank-0 MLflow logging for long training jobs that survives restarts and outages.

- **One run per job, stable id.** The run id lives in `<run_dir>/mlflow_run_id`. A restarted job
  (Ray Train worker failure, or the driver re-launched on the same run folder) reuses it and sets
  the run back to RUNNING. Creating a *new* run needs the server: it is retried with backoff for
  `create_timeout_s`, then a clear error is raised (a job cannot start without a run id). Resuming
  an *existing* run does not: with the server down the tracker starts offline and queues.
- **Each metric step exactly once.** MLflow keeps every (step, value) sent, so a resumed job that
  re-logs step k would duplicate it. The tracker keeps the last step accepted per metric key (read
  back on resume from the server's latest metrics, from `<run_dir>/mlflow_state.json` and from the
  pending ops) and drops steps <= that. Because each key is delivered in increasing step order, a
  (key, step) is on the server iff step <= the server's latest step for that key: before
  re-sending queued ops after a failure (when the last batch may have landed without its reply)
  they are filtered against the server, so delivery is idempotent too.
- **Outages never kill or stall the job.** Every MLflow call is one bounded HTTP attempt (no
  MLflow-internal retries, `request_timeout_s`). A failed op is kept in memory and in
  `<run_dir>/mlflow_fallback.jsonl` (the file always equals the undelivered queue, rewritten
  atomically), and later calls retry the queue in order, no more often than `retry_interval_s`,
  the interval doubling while the outage lasts (up to 60 s); one warning per outage, one on
  recovery. A refused connection costs a call ~1 ms; a server that accepts but never answers
  costs the call that falls due `request_timeout_s`, hence the backoff. Catching up a backlog
  takes at most ~1 s of each call (`DRAIN_BUDGET_S`). Ops the server *rejects* (4xx, a missing
  artifact file) go to `mlflow_rejected.jsonl` with the error instead of blocking the queue; bad
  metric/param/tag names raise ValueError at the call instead (MLflow's own name rules). What a
  dead process left queued is pushed by the next tracker on the same run folder, or by
  `replay_fallback` / `python -m jobs.tracking replay RUN_DIR`.

The retry policy is these few lines (`_Outbox.deliver`, `_note_failure` and the `_next_retry`
gate) rather than a retry library: the op must be queued and the training step must return
between attempts, which a blocking `@retry` wrapper (tenacity; not installed here anyway) does not
do.

MLflow reads `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT` from the
environment at every request (mlflow/utils/rest_utils.py). They are set only *around* this
module's own calls, under a lock, and restored after, so the defaults (7 retries with backoff,
120 s) still hold for other MLflow use in the process. Caveat: an MLflow call made by another
thread *during* one of ours (milliseconds, or up to `request_timeout_s` in an outage) sees the
bounded settings too. Rank-0 training loops log from one thread, so this does not arise there.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import mlflow
import requests
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

from pipelines.lineage import EXPERIMENT, code_version, flatten

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
FALLBACK_FILE = "mlflow_fallback.jsonl"
REJECTED_FILE = "mlflow_rejected.jsonl"
STATE_FILE = "mlflow_state.json"
LOCK_FILE = "mlflow.lock"

# MLflow's log_batch limits (mlflow/utils/validation.py).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TAG_VALUE = 8000
# Work a logging call may spend catching up a backlog; the rest waits for the next call.
DRAIN_BUDGET_S = 1.0
# Longest wait between two delivery attempts during an outage.
MAX_RETRY_INTERVAL_S = 60.0

_HTTP_ENV_LOCK = threading.RLock()


@contextmanager
def bounded_http(timeout_s: float) -> Iterator[None]:
    """One HTTP attempt per MLflow request, `timeout_s` per connect/read, for calls in this block."""
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
    }
    with _HTTP_ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later (server down, timeout, 5xx, 429), as opposed to rejected by the server."""
    if isinstance(exc, MlflowException):
        # MLflow wraps connection errors and timeouts as INTERNAL_ERROR (500)
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.startswith("sqlalchemy")  # e.g. a locked SQLite store


def _check_names(names: Iterator[str] | Sequence[str], check: Any, what: str) -> None:
    """MLflow's own name rules, applied when the call is made: a bad name is the caller's bug,
    raised now rather than rejected by the server after the training step has moved on."""
    for name in names:
        try:
            check(name)
        except MlflowException as exc:
            raise ValueError(f"invalid MLflow {what} name {name!r}: {exc.message}") from None


def check_metric_names(names: Iterator[str] | Sequence[str]) -> None:
    _check_names(names, _validate_metric_name, "metric")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _default_artifact_location(uri: str) -> str | None:
    """Beside an embedded SQLite store, `<db dir>/mlartifacts` (pipelines.lineage's layout);
    a server or other store decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def _server_last_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Latest step per metric key on the server (MLflow's latest metric is the one of max step)."""
    run = client.get_run(run_id)
    # RunData exposes only latest *values* publicly; the Metric objects carry the step.
    return {m.key: int(m.step) for m in run.data._metric_objs}


class _DirLock:
    """Exclusive flock on `<run_dir>/mlflow.lock`: one tracker (or replay) per run folder.

    Released by the kernel when the holder dies, so a restarted job gets it back."""

    def __init__(self, run_dir: Path, wait_s: float = 10.0) -> None:
        self.path = run_dir / LOCK_FILE
        self.file: TextIO | None = open(self.path, "a")  # noqa: SIM115 (held for the lifetime)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.file.close()
                    raise RuntimeError(
                        f"{run_dir} is in use by another RunTracker or replay (lock {self.path})"
                    ) from None
                time.sleep(0.2)
            except OSError as exc:  # e.g. a filesystem without locks: go on unprotected
                warnings.warn(f"cannot lock {self.path} ({exc}); continuing", stacklevel=3)
                return

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


class _Outbox:
    """The ordered queue of undelivered ops, mirrored in the fallback file, and their delivery.

    An op is one JSON line: {"run_id", "op": "batch"|"inputs"|"artifact"|"dict"|"status", ...}.
    The file holds the queue minus its `unpersisted` newest lines until `persist` (after every
    public call) appends those, or rewrites the file once ops left the queue (`dirty`)."""

    def __init__(self, client: MlflowClient, run_dir: Path, request_timeout_s: float) -> None:
        self.client = client
        self.path = run_dir / FALLBACK_FILE
        self.rejected_path = run_dir / REJECTED_FILE
        self.request_timeout_s = request_timeout_s
        self.queue: deque[str] = deque()
        self.unpersisted = 0
        self.dirty = False
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError:  # a line torn by a crash mid-append
                        logger.warning("skipping a corrupt line in %s: %.80s", self.path, line)
                        self.dirty = True
                        continue
                    self.queue.append(line)
        # After a failure the last batch may have landed without its reply reaching us.
        self.needs_sync = bool(self.queue)
        self.delivered = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, op: dict[str, Any]) -> None:
        self.queue.append(json.dumps(op, separators=(",", ":")))
        self.unpersisted += 1

    def pop(self) -> None:
        self.queue.popleft()
        self.unpersisted = min(self.unpersisted, len(self.queue))
        self.dirty = True

    def ops(self) -> Iterator[dict[str, Any]]:
        for line in self.queue:
            yield json.loads(line)

    def persist(self) -> None:
        """Bring the file up to date with the queue (atomic rewrite when ops left it)."""
        if self.dirty:
            if self.queue:
                _write_atomic(self.path, "".join(line + "\n" for line in self.queue))
            else:
                self.path.unlink(missing_ok=True)
        elif self.unpersisted:
            with open(self.path, "a") as f:
                tail = islice(self.queue, len(self.queue) - self.unpersisted, None)
                f.write("".join(line + "\n" for line in tail))
        self.dirty, self.unpersisted = False, 0

    def filter_delivered(self, server_steps: Mapping[str, Mapping[str, int]]) -> None:
        """Drop queued metric points the server already has (step <= its latest for the key)."""
        kept: deque[str] = deque()
        for line in self.queue:
            op = json.loads(line)
            steps = server_steps.get(op["run_id"], {})
            if op["op"] == "batch" and op.get("metrics"):
                before = len(op["metrics"])
                op["metrics"] = [m for m in op["metrics"] if m[3] > steps.get(m[0], -math.inf)]
                if len(op["metrics"]) != before:
                    self.dirty = True
                    if not (op["metrics"] or op.get("params") or op.get("tags")):
                        self.delivered += 1
                        continue
                    line = json.dumps(op, separators=(",", ":"))
            kept.append(line)
        self.unpersisted = min(self.unpersisted, len(kept))
        self.queue = kept

    def _sync(self) -> None:
        run_ids = {op["run_id"] for op in self.ops() if op["op"] == "batch"}
        self.filter_delivered({r: _server_last_steps(self.client, r) for r in run_ids})
        self.needs_sync = False

    def _take(self) -> list[dict[str, Any]]:
        """The next call's ops: one op, or consecutive `batch` ops of one run within MLflow's limits."""
        first = json.loads(self.queue[0])
        taken = [first]
        if first["op"] != "batch":
            return taken
        counts = [len(first.get(k) or ()) for k in ("metrics", "params", "tags")]
        for line in islice(self.queue, 1, None):
            op = json.loads(line)
            if op["op"] != "batch" or op["run_id"] != first["run_id"]:
                break
            new = [c + len(op.get(k) or ()) for c, k in zip(counts, ("metrics", "params", "tags"))]
            if new[0] > MAX_METRICS_PER_BATCH or max(new[1:]) > MAX_PARAMS_TAGS_PER_BATCH:
                break
            if sum(new) > MAX_METRICS_PER_BATCH:
                break
            counts = new
            taken.append(op)
        return taken

    def _send(self, ops: Sequence[dict[str, Any]]) -> None:
        c, run_id, kind = self.client, ops[0]["run_id"], ops[0]["op"]
        if kind == "batch":
            # [key, value, timestamp, step] (+ [model_id, dataset_name, dataset_digest])
            metrics = [Metric(*m) for op in ops for m in op.get("metrics", ())]
            params: dict[str, str] = {}
            tags: dict[str, str] = {}
            for op in ops:
                params.update(op.get("params") or {})
                tags.update(op.get("tags") or {})  # a later value of a tag wins
            if metrics or params or tags:
                c.log_batch(run_id, metrics=metrics,
                            params=[Param(k, v) for k, v in params.items()],
                            tags=[RunTag(k, v) for k, v in tags.items()])  # fmt: skip
        elif kind == "inputs":
            inputs = [
                DatasetInput(
                    Dataset(**d["dataset"]), [InputTag(k, v) for k, v in d["tags"].items()]
                )
                for d in ops[0]["datasets"]
            ]
            c.log_inputs(run_id, datasets=inputs)
        elif kind == "artifact":
            path = Path(ops[0]["local_path"])
            if not path.exists():
                raise ValueError(f"artifact {path} no longer exists")
            if path.is_dir():
                c.log_artifacts(run_id, str(path), ops[0]["artifact_path"])
            else:
                c.log_artifact(run_id, str(path), ops[0]["artifact_path"])
        elif kind == "dict":
            c.log_dict(run_id, ops[0]["data"], ops[0]["artifact_file"])
        elif kind == "status":
            if ops[0]["status"] == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, ops[0]["status"], ops[0].get("end_time"))
        else:
            raise ValueError(f"unknown op {kind!r}")

    def _reject(self, op: dict[str, Any], exc: BaseException) -> None:
        logger.error("MLflow rejected a %s op (kept in %s): %s", op["op"], self.rejected_path, exc)
        with open(self.rejected_path, "a") as f:
            f.write(json.dumps({"error": str(exc)[:2000], "op": op}) + "\n")
        self.rejected += 1

    def deliver(self, budget_s: float) -> BaseException | None:
        """Send queued ops in order until none is left, `budget_s` is spent or a transient failure
        (returned). Rejected ops are set aside. The file is brought up to date either way."""
        deadline = time.monotonic() + budget_s
        error: BaseException | None = None
        try:
            with bounded_http(self.request_timeout_s):
                if self.queue and self.needs_sync:
                    self._sync()
                first = True  # at least one op per call, whatever the budget
                while self.queue and (first or time.monotonic() < deadline):
                    first = False
                    ops = self._take()
                    try:
                        self._send(ops)
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        # rejected: find the culprit(s), one op at a time
                        for op in ops:
                            try:
                                if len(ops) > 1:
                                    self._send([op])
                                    self.delivered += 1
                                else:
                                    self._reject(op, exc)
                            except Exception as exc1:
                                if is_transient(exc1):
                                    raise
                                self._reject(op, exc1)
                            self.pop()
                    else:
                        self.delivered += len(ops)
                        for _ in ops:
                            self.pop()
        except Exception as exc:
            if not is_transient(exc):
                raise
            error = exc
            self.needs_sync = True
        finally:
            self.persist()
        return error


class RunTracker:
    """Rank-0 MLflow logging into one stable run; never raises into the training loop on tracking
    failures (see the module docstring for the policy).

    Build it on rank 0 only (`ray.train.get_context().get_world_rank() == 0`), inside the worker:
    it holds a lock on `run_dir` and is not picklable. `tracking_uri` defaults to MLflow's current
    one (MLFLOW_TRACKING_URI; jobs pass `pipelines.lineage.tracking_uri(catalog)`). `experiment`,
    `run_name` and `tags` are used when the run is created; a resumed run keeps its experiment and
    name, and `tags` are set again. `create_timeout_s` bounds the wait for a server when there is
    no run yet; `retry_interval_s` and `request_timeout_s` bound every later call.
    """

    def __init__(self, *, run_dir: str | Path, run_name: str, experiment: str = EXPERIMENT,
                 tracking_uri: str | None = None, tags: dict[str, str] | None = None,
                 retry_interval_s: float = 5.0, request_timeout_s: float = 5.0,
                 create_timeout_s: float = 60.0) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.retry_interval_s = retry_interval_s
        self.request_timeout_s = request_timeout_s
        self._lock = threading.RLock()
        self._dir_lock = _DirLock(self.run_dir)
        self._closed = False
        self._outage_since: float | None = None
        self._next_retry = 0.0
        self._retry_delay = retry_interval_s
        try:
            self._outbox = _Outbox(self.client, self.run_dir, request_timeout_s)
            self._last_step: dict[str, int] = {}
            self._params: dict[str, str] = {}
            self._load_local_state()
            self.run_id = self._open_run(experiment, tags or {}, create_timeout_s)
        except BaseException:
            self._dir_lock.release()
            raise

    # ---- run creation / resume
    def _load_local_state(self) -> None:
        path = self.run_dir / STATE_FILE
        if path.is_file():
            with suppress(ValueError):
                self._last_step.update(json.loads(path.read_text()).get("last_step", {}))
        for op in self._outbox.ops():
            for key, step in ((m[0], m[3]) for m in op.get("metrics") or ()):
                self._last_step[key] = max(step, self._last_step.get(key, step))
            self._params.update(op.get("params") or {})

    def _save_local_state(self) -> None:
        _write_atomic(
            self.run_dir / STATE_FILE,
            json.dumps({"run_id": self.run_id, "last_step": self._last_step}),
        )

    def _open_run(self, experiment: str, tags: Mapping[str, str], create_timeout_s: float) -> str:
        path = self.run_dir / RUN_ID_FILE
        tags = {"code_version": code_version(), **tags}
        if path.is_file():
            run_id = path.read_text().strip()
            self.run_id = run_id
            try:
                with bounded_http(self.request_timeout_s):
                    run = self.client.get_run(run_id)
            except Exception as exc:
                if not is_transient(exc):
                    raise ValueError(
                        f"{path} names run {run_id}, which {self.tracking_uri} cannot give: {exc}"
                    ) from exc
                self._note_failure(exc)  # resume offline: everything queues until it is back
            else:
                server = {m.key: int(m.step) for m in run.data._metric_objs}
                for key, step in server.items():
                    self._last_step[key] = max(step, self._last_step.get(key, step))
                self._params.update(run.data.params)
                self._outbox.filter_delivered({run_id: server})
                self._outbox.needs_sync = False
            logger.info("resuming MLflow run %s (%s)", run_id, self.tracking_uri)
            self._enqueue([{"op": "status", "status": "RUNNING"}, *self._tag_ops(tags)])
            return run_id
        run_id = self._create_run(experiment, tags, create_timeout_s)
        _write_atomic(path, run_id + "\n")
        self.run_id = run_id
        self._save_local_state()
        return run_id

    def _create_run(self, experiment: str, tags: Mapping[str, str], timeout_s: float) -> str:
        deadline, delay = time.monotonic() + timeout_s, 0.5
        while True:
            try:
                with bounded_http(self.request_timeout_s):
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        try:
                            exp_id = self.client.create_experiment(
                                experiment, _default_artifact_location(self.tracking_uri)
                            )
                        except MlflowException as exc:  # created concurrently
                            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                                raise
                            found = self.client.get_experiment_by_name(experiment)
                            assert found is not None
                            exp_id = found.experiment_id
                    else:
                        exp_id = exp.experiment_id
                    run = self.client.create_run(exp_id, run_name=self.run_name, tags=dict(tags))
                logger.info("created MLflow run %s (%s)", run.info.run_id, self.tracking_uri)
                return run.info.run_id
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise RuntimeError(
                        f"cannot create the MLflow run for {self.run_dir} at {self.tracking_uri} "
                        f"(tried for {timeout_s:.0f}s): {exc}. The job needs a run id to start: "
                        "bring the tracking server up (or point MLFLOW_TRACKING_URI at a reachable "
                        "store) and start it again."
                    ) from exc
                logger.warning(
                    "MLflow at %s unreachable (%s); retrying in %.1fs",
                    self.tracking_uri,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ---- queueing and delivery
    def _op(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "op": kind, **fields}

    def _tag_ops(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        items = [(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        _check_names([k for k, _ in items], _validate_tag_name, "tag")
        return [
            {"op": "batch", "tags": dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])}
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH)
        ]

    def _note_failure(self, exc: BaseException) -> None:
        # The retry interval doubles while the outage lasts (up to MAX_RETRY_INTERVAL_S): against
        # a server that accepts connections but never answers, each attempt costs the training
        # loop a full request_timeout_s, so attempts must thin out.
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self._retry_delay = self.retry_interval_s
            logger.warning(
                "MLflow at %s is unreachable (%s): queuing to %s, retrying from every %gs",
                self.tracking_uri, exc, self._outbox.path, self.retry_interval_s,
            )  # fmt: skip
        else:
            cap = max(self.retry_interval_s, MAX_RETRY_INTERVAL_S)
            self._retry_delay = min(self._retry_delay * 2, cap)
        self._next_retry = now + self._retry_delay

    def _drain(self, budget_s: float, force: bool = False) -> None:
        if not force and self._outage_since is not None and time.monotonic() < self._next_retry:
            self._outbox.persist()
            return
        try:
            error = self._outbox.deliver(budget_s)
        except Exception as exc:  # never into the training loop
            logger.exception("unexpected error while logging to MLflow; ops stay queued")
            error = exc
            self._outbox.persist()
        if error is not None:
            self._note_failure(error)
        elif self._outage_since is not None:
            logger.warning(
                "MLflow at %s is reachable again after %.0fs; %d ops still queued",
                self.tracking_uri, time.monotonic() - self._outage_since, len(self._outbox),
            )  # fmt: skip
            self._outage_since = None

    def _enqueue(self, ops: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            if self._closed:
                logger.warning(
                    "RunTracker for %s is closed; dropping a %s op", self.run_dir, ops[0]["op"]
                )
                return
            for op in ops:
                self._outbox.add({"run_id": self.run_id, **op})
            self._drain(DRAIN_BUDGET_S)

    # ---- public API
    @property
    def pending(self) -> int:
        """Ops not yet delivered (in memory and in the fallback file)."""
        return len(self._outbox)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened config as params; ones the run already has are skipped (a restart re-logs its
        config). A value that differs from the run's is not re-logged (MLflow params are immutable):
        it is warned about and recorded as tag `param_changed.<key>`."""
        flat = flatten(params)
        _check_names(list(flat), _validate_param_name, "param")
        with self._lock:
            new = {k: v for k, v in flat.items() if k not in self._params}
            changed = {k: v for k, v in flat.items() if k in self._params and self._params[k] != v}
            if changed:
                logger.warning(
                    "params differ from the run's first values (kept as tags): %s", sorted(changed)
                )
            self._params.update(new)
            items = list(new.items())
            ops = [
                {"op": "batch", "params": dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH])}
                for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH)
            ]
            ops += self._tag_ops({f"param_changed.{k}": v for k, v in changed.items()})
            if ops:
                self._enqueue(ops)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, model_id: str | None = None,
                    dataset_name: str | None = None, dataset_digest: str | None = None) -> None:  # fmt: skip
        """Metrics at `step`; a (key, step) at or before the key's last logged step is dropped.

        `model_id` / `dataset_name` + `dataset_digest` link the points to an MLflow 3 logged model
        and an evaluation dataset (what `mlflow.log_metric(..., model_id=, dataset=)` records)."""
        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step must be an integer, got {step!r}")
        if (dataset_name is None) != (dataset_digest is None):
            raise ValueError("give both dataset_name and dataset_digest, or neither")
        check_metric_names([str(k) for k in metrics])
        step, ts = int(step), _now_ms()
        links = [model_id, dataset_name, dataset_digest] if model_id or dataset_name else []
        with self._lock:
            fresh = []
            for key, value in metrics.items():
                if step > self._last_step.get(key, -math.inf):
                    fresh.append([str(key), float(value), ts, step, *links])
                    self._last_step[str(key)] = step
            if not fresh:
                return
            self._enqueue(
                [
                    {"op": "batch", "metrics": fresh[i : i + MAX_METRICS_PER_BATCH]}
                    for i in range(0, len(fresh), MAX_METRICS_PER_BATCH)
                ]
            )
            self._save_local_state()

    def last_step(self, key: str | None = None) -> int | None:
        """The last step accepted for `key` (any key when None); None when nothing was logged."""
        with self._lock:
            if key is not None:
                return self._last_step.get(key)
            return max(self._last_step.values(), default=None)

    def log_dataset(
        self, *, name: str, digest: str, uri: str, context: str, rows: int | None = None
    ) -> None:
        """A dataset this run read (`input`) or wrote (`output`), as pipelines.lineage logs it:
        a MetaDataset input with its content digest, plus run tag `<context>.<name>` = digest."""
        with warnings.catch_warnings():  # file:// matches two equivalent local source classes
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])  # type: ignore[abstract]
        entity = dataset.to_dict()
        tags = {MLFLOW_DATASET_CONTEXT: context, "digest": digest}
        if rows is not None:
            tags["rows"] = str(rows)
        self._enqueue(
            [
                {"op": "inputs", "datasets": [{"dataset": entity, "tags": tags}]},
                *self._tag_ops({f"{context}.{re.sub(r'[^A-Za-z0-9_./: -]', '_', name)}": digest}),
            ]
        )

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file or directory as run artifact. Queued ops refer to the path: while the server is
        down, keep the file in place (and unchanged) until `pending` is 0."""
        path = Path(local_path).resolve()
        if not path.exists():
            raise ValueError(f"log_artifact: {path} does not exist")
        self._enqueue([{"op": "artifact", "local_path": str(path), "artifact_path": artifact_path}])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """JSON-serialisable `data` as a .json/.yaml artifact (queued by value)."""
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"log_dict({artifact_file!r}): data is not JSON-serialisable: {exc}"
            ) from exc
        self._enqueue([{"op": "dict", "data": data, "artifact_file": artifact_file}])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if tags:
            self._enqueue(self._tag_ops(tags))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Deliver the queue, retrying every `retry_interval_s` up to `timeout_s`; True when empty."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                self._drain(max(deadline - time.monotonic(), 0.001), force=True)
                left = deadline - time.monotonic()
                if not self._outbox or left <= 0:
                    return not self._outbox
                time.sleep(min(self.retry_interval_s, left))

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        """End the run with `status` after a bounded flush. Undelivered ops (the status included)
        stay in the fallback file for the next tracker on this run folder or `replay_fallback`."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        with self._lock:
            if self._closed:
                return
            self._enqueue([{"op": "status", "status": status, "end_time": _now_ms()}])
            delivered = self.flush(timeout_s)
            self._outbox.persist()
            self._closed = True
            self._dir_lock.release()
        if not delivered:
            logger.warning(
                "%d MLflow ops for run %s are still pending in %s; push them later with "
                "`python -m jobs.tracking replay %s`",
                self.pending, self.run_id, self._outbox.path, self.run_dir,
            )  # fmt: skip

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def replay_fallback(
    run_dir: str | Path, tracking_uri: str | None = None, request_timeout_s: float = 30.0
) -> int:
    """Push the ops a dead process left in `<run_dir>/mlflow_fallback.jsonl`; returns how many left
    the file delivered (metric points the server already has count as delivered, not re-sent).
    Raises RuntimeError when the server is unreachable (the rest stays in the file) or when a live
    RunTracker holds the run folder (it delivers its own queue)."""
    run_dir = Path(run_dir)
    if not (run_dir / FALLBACK_FILE).is_file():
        return 0
    lock = _DirLock(run_dir)
    try:
        outbox = _Outbox(
            MlflowClient(tracking_uri or mlflow.get_tracking_uri()), run_dir, request_timeout_s
        )
        error = outbox.deliver(math.inf)
        if error is not None:
            raise RuntimeError(
                f"replay of {outbox.path} stopped with {len(outbox)} ops left: {error}"
            ) from error
        return outbox.delivered
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tracking", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="push a run folder's pending MLflow ops")
    replay.add_argument("run_dir")
    replay.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    count = replay_fallback(args.run_dir, args.tracking_uri)
    print(f"delivered {count} ops from {Path(args.run_dir) / FALLBACK_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
