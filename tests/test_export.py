"""jobs.export: seed models logged as pyfunc models in the tracker's run, registered, resolvable by
pipelines.models.resolve_model, identified by digest; deferred when the server is down."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from jobs.export import (
    PENDING_FILE,
    ModelExportDeferred,
    files_digest,
    log_seed_model,
    register_pending,
)
from pipelines.catalog import Catalog
from pipelines.models import resolve_model
from pipelines.tracking import RunTracker
from seed_core.qformer import CausalQFormer
from seed_core.tokenizer import SeedTokenizer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One embedded store (tables take seconds to create); artifacts land beside it under tmp."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def tracking(store, monkeypatch):
    """The store as the process-wide tracking URI too (resolve_model and pyfunc loading use it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


def _tokenizer(tiny, seed: int) -> SeedTokenizer:
    torch.manual_seed(seed)
    return SeedTokenizer(tiny.tokenizer).eval()


def test_tokenizer_registered_resolved_and_served(tmp_path, tiny, tracking, patch_features):
    """Two tokenizers become versions 1 and 2 of `seed-tokenizer` with their run and digest;
    `models:/seed-tokenizer/1` resolves to a directory that encodes exactly like the original and
    serves the same codes as a pyfunc; re-exporting the same weights adds no version."""
    first, second = _tokenizer(tiny, 0), _tokenizer(tiny, 1)
    first.save_pretrained(tmp_path / "tok1")
    second.save_pretrained(tmp_path / "tok2")
    tracker = RunTracker(run_dir=tmp_path / "run", run_name="tokenizer", tracking_uri=tracking)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    features = {"name": "cc3m/features/paper-v2", "digest": "f" * 64, "uri": "file:///data/f"}
    evalset = {"name": "coco/eval", "digest": "e" * 64, "uri": "file:///data/e", "context": "eval"}

    v1 = log_seed_model(tracker, tmp_path / "tok1", kind="seed_tokenizer",
                        registered_name="seed-tokenizer", input_datasets=[features, evalset],
                        metrics={"eval/recall_at_1": 0.5})  # fmt: skip
    v2 = log_seed_model(tracker, tmp_path / "tok2", kind="seed_tokenizer",
                        registered_name="seed-tokenizer")  # fmt: skip
    again = log_seed_model(tracker, tmp_path / "tok1", kind="seed_tokenizer",
                           registered_name="seed-tokenizer")  # fmt: skip
    tracker.close()
    assert (v1.version, v2.version, again.version) == ("1", "2", "1")
    assert v1.model_uri == "models:/seed-tokenizer/1" and again.model_id == v1.model_id
    assert (v1.digest, v2.digest) == (first.digest, second.digest)

    client = tracker.client
    version = client.get_model_version("seed-tokenizer", "1")
    assert version.run_id == tracker.run_id
    assert version.tags["digest"] == first.digest
    assert version.tags["input.cc3m/features/paper-v2"] == "f" * 64
    logged = client.get_logged_model(v1.model_id)
    assert logged.source_run_id == tracker.run_id
    linked = {m.key: m for m in logged.metrics}
    assert linked["eval/recall_at_1"].dataset_name == "coco/eval"
    assert linked["loss"].step == 2  # the run's metrics at the model's step are linked too
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1, 2]

    ref = resolve_model("models:/seed-tokenizer/1", Catalog(tmp_path))
    assert {p.name for p in Path(ref.directory).iterdir()} >= {"config.json", "model.safetensors"}
    reloaded = SeedTokenizer.from_pretrained(ref.directory).eval()
    expected = first.encode(patch_features)
    assert torch.equal(reloaded.encode(patch_features), expected)
    assert reloaded.digest == first.digest

    served = mlflow.pyfunc.load_model("models:/seed-tokenizer/1")
    assert np.array_equal(served.predict(patch_features.numpy()), expected.numpy())
    table = pd.DataFrame({"patch_features": [x.reshape(-1) for x in patch_features.numpy()]})
    assert np.array_equal(served.predict(table), expected.numpy())


def test_qformer_and_lora_adapter_kinds(tmp_path, tiny, tracking, patch_features):
    """A causal Q-Former serves its causal embeddings; a LoRA adapter is identified by the sha256
    of its files and serves its identity; an unknown kind is refused."""
    tokenizer = _tokenizer(tiny, 0)
    tokenizer.qformer.save_pretrained(tmp_path / "qformer")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"lora_A": torch.ones(4, 8)}, str(adapter / "adapter_model.safetensors"))
    tracker = RunTracker(run_dir=tmp_path / "run", run_name="kinds", tracking_uri=tracking)

    qformer = log_seed_model(tracker, tmp_path / "qformer", kind="causal_qformer",
                             registered_name="seed-qformer")  # fmt: skip
    lora = log_seed_model(tracker, adapter, kind="lora_adapter", registered_name="seed-lora")
    with pytest.raises(ValueError, match="kind must be one of"):
        log_seed_model(tracker, adapter, kind="llm", registered_name="seed-lora")
    tracker.close()

    assert qformer.digest == CausalQFormer.from_pretrained(tmp_path / "qformer").digest
    with torch.no_grad():
        expected = tokenizer.qformer(patch_features).numpy()
    embeds = mlflow.pyfunc.load_model(qformer.model_uri).predict(patch_features.numpy())
    assert embeds.shape == (4, 32, 32) and np.allclose(embeds, expected, atol=1e-6)
    identity = mlflow.pyfunc.load_model(lora.model_uri).predict(np.zeros(1))
    assert identity["digest"] == lora.digest == files_digest(adapter)
    assert identity["adapter_config"]["r"] == 4


def test_export_deferred_while_server_down_then_registered(tmp_path, tiny, tracking):
    """With the tracking server unreachable the export is recorded and ModelExportDeferred names
    the command; `register_pending` later registers it in the same run."""
    _tokenizer(tiny, 2).save_pretrained(tmp_path / "tok")
    run_dir = tmp_path / "run"
    RunTracker(run_dir=run_dir, run_name="deferred", tracking_uri=tracking).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    offline = RunTracker(run_dir=run_dir, run_name="deferred", tracking_uri=dead,
                         retry_interval_s=0.2)  # fmt: skip
    offline.log_metrics({"loss": 0.5}, step=7)
    with pytest.raises(ModelExportDeferred) as deferred:
        log_seed_model(offline, tmp_path / "tok", kind="seed_tokenizer",
                       registered_name="seed-tokenizer-deferred", wait_s=0.5)  # fmt: skip
    offline.close(timeout_s=0.1)
    assert "jobs.export register-pending" in deferred.value.command
    assert (run_dir / PENDING_FILE).is_file()

    [info] = register_pending(run_dir, tracking)
    assert not (run_dir / PENDING_FILE).exists()
    version = mlflow.MlflowClient(tracking).get_model_version(info.name, info.version)
    assert version.run_id == offline.run_id and version.tags["digest"] == info.digest
    assert [
        m.step for m in mlflow.MlflowClient(tracking).get_logged_model(info.model_id).metrics
    ] == [7]
