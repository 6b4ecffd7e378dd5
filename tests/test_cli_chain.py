"""The README's commands as a new user runs them: the console script, a fresh folder, no MLFLOW_TRACKING_URI.

The chain itself is built once per session (tests/chain.py, the `cli_chain` fixture); these tests
assert what a user sees: every step succeeded, nothing was written outside the root, `models:/`
references resolved against the catalog's own store, defaults came from the lineage, re-runs are
no-ops, and mistakes are one clear line with exit status 2.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.config import CONFIG_DIR
from tests.chain import CORPUS, seedpipe_exe, user_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def seedpipe(chain, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([seedpipe_exe(), *argv], cwd=chain.workdir, env=user_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_readme_chain_runs_on_the_embedded_default(cli_chain):
    """Ingest through train-lora succeed with `models:/` references and MLFLOW_TRACKING_URI unset; the
    catalog's store has every model, and the working folder holds nothing but the root."""
    assert sorted(p.name for p in cli_chain.workdir.iterdir()) == ["data"]
    assert not Path("mlflow.db").exists() and not (Path.home() / "mlflow.db").exists()
    client = MlflowClient(cli_chain.tracking_uri)
    for name in ("seed-tokenizer-stage1", "seed-tokenizer", "seed-lora"):
        assert client.get_model_version(name, "1").run_id, name
    for name in ("features", "qembeds", "tokenize"):
        assert "to build" in cli_chain.logs[name], name  # the plan is printed before anything runs
    print({k: round(v, 1) for k, v in cli_chain.seconds.items()})


def test_rerunning_a_finished_stage_is_a_noop(cli_chain):
    """The same features and tokenize commands again: everything up to date, nothing built, exit 0."""
    for argv in (
        ["features", "--encoder", "tiny"],
        ["tokenize", "--tokenizer", "models:/seed-tokenizer/1"],
    ):
        proc = seedpipe(cli_chain, *argv, "--root", "data", "--corpus", CORPUS)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "0 to build" in proc.stdout and "nothing to do" in proc.stdout, proc.stdout
    assert sorted(p.name for p in cli_chain.workdir.iterdir()) == ["data"]


def test_job_dry_run_resolves_defaults_and_launches_nothing(cli_chain):
    """`train-lora --dry-run` prints the resolved config (tokens defaulted to the newest seed-tokenizer's
    tokens dataset) and the inputs with digests, and starts no run."""
    runs_before = sorted(p.name for p in (cli_chain.root / "runs").iterdir())
    proc = seedpipe(cli_chain, "train-lora", "--config", str(CONFIG_DIR / "tiny_lora.yaml"), "--root", "data",
                    "--corpus", CORPUS, "run.name=dry", "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens: seed-tokenizer-v1@" in proc.stdout
    assert f"{CORPUS}/tokens/seed-tokenizer-v1@" in proc.stdout and "dry run" in proc.stdout
    assert sorted(p.name for p in (cli_chain.root / "runs").iterdir()) == runs_before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["qembeds", "--stage1", "models:/no-such-model/1"],
            "models:/no-such-model/1: not found in the tracking store",
        ),
        (["tokenize", "--tokenizer", "models:/seed-tokenizer/1", "--features", "nope"], "nope"),
        (["train-tokenizer", "--stage", "1", "optim.lrr=1"], "optim.lrr"),
        (["train-lora", "tokens=missing"], "available: seed-tokenizer-v1@"),
        (["features"], "corpus is required"),
    ],
    ids=["unknown-model", "unknown-features", "unknown-key", "unknown-tokens", "missing-corpus"],
)
def test_mistakes_are_one_clear_line(cli_chain, argv, message):
    """A model, dataset or config key that does not exist: exit status 2 and one `error:` line naming
    it (the available ones where there are), no traceback."""
    common = [] if argv == ["features"] else ["--corpus", CORPUS]
    proc = seedpipe(cli_chain, *argv, "--root", "data", *common)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
