"""Where a catalog's MLflow store is, and the one way this package talks to it.

- **Which store.** `MLFLOW_TRACKING_URI` when the user set it, else the embedded
  `sqlite:///<root>/mlflow.db` beside a local catalog, with artifacts in `<root>/mlartifacts`
  (nothing to start; `seedpipe ui` opens it).
- **Every client is `mlflow_client(uri)`**, with the registry bound to the same URI, so nothing in
  this package asks MLflow's process-global store (which defaults to a `./mlflow.db` in the working
  folder, PITFALLS.md).
- **Bounded HTTP, set once per process.** MLflow's REST client reads `MLFLOW_HTTP_REQUEST_MAX_RETRIES`
  and `MLFLOW_HTTP_REQUEST_TIMEOUT` from the environment at every request (mlflow/utils/rest_utils.py
  `http_request`) and has no per-client setting: `MlflowHostCreds` carries host and auth only, and the
  `timeout` / `max_retries` arguments of `http_request` are not reachable through `MlflowClient`.
  So the first `mlflow_client` call of a process sets them, once, to one attempt per request and
  `REQUEST_TIMEOUT_S` per connect/read, unless the user set them (theirs win). Retrying is this
  package's job (the tracker's outbox, the stage-run sync, tenacity where a call may block), not
  MLflow's: its default of 7 retries with backoff would hold a training step for minutes in an
  outage. seedpipe processes use MLflow through this package, so the setting is what they need
  anywhere in the process (model downloads by `pipelines.models` included: one bounded attempt).
- **Credentials come from the environment.** `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`
  (or `MLFLOW_TRACKING_TOKEN`), which MLflow's REST client reads at every request: nothing here
  passes or stores them. A server that refuses them (HTTP 401) or their rights (403) is not an
  outage: retrying cannot fix it, so `is_transient` says no (nothing is retried or queued as an
  outage) and opening a run raises `CredentialsRefused`, a ValueError with one line that says
  what to set.
- **Creating a run is idempotent.** A run carries tag `seedpipe_run_key` (a uuid kept in its run
  folder); `find_or_create_run` adopts the run with that key before it creates one, so a create
  whose reply was lost, retried, does not leave a second run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import RunTag
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_TRACKING_TOKEN,
    MLFLOW_TRACKING_USERNAME,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.storage import is_remote

logger = logging.getLogger(__name__)

EXPERIMENT = "seedpipe"
REQUEST_TIMEOUT_S = 5
"""Seconds per connect/read of one MLflow HTTP request (unless MLFLOW_HTTP_REQUEST_TIMEOUT is set)."""
RUN_KEY_TAG = "seedpipe_run_key"

# MLflow 3 exports MLFLOW_TRACKING_URI itself on set_tracking_uri (tests and Ray workers call it), so
# the variable alone cannot tell a user's server from an embedded store selected earlier in this
# process for another root.
_EMBEDDED_URIS: set[str] = set()


def tracking_uri(catalog: Any) -> str:
    """MLFLOW_TRACKING_URI set by the user, or the embedded SQLite store beside a local catalog."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _EMBEDDED_URIS:
        return uri
    if is_remote(catalog.root_uri):
        raise ValueError(remote_root_needs_server(catalog.root_uri))
    Path(catalog.base).mkdir(parents=True, exist_ok=True)
    embedded = f"sqlite:///{catalog.base}/mlflow.db"
    _EMBEDDED_URIS.add(embedded)
    return embedded


def remote_root_needs_server(root: str) -> str:
    """Why an object-store root without MLFLOW_TRACKING_URI cannot run, and what to set."""
    return (
        f"root {root} is on an object store, where the embedded SQLite MLflow store cannot live: "
        "set MLFLOW_TRACKING_URI to a tracking server (e.g. http://mlflow:5000; its artifacts may "
        "be in the same bucket, with MLFLOW_S3_ENDPOINT_URL for an S3-compatible store)"
    )


def artifact_location(uri: str) -> str | None:
    """`<db dir>/mlartifacts` beside an embedded SQLite store; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def bound_http() -> None:
    """One attempt per MLflow request, REQUEST_TIMEOUT_S per connect/read, for this process
    (values the user exported are kept). Idempotent; see the module docstring for why."""
    if not MLFLOW_HTTP_REQUEST_MAX_RETRIES.is_set():
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(0)
    if not MLFLOW_HTTP_REQUEST_TIMEOUT.is_set():
        MLFLOW_HTTP_REQUEST_TIMEOUT.set(REQUEST_TIMEOUT_S)


def request_timeout_s() -> float:
    """The per-request bound MLflow applies in this process."""
    return float(MLFLOW_HTTP_REQUEST_TIMEOUT.get())


def mlflow_client(uri: str) -> MlflowClient:
    """A client for `uri` (tracking and registry), with this process's HTTP bounded first."""
    bound_http()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class CredentialsRefused(ValueError):
    """The tracking server refused this process's credentials (401) or their rights (403)."""


def auth_status(exc: BaseException) -> int | None:
    """401 or 403 when `exc` is the server refusing the credentials or what they may do, else None."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
    else:
        return None
    return status if status in (401, 403) else None


def credentials_refused(uri: str, exc: BaseException, doing: str) -> CredentialsRefused:
    """The one-line error for an auth refusal of `exc` while `doing` (e.g. "opening a run")."""
    user = MLFLOW_TRACKING_USERNAME.get()
    if auth_status(exc) == 403:
        return CredentialsRefused(
            f"MLflow at {uri} denied user {user!r} (HTTP 403) {doing}: an MLflow admin must grant "
            "that user the permission (EDIT on the experiment), or use another user"
        )
    if user:
        who = f"user {user!r} (wrong password, or no such user)"
    elif MLFLOW_TRACKING_TOKEN.get():
        who = "the token in MLFLOW_TRACKING_TOKEN"
    else:
        who = "a request without credentials"
    return CredentialsRefused(
        f"MLflow at {uri} refused {who} (HTTP 401) {doing}: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to an MLflow user's credentials"
    )


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later (server down, timeout, 5xx, 429), as opposed to rejected by the server
    (4xx: a bad request, or refused credentials, which no retry fixes)."""
    if isinstance(exc, MlflowException):
        # MLflow wraps connection errors and timeouts as INTERNAL_ERROR (500)
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.startswith("sqlalchemy")  # e.g. a locked SQLite store


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts beside an embedded store) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location(uri))
    except MlflowException as exc:  # created concurrently
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.get_experiment_by_name(name)
    assert found is not None
    return found.experiment_id


def find_or_create_run(client: MlflowClient, *, uri: str, experiment: str, run_key: str,
                       run_name: str, tags: dict[str, str], start_time: int | None = None) -> str:  # fmt: skip
    """The id of the run tagged `run_key`, created in `experiment` when there is none yet (an
    existing one gets `tags` again, as its create would have set them).

    Raises `CredentialsRefused` when the server refuses the credentials: a new job's or stage's
    first request to the server is made here, so that is where a wrong password is reported."""
    try:
        exp_id = experiment_id(client, experiment, uri)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.{RUN_KEY_TAG} = '{run_key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return run_id
        run = client.create_run(
            exp_id, start_time=start_time, run_name=run_name, tags={**tags, RUN_KEY_TAG: run_key}
        )
        logger.info("created MLflow run %s (%s)", run.info.run_id, uri)
        return run.info.run_id
    except MlflowException as exc:
        if auth_status(exc) is None:
            raise
        raise credentials_refused(uri, exc, f"opening a run in experiment {experiment!r}") from exc
