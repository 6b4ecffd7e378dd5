"""seedpipe's one MLflow path, for stages, ingest and jobs alike.

A run folder's local record is the truth; MLflow is an idempotent mirror of it that catches up
after an outage. Modules, one job each:

- `store`: which store a catalog uses, the bounded MLflow client, experiment and run creation.
- `fields`: MLflow's name rule, the tag-key rule, params from configs, dataset entities.
- `rundir`: a run folder's tracking files and its lock.
- `outbox`: the ordered queue of undelivered ops and their idempotent delivery; `replay_fallback`.
- `backoff`: when a tracker tries again during an outage (non-blocking, doubling interval).
- `tracker`: `RunTracker`, outage-proof logging into one stable run (jobs, rank 0).
- `stage_runs`: `stage_run` (one run per stage or ingest execution) and `sync_pending`.
- `__main__`: `python -m pipelines.tracking replay RUN_DIR` / `sync ROOT`.
"""

from pipelines.tracking.fields import check_names, code_version, flatten
from pipelines.tracking.outbox import replay_fallback
from pipelines.tracking.stage_runs import (
    StageRun,
    pending_stage_runs,
    stage_run,
    stage_runs_dir,
    sync_pending,
)
from pipelines.tracking.store import EXPERIMENT, is_transient, mlflow_client, tracking_uri
from pipelines.tracking.tracker import RunTracker

__all__ = [
    "EXPERIMENT",
    "RunTracker",
    "StageRun",
    "check_names",
    "code_version",
    "flatten",
    "is_transient",
    "mlflow_client",
    "pending_stage_runs",
    "replay_fallback",
    "stage_run",
    "stage_runs_dir",
    "sync_pending",
    "tracking_uri",
]
