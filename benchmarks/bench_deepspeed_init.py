"""Cold DeepSpeed op build vs warm 2-rank ``deepspeed.initialize`` on CPU, side by side.

Usage::

    .venv/bin/python benchmarks/bench_deepspeed_init.py [--stage {0,1,2,3}]

1. Cold: ``ensure_ops()`` in a fresh process with a fresh temporary ``TORCH_EXTENSIONS_DIR``, i.e.
   the JIT compile every job paid before the op was built at ``make setup``.
2. Warm: two gloo ranks on the venv cache; each calls ``ensure_ops()`` then times
   ``deepspeed.initialize`` (tiny model, torch AdamW, the DeepSpeed config a job gets from
   ``jobs.trainer.deepspeed_config``: ZeRO ``--stage``, fp32 on CPU) and one step.

Prints both, the JIT builds each init started (0 when the op came from ``ensure_ops``, which is
what ``tests/test_deepspeed_init.py`` asserts instead of a time bound) and the ratio cold build /
warm init (mean over ranks). Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
TIMEOUT_S = 600


def _build_worker() -> dict:
    sys.path.insert(0, str(ROOT))
    from jobs.deepspeed_ops import ensure_ops

    return {"build_s": ensure_ops()}


def _rank_worker(stage: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from jobs.config import DeepSpeedSettings, OptimSettings
    from jobs.deepspeed_ops import ensure_ops
    from jobs.stage2 import Stage2JobConfig
    from jobs.trainer import deepspeed_config, param_groups
    from tests.test_deepspeed_init import _record_builds

    start = time.perf_counter()
    import deepspeed
    import torch

    import_s = time.perf_counter() - start
    ensure_s = ensure_ops()  # after the import, so this is the ops' own cost
    builds = _record_builds()

    job = Stage2JobConfig(corpus="bench", deepspeed=DeepSpeedSettings(zero_stage=stage, precision="auto"),
                          optim=OptimSettings(batch_size_per_worker=4))  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(param_groups(model, job.optim.weight_decay), lr=1e-2)
    start = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(job)
    )
    init_s = time.perf_counter() - start
    init_builds = list(builds)
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(engine(torch.randn(4, 8)), torch.randn(4, 1))
    engine.backward(loss)
    engine.step()
    step_s = time.perf_counter() - start
    torch.distributed.barrier()
    rank = int(os.environ["RANK"])
    return {"rank": rank, "import_s": import_s, "ensure_s": ensure_s, "init_s": init_s, "step_s": step_s,
            "init_builds": init_builds}  # fmt: skip


def _run(
    argv: list[str], env: dict[str, str], count: int = 1, rank_env: bool = False
) -> list[dict]:
    """Start ``count`` copies of this script in a worker role; return their JSON results."""
    with tempfile.TemporaryDirectory(prefix="bench-ds-") as tmp:
        procs, outs = [], []
        port = _free_port()
        try:
            for rank in range(count):
                out = Path(tmp) / f"{rank}.json"
                child_env = {**env, "OMP_NUM_THREADS": "1"}
                if rank_env:
                    child_env.update(
                        RANK=str(rank),
                        LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(count),
                        LOCAL_WORLD_SIZE=str(count),
                        MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port),
                    )
                cmd = [sys.executable, __file__, *argv, "--out", str(out)]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env))
                outs.append(out)
            for proc in procs:
                proc.wait(timeout=TIMEOUT_S)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker {proc.args} exited {proc.returncode}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [json.loads(out.read_text()) for out in outs]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=range(4), help="ZeRO stage")
    parser.add_argument("--worker", choices=["build", "rank"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = _build_worker() if args.worker == "build" else _rank_worker(args.stage)
        args.out.write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench-ds-ext-") as cold_dir:
        # Both names: an explicit TORCH_EXTENSIONS_DIR in the caller's env would otherwise win.
        cold_env = {
            **os.environ,
            "SEEDPIPE_TORCH_EXTENSIONS_DIR": cold_dir,
            "TORCH_EXTENSIONS_DIR": cold_dir,
        }
        print(f"cold build into {cold_dir} ...", flush=True)
        (cold,) = _run(["--worker", "build"], cold_env)

    sys.path.insert(0, str(ROOT))
    from jobs.deepspeed_ops import configure_environment

    warm_env = {**os.environ, **configure_environment()}
    print(f"warming the cache {warm_env['TORCH_EXTENSIONS_DIR']} ...", flush=True)
    _run(["--worker", "build"], warm_env)  # the op is built there at `make setup` normally
    print(f"warm {WORLD_SIZE}-rank deepspeed.initialize (ZeRO-{args.stage}) ...", flush=True)
    ranks = _run(["--worker", "rank", "--stage", str(args.stage)], warm_env, WORLD_SIZE, True)

    warm_mean = sum(r["init_s"] for r in ranks) / len(ranks)
    print()
    print(f"cold op build (ensure_ops, fresh cache)   {cold['build_s']:8.2f} s")
    for r in sorted(ranks, key=lambda r: r["rank"]):
        print(
            f"warm deepspeed.initialize rank {r['rank']}          {r['init_s']:8.2f} s"
            f"   (before it: import deepspeed {r['import_s']:.2f} s, ensure_ops {r['ensure_s']:.2f} s;"
            f" first step {r['step_s']:.2f} s; JIT builds during init: {r['init_builds'] or 'none'})"
        )
    print(f"ratio cold build / warm init (mean)       {cold['build_s'] / warm_mean:8.1f} x")


if __name__ == "__main__":
    main()
