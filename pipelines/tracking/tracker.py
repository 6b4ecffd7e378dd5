"""`RunTracker`: MLflow logging into one run folder's run that survives restarts and outages.

- **One run per run folder, stable id.** The id lives in `<run_dir>/mlflow_run_id`. A restarted job
  (Ray Train worker failure, or the driver re-launched on the same run folder) reuses it and sets
  the run back to RUNNING. Creating a *new* run needs the server: it is retried with backoff for
  `create_timeout_s` (tenacity: a blocking wait is right here, the job cannot start without its
  run), then a clear error is raised; with `defer_create` (stage runs) the create is queued instead
  and the run id is known once it is delivered. Resuming an *existing* run needs no server: with
  the server down the tracker starts offline and queues.
- **Each metric step exactly once.** The tracker keeps the last step accepted per metric key (read
  back on resume from the server's latest metrics, from `<run_dir>/mlflow_state.json` and from the
  pending ops) and drops steps <= that; delivery filters against the server (`outbox`).
- **Outages never kill or stall the caller.** MLflow makes one bounded HTTP attempt per request
  (`store.bound_http`, set once per process; the tracker never touches `os.environ` while it
  logs). A failed op stays queued in memory and in `<run_dir>/mlflow_fallback.jsonl`; later calls
  retry the queue in order, no more often than `retry_interval_s`, the interval doubling while the
  outage lasts (up to 60 s, `backoff`); one warning per outage, one on recovery. A refused connection costs a
  call ~1 ms; a server that accepts but never answers costs the call that falls due one request
  timeout, hence the backoff. Catching up a backlog takes at most ~1 s of each call
  (`DRAIN_BUDGET_S`). Bad metric/param/tag names raise ValueError at the call (`fields`). What a
  dead process left queued is pushed by the next tracker on the same run folder, by
  `replay_fallback` / `python -m pipelines.tracking replay RUN_DIR`, or (stage runs) by the next
  invocation on the same root.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
)

from pipelines.storage import RunFolder
from pipelines.tracking.backoff import OutageBackoff
from pipelines.tracking.fields import (
    MAX_TAG_VALUE,
    check_names,
    code_version,
    dataset_entity,
    dataset_input_tags,
    flatten,
    tag_key,
)
from pipelines.tracking.outbox import Outbox, batch_ops, last_steps
from pipelines.tracking.rundir import (
    RUN_ID_FILE,
    STATE_FILE,
    RunDirLock,
    read_state,
    write_atomic,
    write_state,
)
from pipelines.tracking.store import (
    EXPERIMENT,
    auth_status,
    credentials_refused,
    find_or_create_run,
    is_transient,
    mlflow_client,
)

logger = logging.getLogger(__name__)

# Work a logging call may spend catching up a backlog; the rest waits for the next call.
DRAIN_BUDGET_S = 1.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTracker:
    """MLflow logging into one stable run; never raises into the caller on tracking failures.

    Jobs build it on rank 0 only, inside the worker: it holds a lock on `run_dir` and is not
    picklable. `tracking_uri` defaults to MLflow's current one (jobs pass
    `pipelines.tracking.tracking_uri(catalog)`). `experiment`, `run_name` and `tags` are used when
    the run is created; a resumed run keeps its experiment and name, and `tags` are set again.
    `create_timeout_s` bounds the wait for a server when there is no run yet (`defer_create`:
    queue the create after that instead of raising); `retry_interval_s` spaces later attempts.
    """

    def __init__(self, *, run_dir: str | Path, run_name: str, experiment: str = EXPERIMENT,
                 tracking_uri: str | None = None, tags: Mapping[str, str] | None = None,
                 retry_interval_s: float = 5.0, create_timeout_s: float = 60.0,
                 defer_create: bool = False) -> None:  # fmt: skip
        # On an object-store root the folder's files live in the store and this process works in
        # its node-local mirror: the run id and state come from the store (a rank 0 restarted on
        # another node resumes the same run) and go back to it when they change; the delivery
        # queue and the lock stay on this node.
        self.folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
        self.run_dir = self.folder.local
        if self.folder.remote:
            for name in (RUN_ID_FILE, STATE_FILE):
                self.folder.pull(name)
        self.run_name = run_name
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = mlflow_client(self.tracking_uri)
        self.retry_interval_s = retry_interval_s
        self._lock = threading.RLock()
        self._dir_lock = RunDirLock(self.run_dir)
        self._closed = False
        try:
            self._outbox = Outbox(self.client, self.run_dir, tracking_uri=self.tracking_uri)
            self._outbox.on_created = self._push_identity
            self._backoff = OutageBackoff(
                retry_interval_s, uri=self.tracking_uri, queue_path=self._outbox.path
            )
            self._state = read_state(self.run_dir) | {"tracking_uri": self.tracking_uri}
            self._state.setdefault("run_key", uuid.uuid4().hex)
            self._last_step: dict[str, int] = dict(self._state.get("last_step", {}))
            self._params: dict[str, str] = {}
            for op in self._outbox.ops():
                for key, step in ((m[0], m[3]) for m in op.get("metrics") or ()):
                    self._last_step[key] = max(step, self._last_step.get(key, step))
                self._params.update(op.get("params") or {})
            self._save_local_state()
            self._open_run(experiment, dict(tags or {}), create_timeout_s, defer_create)
        except BaseException:
            self._dir_lock.release()
            raise

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while a deferred create is still queued."""
        return self._outbox.run_id

    # ---- run creation / resume
    def _save_local_state(self) -> None:
        self._state.update(run_id=self.run_id, last_step=self._last_step)
        write_state(self.run_dir, self._state)

    def _open_run(self, experiment: str, tags: dict[str, str], create_timeout_s: float,
                  defer_create: bool) -> None:  # fmt: skip
        tags = {"code_version": code_version(), **tags}
        run_id = self.run_id
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception as exc:
                if auth_status(exc) is not None:
                    raise credentials_refused(
                        self.tracking_uri, exc, f"resuming run {run_id}"
                    ) from exc
                if not is_transient(exc):
                    raise ValueError(
                        f"{self.run_dir / RUN_ID_FILE} names run {run_id}, which "
                        f"{self.tracking_uri} cannot give: {exc}"
                    ) from exc
                self._backoff.failed(exc)  # resume offline: everything queues until it is back
            else:
                server = last_steps(run)
                for key, step in server.items():
                    self._last_step[key] = max(step, self._last_step.get(key, step))
                self._params.update(run.data.params)
                self._outbox.filter_delivered({run_id: server})
                self._outbox.needs_sync = False
            logger.info("resuming MLflow run %s (%s)", run_id, self.tracking_uri)
            self._enqueue([{"op": "status", "status": "RUNNING"}, *self._tag_ops(tags)])
            return
        if self._outbox.has_create():  # an earlier deferred tracker on this folder
            self._enqueue(self._tag_ops(tags))
            return
        check_names(tags, "tag")
        create = {"op": "create", "experiment": experiment, "run_name": self.run_name,
                  "run_key": self._state["run_key"], "start_time": _now_ms(),
                  "tags": {k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}}  # fmt: skip
        try:
            run_id = self._create_run(create, create_timeout_s)
        except Exception as exc:
            if not (defer_create and is_transient(exc)):
                if is_transient(exc):
                    raise RuntimeError(
                        f"cannot create the MLflow run for {self.run_dir} at {self.tracking_uri} "
                        f"(tried for {create_timeout_s:.0f}s): {exc}. The job needs a run id to "
                        "start: bring the tracking server up (or point MLFLOW_TRACKING_URI at a "
                        "reachable store) and start it again."
                    ) from exc
                raise
            self._backoff.failed(exc)
            self._outbox.add({"run_id": None, **create})
            self._outbox.persist()
            return
        write_atomic(self.run_dir / RUN_ID_FILE, run_id + "\n")
        self._outbox.run_id = run_id
        self._save_local_state()
        self._push_identity()

    def _push_identity(self) -> None:
        """The run id and state to the run folder on the root's store (nothing on a local root).
        A store that refuses is logged: the run goes on, and the next push or close retries."""
        if not self.folder.remote:
            return
        try:
            for name in (RUN_ID_FILE, STATE_FILE):
                if (self.run_dir / name).is_file():
                    self.folder.push(name)
        except OSError as exc:
            logger.warning("cannot copy the MLflow run id of %s to %s: %s", self.run_dir,
                           self.folder.uri, exc)  # fmt: skip

    def _create_run(self, create: Mapping[str, Any], timeout_s: float) -> str:
        retrying = Retrying(
            stop=stop_before_delay(timeout_s),
            wait=wait_exponential(multiplier=0.5, max=10),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        )
        return retrying(
            find_or_create_run, self.client, uri=self.tracking_uri,
            experiment=create["experiment"], run_key=create["run_key"],
            run_name=create["run_name"], tags=create["tags"], start_time=create["start_time"],
        )  # fmt: skip

    # ---- queueing and delivery
    def _tag_ops(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        items = [(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        check_names([k for k, _ in items], "tag")
        return batch_ops("tags", items)

    def _drain(self, budget_s: float, force: bool = False) -> None:
        if not force and self._backoff.waiting():
            self._outbox.persist()
            return
        try:
            error = self._outbox.deliver(budget_s)
        except Exception as exc:  # never into the caller
            logger.exception("unexpected error while logging to MLflow; ops stay queued")
            error = exc
            self._outbox.persist()
        if error is not None:
            self._backoff.failed(error)
        else:
            self._backoff.succeeded(len(self._outbox))

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
        check_names(list(flat), "param")
        with self._lock:
            new = {k: v for k, v in flat.items() if k not in self._params}
            changed = {k: v for k, v in flat.items() if k in self._params and self._params[k] != v}
            if changed:
                logger.warning(
                    "params differ from the run's first values (kept as tags): %s", sorted(changed)
                )
            self._params.update(new)
            ops = batch_ops("params", list(new.items()))
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
        check_names([str(k) for k in metrics], "metric")
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
            self._enqueue(batch_ops("metrics", fresh))
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
        """A dataset this run read (`input`) or wrote (`output`): a MetaDataset input with its
        content digest (`fields.dataset_entity`), plus run tag `<context>.<name>` = digest."""
        entity = dataset_entity(name=name, digest=digest, uri=uri)
        tags = dataset_input_tags(context=context, digest=digest, rows=rows)
        self._enqueue(
            [
                {"op": "inputs", "datasets": [{"dataset": entity, "tags": tags}]},
                *self._tag_ops({tag_key(context, name): digest}),
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
        stay in the fallback file for the next tracker on this folder, a replay or a sync."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        with self._lock:
            if self._closed:
                return
            self._enqueue([{"op": "status", "status": status, "end_time": _now_ms()}])
            delivered = self.flush(timeout_s)
            self._outbox.persist()
            self._save_local_state()
            self._push_identity()
            self._closed = True
            self._dir_lock.release()
        if not delivered:
            logger.warning(
                "%d MLflow ops for run %s are still pending in %s; push them later with "
                "`python -m pipelines.tracking replay %s`",
                self.pending, self.run_id or "(not created yet)", self._outbox.path, self.run_dir,
            )  # fmt: skip

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")
