"""The README's chain, run the way a new user runs it, once per test session.

The installed `seedpipe` console script, each command a subprocess, from a fresh empty working
folder, with `MLFLOW_TRACKING_URI` unset (the embedded store under the root), `models:/`
references between the steps, and the synthetic corpus served on 127.0.0.1 and downloaded by
img2dataset. The end-to-end tests assert on what it leaves behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.synthetic import ImageServer, make_images, write_url_list

CORPUS = "chain"
NUM_IMAGES = 96
SAMPLES_PER_SHARD = 32
STEP_TIMEOUT_S = 600


def seedpipe_exe() -> str:
    exe = Path(sys.executable).parent / "seedpipe"
    assert exe.is_file(), f"the seedpipe console script is not installed beside {sys.executable}"
    return str(exe)


def user_env() -> dict[str, str]:
    """The environment a user's shell would have: no tracking URI, no Ray address, no test paths."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")
    }
    return env


@dataclass
class Chain:
    workdir: Path
    """The fresh empty folder every command ran in (its only entry afterwards must be `data`)."""
    root: Path
    url_list: Path
    seconds: dict[str, float] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"


def steps(root: str) -> list[tuple[str, list[str]]]:
    """The README's commands, in order, with this chain's corpus and root (relative, as a user types)."""
    common = ["--root", root, "--corpus", CORPUS]
    return [
        ("ingest", ["ingest", *common, "--url-list", "URLS", "--allow-private-hosts",
                    "--samples-per-shard", str(SAMPLES_PER_SHARD)]),
        ("features", ["features", *common, "--encoder", "tiny"]),
        ("stage1", ["train-tokenizer", "--stage", "1", "--config", "tiny_stage1", *common]),
        ("qembeds", ["qembeds", *common, "--stage1", "models:/seed-tokenizer-stage1/1"]),
        ("stage2", ["train-tokenizer", "--stage", "2", "--config", "tiny_stage2", *common,
                    "stage1=models:/seed-tokenizer-stage1/1"]),
        ("tokenize", ["tokenize", *common, "--tokenizer", "models:/seed-tokenizer/1"]),
        ("lora", ["train-lora", "--config", "tiny_lora", *common]),
    ]  # fmt: skip


def build_chain(base: Path) -> Chain:
    """Serve the corpus, then run every step in a fresh folder; fail with the step's log tail."""
    workdir, inputs = base / "user", base / "inputs"
    workdir.mkdir(parents=True)
    inputs.mkdir()
    images = make_images(NUM_IMAGES, seed=0)
    chain = Chain(workdir=workdir, root=workdir / "data", url_list=inputs / "urls.tsv")
    exe, env = seedpipe_exe(), user_env()
    with ImageServer(images) as server:
        write_url_list(chain.url_list, [(server.image_url(n), c) for n, _, c in images], "tsv")
        for name, argv in steps("data"):
            argv = [str(chain.url_list) if a == "URLS" else a for a in argv]
            start = time.monotonic()
            proc = subprocess.run([exe, *argv], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=STEP_TIMEOUT_S)  # fmt: skip
            chain.seconds[name] = time.monotonic() - start
            chain.logs[name] = proc.stdout + proc.stderr
            assert proc.returncode == 0, (
                f"`seedpipe {' '.join(argv)}` exited {proc.returncode}:\n{chain.logs[name][-4000:]}"
            )
    return chain
