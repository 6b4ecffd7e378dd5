"""Session-wide test environment: offline, no wandb, Ray auth off on loopback (PITFALLS.md)."""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny():
    """The tiny v2 preset (random-init encoders, 32 queries)."""
    from seed_core.presets import tiny

    return tiny()


@pytest.fixture
def tiny_tokenizer(tiny):
    """A seeded tiny SeedTokenizer in eval mode."""
    from seed_core.tokenizer import SeedTokenizer

    torch.manual_seed(0)
    return SeedTokenizer(tiny.tokenizer).eval()


@pytest.fixture
def patch_features(tiny):
    """(4, P, Dv) seeded random ViT features for the tiny preset."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, tiny.vision.num_tokens, tiny.vision.hidden_size, generator=g)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray Data's testing guide), no dashboard.

    4 logical CPUs on 2 cores: 2 training workers plus Ray Data's read tasks must all be schedulable.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "WANDB_MODE") if k in os.environ}})  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    """Each test gets the embedded MLflow store of its own catalog root (no MLFLOW_TRACKING_URI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path


@pytest.fixture(autouse=True)
def _isolate_mlflow_global_uri():
    """MLflow keeps a process-wide tracking URI (and exports it to the environment): reset both after
    each test so one test's store never leaks into the next."""
    import sys

    env = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="session")
def cli_chain(tmp_path_factory):
    """The README's whole chain (ingest .. train-lora) through the `seedpipe` console script, from a
    fresh folder with MLFLOW_TRACKING_URI unset: built once per session, asserted on by many tests."""
    from tests.chain import build_chain

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist workers share the parent of their base temp: a second worker building the chain
        # means the "cli-chain" group was not applied (see constraints.txt), so say so.
        marker = tmp_path_factory.getbasetemp().parent / "cli-chain.built"
        try:
            marker.open("x").close()
        except FileExistsError:
            pytest.fail("a second xdist worker is building the README chain: the tests that use "
                        "it were not grouped (`--dist loadgroup`, tests/conftest.py)")  # fmt: skip
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (tests/mlflow_server.py), stopped after the test."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`), every test that uses
    the session's README chain goes to the same worker: the chain is built once, not once per
    worker, and its tests see the catalog in the order they always did."""
    for item in items:
        if "cli_chain" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("cli-chain"))
