"""DeepSpeed on CPU: ops built once by ``ensure_ops``, a 2-rank gloo init that compiles nothing.

Run as a script (``python tests/test_deepspeed_init.py OUT CKPT``) it is one rank of the 2-rank
job; the test below starts two of them with the env vars torch.distributed expects. How long the
build and the init take is measured by ``benchmarks/bench_deepspeed_init.py``, not asserted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the rank subprocesses run this file directly

from jobs.deepspeed_ops import configure_environment, ensure_ops  # noqa: E402

WORLD_SIZE = 2
RANK_TIMEOUT_S = 240.0


def _op_library(directory: Path) -> Path:
    return directory / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record_builds() -> list[str]:
    """Names of the JIT extensions torch builds in this process from now on, as they start.

    ``_write_ninja_file_and_build_library`` is the step of ``cpp_extension.load`` that writes
    build.ninja and runs ninja; a load served from DeepSpeed's in-process cache never reaches it.
    """
    import torch.utils.cpp_extension as cpp_extension

    builds: list[str] = []
    build = cpp_extension._write_ninja_file_and_build_library

    def recording(*args: object, **kwargs: object) -> None:
        builds.append(str(kwargs.get("name", args[0] if args else "?")))
        build(*args, **kwargs)

    cpp_extension._write_ninja_file_and_build_library = recording
    return builds


def _rank_main(out_path: Path, ckpt_dir: Path) -> None:
    """One rank: ensure_ops, ZeRO-2 fp32 init with a torch optimizer, one step, save."""
    import deepspeed
    import torch

    builds = _record_builds()
    ensure_ops(timeout_s=120)
    ensure_builds = list(builds)
    builds.clear()

    torch.manual_seed(0)  # same initial weights on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1_000_000,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    init_builds = list(builds)

    rank = int(os.environ["RANK"])
    generator = torch.Generator().manual_seed(rank)
    x_B8 = torch.randn(4, 8, generator=generator)
    y_B1 = torch.randn(4, 1, generator=generator)
    loss = torch.nn.functional.mse_loss(engine(x_B8), y_B1)
    engine.backward(loss)
    engine.step()
    changed = any(
        not torch.equal(old, new.detach())
        for old, new in zip(before, engine.module.parameters(), strict=True)
    )
    engine.save_checkpoint(str(ckpt_dir), tag="step1")
    torch.distributed.barrier()
    out_path.write_text(
        json.dumps(
            {
                "rank": rank,
                "ensure_builds": ensure_builds,
                "init_builds": init_builds,
                "loss": loss.item(),
                "changed": changed,
                "global_steps": engine.global_steps,
            }
        )
    )


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "<no log>"


@pytest.mark.timeout(300)  # a cold build takes 30-80 s; a hang on the baton fails here
def test_ensure_ops_removes_stale_baton():
    """ensure_ops deletes a baton left by a killed build instead of waiting on it forever."""
    directory = Path(configure_environment()["TORCH_EXTENSIONS_DIR"])
    baton = directory / "deepspeed_shm_comm" / "lock"
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()  # what torch's FileBaton leaves when its process dies mid-build
    # timeout_s bounds the flock wait (TimeoutError past it); a hang on the baton is caught by
    # pytest-timeout.
    ensure_ops(timeout_s=120)
    assert not baton.exists()
    assert _op_library(directory).exists()


@pytest.mark.timeout(300)
def test_another_ninja_first_on_path_is_not_used(tmp_path):
    """A process whose PATH finds another ``ninja`` first (a system one, an activated shell's)
    still loads the cached op with the pinned wheel's ninja: two ninjas on one cache rebuild the op
    in turns (20-47 s each), so the stand-in ninja must never run and the library stays as built."""
    directory = Path(configure_environment()["TORCH_EXTENSIONS_DIR"])
    ensure_ops(timeout_s=120)
    library = _op_library(directory)
    mtime_before = library.stat().st_mtime_ns
    fake_bin, calls = tmp_path / "bin", tmp_path / "fake-ninja-calls.txt"
    fake_bin.mkdir()
    fake = fake_bin / "ninja"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    fake.chmod(0o755)
    env = os.environ | {"PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.deepspeed_ops", "--warm", "--timeout-s", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not calls.exists(), f"the other ninja ran: {calls.read_text()}"
    assert library.stat().st_mtime_ns == mtime_before, "the op was rebuilt"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_zero2_init_compiles_nothing(tmp_path):
    """After ensure_ops, a 2-rank gloo ZeRO-2 init starts no JIT build, trains, saves, and leaves the op library untouched."""
    directory = Path(configure_environment()["TORCH_EXTENSIONS_DIR"])
    ensure_ops(timeout_s=120)
    library = _op_library(directory)
    assert library.exists(), f"ensure_ops built nothing at {library}"
    mtime_before = library.stat().st_mtime_ns

    port = _free_port()
    ckpt_dir = tmp_path / "ckpt"
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    outs = [tmp_path / f"rank{rank}.json" for rank in range(WORLD_SIZE)]
    try:
        for rank in range(WORLD_SIZE):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD_SIZE),
                "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            with logs[rank].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, str(outs[rank]), str(ckpt_dir)],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + RANK_TIMEOUT_S
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} timed out; log tail:\n{_tail(logs[rank])}")
            assert proc.returncode == 0, (
                f"rank {rank} exited {proc.returncode}:\n{_tail(logs[rank])}"
            )
    finally:
        _kill(procs)

    results = [json.loads(out.read_text()) for out in outs]
    assert [r["rank"] for r in results] == list(range(WORLD_SIZE))
    for result in results:
        assert result["changed"], f"rank {result['rank']}: the step left the weights unchanged"
        assert result["global_steps"] == 1
        # ensure_ops's own load runs torch's (up-to-date, no-op) ninja step in every fresh
        # process: seeing it shows the recorder works; the init must not reach that step at all.
        assert "deepspeed_shm_comm" in result["ensure_builds"], result
        assert result["init_builds"] == [], f"deepspeed.initialize built {result['init_builds']}"
    assert (ckpt_dir / "step1").is_dir()
    assert library.stat().st_mtime_ns == mtime_before, "deepspeed.initialize rebuilt the op"
    assert not (library.parent / "lock").exists()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
