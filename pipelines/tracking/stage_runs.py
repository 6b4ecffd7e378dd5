"""Stage and ingest runs: one MLflow run per stage execution, recorded locally first.

Each execution gets a run folder `<root>/runs/stages/<stage>-<corpus>-<UTC time>-<id>/` holding
- `config.json`: the resolved config;
- `stage_run.json`: the local record: stage, corpus, tracking URI, start and end, status, the
  datasets read and written (name, digest, URI, rows) and the metrics;
- the `RunTracker` files (`rundir`): the run id once it exists, and the ops MLflow has not got yet.

That record is what the stage did; MLflow mirrors it. The tracker creates the run with one
attempt (`defer_create`): when the store is down the stage still runs and finishes (its shards
are committed by then), and its ops, the run's creation included, stay queued in its folder.
`sync_pending(root)` delivers the queues of a root's stage runs, idempotently (`outbox`): the
run is created once (found again by its run key), each metric step lands once. Every later stage,
ingest or job invocation on the root calls it first, bounded in time and never failing the
command: a stage with work to do when it opens its run, a stage with nothing to build before it
returns, a job launch before it starts the trainer. `--dry-run` does not sync: it promises to
write nothing, and syncing rewrites the queues and the store. `python -m pipelines.tracking sync
ROOT` does it by hand.

On an object-store root the run folders are in the store (`<root>/runs/stages/...`) like every
other run folder: `config.json` and `stage_run.json` are written there; the tracker works in the
folder's node-local mirror (`pipelines.storage.RunFolder`), where the queue of undelivered ops
stays, and `sync_pending` delivers the queues that this node's mirrors hold.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.catalog import Catalog
from pipelines.storage import RunFolder, is_remote, join_uri, mirror_parent
from pipelines.tracking import store
from pipelines.tracking.fields import code_version
from pipelines.tracking.outbox import Outbox
from pipelines.tracking.rundir import (
    FALLBACK_FILE,
    RunDirBusy,
    RunDirLock,
    read_state,
)
from pipelines.tracking.tracker import RunTracker

logger = logging.getLogger(__name__)

RECORD_FILE = "stage_run.json"
CONFIG_FILE = "config.json"
SYNC_BUDGET_S = 10.0
"""What a sync may spend delivering (plus at most one request timeout for the call in flight)."""
CLOSE_WAIT_S = 2.0
"""How long a finished stage waits for MLflow before leaving its ops to the next sync."""


def stage_runs_uri(catalog: Catalog) -> str:
    """Where a root's stage run folders live: `<root>/runs/stages` (a path or a store URI)."""
    return join_uri(catalog.root_uri if is_remote(catalog.root_uri) else catalog.base,
                    "runs", "stages")  # fmt: skip


def stage_runs_dir(catalog: Catalog) -> Path:
    """The local folder of a root's stage runs: the folder itself on a local root, this node's
    mirrors of them on an object store (see the module docstring)."""
    return mirror_parent(stage_runs_uri(catalog))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class StageRun:
    """The run of one stage execution: its local record, mirrored to MLflow by its tracker."""

    def __init__(self, tracker: RunTracker, record: dict[str, Any]) -> None:
        self.tracker = tracker
        self.folder = tracker.folder
        self.run_dir = tracker.run_dir
        self.record = record
        self._write_record()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the store was unreachable (it comes with the sync)."""
        return self.tracker.run_id

    def log_dataset(
        self, *, name: str, digest: str, uri: str, context: str, rows: int | None = None
    ) -> None:
        """A dataset this run read (`input`) or wrote (`output`), identified by its content digest."""
        self.record["datasets"].append(
            {"name": name, "digest": digest, "uri": uri, "context": context, "rows": rows}
        )
        self._write_record()
        self.tracker.log_dataset(name=name, digest=digest, uri=uri, context=context, rows=rows)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics at `step`; by default the step after the last one of these keys (0 at first)."""
        if step is None:
            steps = [self.tracker.last_step(k) for k in metrics]
            step = max((s for s in steps if s is not None), default=-1) + 1
        values = {str(k): float(v) for k, v in metrics.items()}
        self.record["metrics"].update(values)
        self._write_record()
        self.tracker.log_metrics(values, step=step)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """JSON-serialisable `data` as run artifact `artifact_file`."""
        self.tracker.log_dict(data, artifact_file)

    def close(self, status: str) -> None:
        self.record.update(status=status, ended=_now())
        self._write_record()
        self.tracker.close(status, timeout_s=CLOSE_WAIT_S)
        if self.tracker.pending:
            logger.warning(
                "MLflow at %s did not take %s's run: it is recorded in %s and is delivered by the "
                "next invocation on this root (or `python -m pipelines.tracking sync ROOT`)",
                self.tracker.tracking_uri, self.record["stage"], self.run_dir,
            )  # fmt: skip

    def _write_record(self) -> None:
        text = json.dumps(self.record | {"run_id": self.run_id}, indent=1, default=str)
        self.folder.write_text(RECORD_FILE, text)


@contextmanager
def stage_run(catalog: Catalog, *, stage: str, corpus: str, config: Mapping[str, Any],
              run_name: str | None = None) -> Iterator[StageRun]:  # fmt: skip
    """A stage run tagged with stage, corpus and code version, its config logged as params; ended
    FINISHED, or FAILED when the block raises. Pending stage runs of the root are synced first."""
    sync_pending(catalog)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", part) for part in (stage, corpus))
    run_folder = RunFolder(
        join_uri(stage_runs_uri(catalog), f"{folder}-{stamp}-{uuid.uuid4().hex[:6]}")
    )
    resolved = json.loads(json.dumps(dict(config), default=str))
    run_folder.write_text(CONFIG_FILE, json.dumps(resolved, indent=1, sort_keys=True))
    uri = store.tracking_uri(catalog)
    tags = {"stage": stage, "corpus": corpus, "code_version": code_version(),
            "root": catalog.root_uri, "run_dir": run_folder.uri}  # fmt: skip
    tracker = RunTracker(run_dir=run_folder, run_name=run_name or f"{stage}:{corpus}", tags=tags,
                         experiment=store.EXPERIMENT, tracking_uri=uri, create_timeout_s=0,
                         defer_create=True)  # fmt: skip
    record = {"stage": stage, "corpus": corpus, "root": catalog.root_uri, "tracking_uri": uri,
              "started": _now(), "status": "RUNNING", "datasets": [], "metrics": {}}  # fmt: skip
    run = StageRun(tracker, record)
    try:
        tracker.log_params(resolved)
        tracker.log_dict(resolved, CONFIG_FILE)
        yield run
    except BaseException as exc:
        run.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    run.close("FINISHED")


def sync_pending(root: Catalog | str | Path, *, tracking_uri: str | None = None,
                 budget_s: float = SYNC_BUDGET_S) -> int:  # fmt: skip
    """Deliver the queued ops of `root`'s stage runs to MLflow (each to the store it was opened
    for, unless `tracking_uri`); returns how many runs are now fully delivered. Bounded by
    `budget_s` (plus one request in flight); never raises: what is left stays queued."""
    try:
        catalog = root if isinstance(root, Catalog) else Catalog(root)
        pending = pending_stage_runs(catalog)
    except Exception as exc:
        logger.warning("cannot list the stage runs of %s to sync them: %s", root, exc)
        return 0
    deadline = time.monotonic() + budget_s
    synced, down = 0, {}
    for run_dir in pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            lock = RunDirLock(run_dir, wait_s=0)
        except RunDirBusy:
            continue  # a live stage: it delivers its own queue
        try:
            uri = (
                tracking_uri
                or read_state(run_dir).get("tracking_uri")
                or store.tracking_uri(catalog)
            )
            if uri in down:
                continue
            outbox = Outbox(store.mlflow_client(uri), run_dir, tracking_uri=uri)
            error = outbox.deliver(left)
            if error is not None:
                down[uri] = error
            elif not outbox:
                synced += 1
                _note_synced(run_dir, run_id=outbox.run_id, uri=uri)
                logger.info("synced stage run %s to MLflow run %s", run_dir.name, outbox.run_id)
        except Exception as exc:  # never into the command
            logger.warning("cannot sync stage run %s: %s", run_dir, exc)
        finally:
            lock.release()
    left_over = sum(1 for d in pending if (d / FALLBACK_FILE).is_file())
    for uri, error in down.items():
        logger.warning("MLflow at %s is unreachable (%s)", uri, error)
    if left_over:
        logger.warning("%d stage runs of %s are still waiting for MLflow (in %s)",
                       left_over, catalog.root_uri, stage_runs_dir(catalog))  # fmt: skip
    return synced


def _note_synced(run_dir: Path, *, run_id: str | None, uri: str) -> None:
    path = run_dir / RECORD_FILE
    if path.is_file():
        record = json.loads(path.read_text()) | {
            "run_id": run_id,
            "synced_to": uri,
            "synced": _now(),
        }
        RunFolder.from_mirror(run_dir).write_text(
            RECORD_FILE, json.dumps(record, indent=1, default=str)
        )


def pending_stage_runs(root: Catalog | str | Path) -> list[Path]:
    """The stage run folders of `root` with ops MLflow has not got yet, oldest first."""
    runs = stage_runs_dir(root if isinstance(root, Catalog) else Catalog(root))
    if not runs.is_dir():
        return []
    return sorted(d for d in runs.iterdir() if (d / FALLBACK_FILE).is_file())
