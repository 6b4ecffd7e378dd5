"""MLflow with credentials (issue 23, section 4B): a basic-auth server refuses requests without the
right user and password and logs nothing for them, seedpipe reports a refusal as one clear error
(never retried, never queued as an outage), and with the right credentials from the environment a
tracking run, a stage run and a model registration work as before. The cluster's manifests wire
the same credentials: the server's admin and the Ray pods' MLflow user from one Secret.

The server tests start a real `mlflow server --app-name basic-auth` on 127.0.0.1 (one per module,
tests/mlflow_server.py) and stop it at the end, bounded in time. The cluster tests are offline.
"""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.catalog import Catalog
from pipelines.tracking import RunTracker, pending_stage_runs, stage_run
from pipelines.tracking.rundir import FALLBACK_FILE
from pipelines.tracking.store import CredentialsRefused, is_transient

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ADMIN, PASSWORD = "seedpipe-admin", "right-password-0123"
READER, READER_PASSWORD = "reader", "reader-password-0123"
SECRET = "seedpipe-mlflow-auth"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[Any]:
    """One basic-auth server for the module's server tests (a start takes ~10-20 s here)."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth])"
    )
    from tests.mlflow_server import MlflowServer, basic_auth_env

    root = tmp_path_factory.mktemp("auth-server")
    env = basic_auth_env(root, admin_username=ADMIN, admin_password=PASSWORD)
    server = MlflowServer(root, app_name="basic-auth", env=env)
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()


def use_credentials(monkeypatch, username: str | None, password: str | None) -> None:
    """This process's MLflow credentials, as the cluster's pods get them: the environment only."""
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    if username is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    if password is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def admin_client(uri: str, monkeypatch) -> MlflowClient:
    use_credentials(monkeypatch, ADMIN, PASSWORD)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


REFUSED = [
    pytest.param(None, None, "a request without credentials", id="no-credentials"),
    pytest.param(ADMIN, "wrong-password-0123", f"user '{ADMIN}'", id="wrong-password"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("username", "password", "who"), REFUSED)
def test_refused_credentials_log_nothing_and_fail_once_clearly(
    auth_server, tmp_path, monkeypatch, username, password, who
):
    """Without credentials or with a wrong password the server answers 401 to MLflow's own
    client, and seedpipe's tracker and stage runs fail at once with one line naming the fix,
    queue nothing, and leave no experiment or run on the server."""
    uri = auth_server.uri
    use_credentials(monkeypatch, username, password)
    auth = (username, password) if username else None
    raw = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "intruder"},
                        auth=auth, timeout=10)  # fmt: skip
    assert raw.status_code == 401
    with pytest.raises(MlflowException) as refused:
        MlflowClient(uri).create_experiment("intruder")
    assert refused.value.get_http_status_code() == 401
    assert not is_transient(refused.value)  # never queued as an outage

    t0 = time.monotonic()
    with pytest.raises(CredentialsRefused) as error:
        # create_timeout_s would keep retrying an outage for a minute: a refusal is not one
        RunTracker(run_dir=tmp_path / "run", run_name="refused", tracking_uri=uri,
                   experiment="auth-refused", create_timeout_s=60)  # fmt: skip
    assert time.monotonic() - t0 < 15
    message = str(error.value)
    assert "\n" not in message and "HTTP 401" in message and who in message, message
    assert "MLFLOW_TRACKING_PASSWORD" in message and uri in message
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()

    catalog = Catalog(tmp_path / "root")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    opened = stage_run(catalog, stage="refused-stage", corpus="demo", config={"a": 1})
    with pytest.raises(ValueError, match="HTTP 401"), opened:  # the CLI's one `error:` line
        pytest.fail("the stage ran although its run was refused")
    assert pending_stage_runs(catalog) == []  # nothing waits for a retry that cannot succeed

    admin = admin_client(uri, monkeypatch)
    names = {e.name for e in admin.search_experiments()}
    assert not names & {"intruder", "auth-refused"}
    experiment_ids = [e.experiment_id for e in admin.search_experiments()]
    assert admin.search_runs(experiment_ids, "tags.stage = 'refused-stage'") == []
    assert admin.search_runs(experiment_ids, "attributes.run_name = 'refused'") == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_user_without_rights_is_told_so_once(auth_server, tmp_path, monkeypatch):
    """A known user without EDIT on the experiment gets one clear 403 error from seedpipe (not
    retried, nothing queued), and no run appears in the admin's experiment."""
    uri = auth_server.uri
    admin = admin_client(uri, monkeypatch)
    created = requests.post(f"{uri}/api/2.0/mlflow/users/create", auth=(ADMIN, PASSWORD),
                            json={"username": READER, "password": READER_PASSWORD}, timeout=10)  # fmt: skip
    assert created.status_code == 200, created.text
    exp_id = admin.create_experiment("admins-only")

    use_credentials(monkeypatch, READER, READER_PASSWORD)
    t0 = time.monotonic()
    with pytest.raises(CredentialsRefused) as error:
        RunTracker(run_dir=tmp_path / "run", run_name="not-mine", tracking_uri=uri,
                   experiment="admins-only", create_timeout_s=60)  # fmt: skip
    assert time.monotonic() - t0 < 15
    message = str(error.value)
    assert "HTTP 403" in message and f"user '{READER}'" in message and "\n" not in message
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()
    assert admin_client(uri, monkeypatch).search_runs([exp_id]) == []


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_right_credentials_track_stage_and_register(
    auth_server, tmp_path, monkeypatch, tiny_tokenizer
):
    """With the right user and password in the environment, a RunTracker run logs params and
    metrics, a stage run lands, and a model is registered and resolved back through seedpipe."""
    from jobs.export import log_seed_model
    from pipelines.models import resolve_model

    uri = auth_server.uri
    use_credentials(monkeypatch, ADMIN, PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # resolve_model and stage runs read it
    tracker = RunTracker(run_dir=tmp_path / "run", run_name="authed", tracking_uri=uri,
                         experiment="auth-ok")  # fmt: skip
    tracker.log_params({"optim": {"lr": 0.1}})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    version = log_seed_model(tracker, tmp_path / "tok", kind="seed_tokenizer",
                             registered_name="seed-tokenizer-auth", wait_s=30)  # fmt: skip
    tracker.close()
    assert tracker.pending == 0 and version.version == "1"

    catalog = Catalog(tmp_path / "root")
    with stage_run(catalog, stage="authed-stage", corpus="demo", config={"batch": 4}) as run:
        run.log_metrics({"rows": 10.0})
    assert run.run_id is not None and pending_stage_runs(catalog) == []

    resolved = resolve_model("models:/seed-tokenizer-auth/1", catalog)
    assert (Path(resolved.directory) / "model.safetensors").is_file()

    client = admin_client(uri, monkeypatch)
    tracked = client.get_run(tracker.run_id)
    assert tracked.data.params == {"optim.lr": "0.1"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1, 2]
    assert tracked.info.status == "FINISHED"
    registered = client.get_model_version("seed-tokenizer-auth", "1")
    assert registered.run_id == tracker.run_id
    assert registered.tags["digest"] == tiny_tokenizer.digest
    staged = client.get_run(run.run_id)
    assert staged.data.params == {"batch": "4"} and staged.data.metrics == {"rows": 10.0}


# ---------------------------------------------------------------------------------------------
# The cluster's wiring (offline)


def _objects(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / "k8s" / name).read_text()) if d]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(entry: dict[str, Any]) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _mlflow_container() -> dict[str, Any]:
    (deployment,) = [d for d in _objects("mlflow.yaml")
                     if d["kind"] == "Deployment" and d["metadata"]["name"] == "seedpipe-mlflow"]  # fmt: skip
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_mlflow_server_runs_basic_auth_with_secrets_and_the_shared_database(tmp_path):
    """The MLflow Deployment's own command, run with a stand-in `mlflow`, starts `mlflow server
    --app-name basic-auth` with an auth config (private file) whose users live in the tracking
    store's PostgreSQL database, and its admin and CSRF key come from the Secret."""
    container = _mlflow_container()
    env = _env(container)
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == (SECRET, "username")
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (SECRET, "password")
    assert _secret_ref(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == (SECRET, "flask-secret-key")

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    fake = bin_dir / "mlflow"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {out}/argv\n')
    fake.chmod(0o755)
    config = tmp_path / "basic_auth.ini"
    run_env = {e["name"]: e.get("value", "") for e in container["env"]}
    run_env |= {"MLFLOW_DB_PASSWORD": "0a1b2c", "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "PATH": f"{bin_dir}:/usr/bin:/bin"}  # fmt: skip
    subprocess.run([*container["command"], *container["args"]], env=run_env, check=True,
                   timeout=30)  # fmt: skip
    argv = (out / "argv").read_text().splitlines()
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend == "postgresql://mlflow:0a1b2c@seedpipe-postgres:5432/mlflow"

    parser = configparser.ConfigParser()
    parser.read(config)
    # the keys mlflow.server.auth.config.read_auth_config requires
    assert parser["mlflow"]["database_uri"] == backend
    assert parser["mlflow"]["default_permission"] in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600  # it holds the DB password


def test_ray_pods_get_mlflow_credentials_from_the_secret_and_keep_token_auth():
    """Every Ray container (head and workers, every GPU variant) gets MLFLOW_TRACKING_USERNAME /
    PASSWORD from the same Secret keys the server's admin is made from, Ray keeps token auth,
    and no manifest carries a password as plain text."""
    server_env = _env(_mlflow_container())
    user_ref = _secret_ref(server_env["MLFLOW_AUTH_ADMIN_USERNAME"])
    password_ref = _secret_ref(server_env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    clusters = sorted((CLUSTER / "k8s").glob("raycluster-*.yaml"))
    assert len(clusters) == 3
    for path in clusters:
        (cluster,) = _objects(path.name)
        assert cluster["spec"]["authOptions"]["mode"] == "token", path.name
        groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = _env(container)
                assert _secret_ref(env["MLFLOW_TRACKING_USERNAME"]) == user_ref, path.name
                assert _secret_ref(env["MLFLOW_TRACKING_PASSWORD"]) == password_ref, path.name
                assert "RAY_AUTH_MODE" not in env  # KubeRay sets it from authOptions
    for path in sorted((CLUSTER / "k8s").rglob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            for entry in _all_env(doc):
                if any(w in entry["name"] for w in ("PASSWORD", "SECRET", "TOKEN")):
                    assert "value" not in entry, f"{path.name}: {entry['name']} in plain text"


def _all_env(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _all_env(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_env(item)


def test_cluster_docs_create_the_secret_and_the_image_can_serve_basic_auth():
    """The README creates the Secret with the three keys the manifests read and documents how
    credentials flow; the image installs Flask-WTF, without which the basic-auth app will not start."""
    readme = (CLUSTER / "README.md").read_text()
    command = readme[readme.index(f"create secret generic {SECRET}") :].split("\n\n")[0]
    for key in ("username", "password", "flask-secret-key"):
        assert f"--from-literal={key}=" in command
    assert "#### Credentials" in readme and "RAY_AUTH_MODE=token" in readme
    assert "Flask-WTF==" in (CLUSTER / "Dockerfile").read_text()
