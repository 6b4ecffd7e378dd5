"""What `run.rank_rows=global_shuffle` costs and buys, against Ray Data's `streaming_split`.

Usage::

    .venv/bin/python benchmarks/bench_rank_rows.py --root seed-demo [--corpus shapes]
        [--config demo_stage1] [--steps 300] [--repeats 2]

On a catalog that already holds the corpus's features (a demo root, say), the real stage-1 job
(`jobs.train_tokenizer.main`, Ray Train + DeepSpeed, 2 gloo workers) runs `--repeats` times under
each value, alternating (A B A B: load from other processes hits both alike), each as a new run
(its own run name and registered name, nothing resumed). Printed per run: the job's own
`samples_per_s` at its last step (timed from the first batch: it excludes worker start-up), the
wall time of the whole `main()` call, and the loss at the last step; then the medians, their
ratio, and whether the repeats of each value logged the same loss at every step.

Why a whole job and not a micro-benchmark: what global_shuffle changes is where rows come from
(every rank reads the whole training set once into its epoch cache, instead of its split), which
shows only in the job's start and first epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VALUES = ("streaming_split", "global_shuffle")


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record["metrics"]:
            out[record["step"]] = record["metrics"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a catalog holding the corpus's features")
    parser.add_argument("--corpus", default="shapes")
    parser.add_argument("--config", default="demo_stage1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from jobs import train_tokenizer

    stamp = time.strftime("%H%M%S")
    results: dict[str, list[dict]] = {v: [] for v in VALUES}
    for repeat in range(args.repeats):
        for value in VALUES:
            name = f"bench-{value}-{stamp}-{repeat}"
            argv_job = ["--stage", "1", "--config", args.config, "--root", args.root,
                        "--corpus", args.corpus, f"run.name={name}", f"run.rank_rows={value}",
                        f"optim.max_steps={args.steps}", f"run.log_every={args.steps // 10}",
                        f"run.checkpoint_every={args.steps}", f"eval_every={args.steps}",
                        f"register_as=bench-rank-rows-{value}"]  # fmt: skip
            start = time.monotonic()
            if train_tokenizer.main(argv_job) != 0:
                print(f"{name}: the job failed", file=sys.stderr)
                return 1
            wall = time.monotonic() - start
            curve = losses(Path(args.root).resolve() / "runs" / name)
            last = curve[max(curve)]
            results[value].append({"wall": wall, "samples_per_s": last["samples_per_s"],
                                   "loss": {s: m["loss"] for s, m in curve.items()}})  # fmt: skip
            print(f"{value:16s} repeat {repeat}: {last['samples_per_s']:8.1f} samples/s, "
                  f"wall {wall:6.1f} s, loss at step {max(curve)} {last['loss']:.6f}", flush=True)  # fmt: skip

    print(f"\nmedians over {args.repeats} runs each ({args.steps} steps of {args.config})")
    med = {v: {k: statistics.median(r[k] for r in results[v]) for k in ("wall", "samples_per_s")}
           for v in VALUES}  # fmt: skip
    for value in VALUES:
        same = all(r["loss"] == results[value][0]["loss"] for r in results[value])
        print(f"  {value:16s} {med[value]['samples_per_s']:8.1f} samples/s  wall {med[value]['wall']:6.1f} s"
              f"  repeats logged the same loss at every step: {same}")  # fmt: skip
    a, b = med["global_shuffle"], med["streaming_split"]
    print(f"  global_shuffle / streaming_split: samples/s x{a['samples_per_s'] / b['samples_per_s']:.3f}, "
          f"wall x{a['wall'] / b['wall']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
