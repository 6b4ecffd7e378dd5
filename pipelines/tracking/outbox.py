"""The ordered queue of MLflow ops of one run folder, mirrored in its fallback file, and their
idempotent delivery.

An op is one JSON line {"run_id", "op": "create"|"batch"|"inputs"|"artifact"|"dict"|"status", ...}.
`run_id` is null for ops queued before the run existed on the server (a stage run opened while the
store was down): they belong to the folder's run, whose id the `create` op writes to
`mlflow_run_id` when it is delivered (`store.find_or_create_run`: adopting a run a lost reply
created, so a re-sent create makes no second run).

Delivery is idempotent: MLflow keeps every (key, step) point sent, but each key is queued in
increasing step order, so a point is on the server iff its step <= the server's latest step for
that key. After a failure (when the last batch may have landed without its reply) the queue is
filtered against the server before anything is re-sent. Params and tags are idempotent on the
server already; a re-sent `inputs` op is deduplicated by MLflow (same dataset and context).

The queue is drained by the caller, a bounded slice at a time, not by a blocking retry loop
(`@tenacity.retry`): the training step or stage must return between attempts with the op safely
queued, and the next attempt is owed to the *next* call or process, which a retry decorator cannot
express. Ops the server rejects (4xx, a missing artifact file) go to the rejected file instead of
blocking the queue.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from pipelines.tracking.rundir import (
    FALLBACK_FILE,
    REJECTED_FILE,
    RUN_ID_FILE,
    RunDirLock,
    read_run_id,
    read_state,
    write_atomic,
)
from pipelines.tracking.store import auth_status, find_or_create_run, is_transient, mlflow_client

logger = logging.getLogger(__name__)

# MLflow's log_batch limits (documented with MlflowClient.log_batch).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100


def last_steps(run: Run) -> dict[str, int]:
    """Latest step per metric key of a run from the server (MLflow's latest metric is the one of
    max step). `Run.data.metrics` exposes latest values only; the run's public `to_proto()`
    carries the latest metric entities with their steps, all from the one `get_run` (a
    `get_metric_history` per key would download every point of a long job)."""
    return {m.key: int(m.step) for m in run.to_proto().data.metrics}


def batch_ops(field: str, items: Sequence[Any]) -> list[dict[str, Any]]:
    """`batch` ops carrying `items` (metric rows, or (key, value) pairs of params or tags) under
    `field`, split at MLflow's per-call limits."""
    size = MAX_METRICS_PER_BATCH if field == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
    return [
        {"op": "batch", field: chunk if field == "metrics" else dict(chunk)} for chunk in chunks
    ]


class Outbox:
    """The undelivered ops of `run_dir`, in order. The file holds the queue minus its `unpersisted`
    newest lines until `persist` (after every public call of the owner) appends those, or rewrites
    the file once ops left the queue (`dirty`)."""

    def __init__(self, client: MlflowClient, run_dir: Path, *, tracking_uri: str) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_dir = run_dir
        self.path = run_dir / FALLBACK_FILE
        self.rejected_path = run_dir / REJECTED_FILE
        self.run_id = read_run_id(run_dir)
        self.on_created: Callable[[], None] | None = None
        """Called once a queued create got its run id (the tracker copies it to the store)."""
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

    def has_create(self) -> bool:
        return any(op["op"] == "create" for op in self.ops())

    def _rid(self, op: Mapping[str, Any]) -> str | None:
        return op.get("run_id") or self.run_id

    def persist(self) -> None:
        """Bring the file up to date with the queue (atomic rewrite when ops left it)."""
        if self.dirty:
            if self.queue:
                write_atomic(self.path, "".join(line + "\n" for line in self.queue))
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
            steps = server_steps.get(self._rid(op) or "", {})
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
        run_ids = {self._rid(op) for op in self.ops() if op["op"] == "batch"} - {None}
        self.filter_delivered({r: last_steps(self.client.get_run(r)) for r in run_ids if r})
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
            if op["op"] != "batch" or self._rid(op) != self._rid(first):
                break
            new = [c + len(op.get(k) or ()) for c, k in zip(counts, ("metrics", "params", "tags"))]
            if new[0] > MAX_METRICS_PER_BATCH or max(new[1:]) > MAX_PARAMS_TAGS_PER_BATCH:
                break
            if sum(new) > MAX_METRICS_PER_BATCH:
                break
            counts = new
            taken.append(op)
        return taken

    def _create(self, op: Mapping[str, Any]) -> None:
        run_id = find_or_create_run(
            self.client, uri=self.tracking_uri, experiment=op["experiment"], run_key=op["run_key"],
            run_name=op["run_name"], tags=op["tags"], start_time=op.get("start_time"),
        )  # fmt: skip
        write_atomic(self.run_dir / RUN_ID_FILE, run_id + "\n")
        self.run_id = run_id
        if self.on_created is not None:
            self.on_created()

    def _send(self, ops: Sequence[dict[str, Any]]) -> None:
        c, kind = self.client, ops[0]["op"]
        if kind == "create":
            self._create(ops[0])
            return
        run_id = self._rid(ops[0])
        if run_id is None:
            raise ValueError("the run was never created (its create op was rejected)")
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
            if self.queue and self.needs_sync:
                self._sync()
            first = True  # at least one op per call, whatever the budget
            while self.queue and (first or time.monotonic() < deadline):
                first = False
                ops = self._take()
                try:
                    self._send(ops)
                except Exception as exc:
                    if _keep_queued(exc):
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
                            if _keep_queued(exc1):
                                raise
                            self._reject(op, exc1)
                        self.pop()
                else:
                    self.delivered += len(ops)
                    for _ in ops:
                        self.pop()
        except Exception as exc:
            if not _keep_queued(exc):
                raise
            error = exc
            self.needs_sync = True
        finally:
            self.persist()
        return error


def _keep_queued(exc: BaseException) -> bool:
    """A failure that says nothing about the ops themselves: the server is down (transient), or it
    refused this process's credentials (401/403: a rotated password, a missing grant). The ops stay
    queued for a later delivery with working credentials instead of being set aside as rejected."""
    return is_transient(exc) or auth_status(exc) is not None


def replay_fallback(run_dir: str | Path, tracking_uri: str | None = None, *,
                    lock_wait_s: float = 10.0, budget_s: float = math.inf) -> int:  # fmt: skip
    """Push the ops a finished or dead process left in `<run_dir>/mlflow_fallback.jsonl` to
    `tracking_uri` (default: the one the folder recorded, else MLflow's current one); returns how
    many ops left the file (points the server already had count as delivered, not re-sent).
    Raises RuntimeError when the server is unreachable (the rest stays in the file), and
    `RunDirBusy` when a live process holds the folder (it delivers its own queue)."""
    run_dir = Path(run_dir)
    if not (run_dir / FALLBACK_FILE).is_file():
        return 0
    lock = RunDirLock(run_dir, wait_s=lock_wait_s)
    try:
        uri = tracking_uri or read_state(run_dir).get("tracking_uri") or mlflow.get_tracking_uri()
        outbox = Outbox(mlflow_client(uri), run_dir, tracking_uri=uri)
        error = outbox.deliver(budget_s)
        if error is not None:
            raise RuntimeError(
                f"replay of {outbox.path} to {uri} stopped with {len(outbox)} ops left: {error}"
            ) from error
        return outbox.delivered
    finally:
        lock.release()
